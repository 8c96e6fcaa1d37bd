"""QTasks' path ``qtasks.plugins.depends.class_depends``: ``Depends`` (``qtasks.Depends``)."""

from qtasks.plugins.depends import Depends

__all__ = ["Depends"]
