"""QTasks' path ``qtasks.plugins.depends.class_depends``: ``Depends`` (``qtasks.Depends``)
and ``ScopeEnum``."""

from qtasks.plugins.depends import Depends, ScopeEnum

__all__ = ["Depends", "ScopeEnum"]
