"""QTasks' path ``qtasks.plugins.depends.enums``: ``ScopeEnum`` (see
:mod:`qtasks.plugins.depends`)."""

from qtasks.plugins.depends import ScopeEnum

__all__ = ["ScopeEnum"]
