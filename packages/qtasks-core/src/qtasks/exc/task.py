"""QTasks' path ``qtasks.exc.task``: ``TaskCancelError`` (the same class as :mod:`qtasks.exc`)."""

from qtasks.exc import TaskCancelError

__all__ = ["TaskCancelError"]
