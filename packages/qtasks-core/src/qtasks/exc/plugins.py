"""QTasks' path ``qtasks.exc.plugins``: ``TaskPluginTriggerError`` (the same class as
:mod:`qtasks.exc`)."""

from qtasks.exc import TaskPluginTriggerError

__all__ = ["TaskPluginTriggerError"]
