"""QTasks' path ``qtasks.plugins.base``: ``BasePlugin`` for plugins with ``trigger(name, **kw)``."""

from qtasks.compat.plugins import BasePlugin

__all__ = ["BasePlugin"]
