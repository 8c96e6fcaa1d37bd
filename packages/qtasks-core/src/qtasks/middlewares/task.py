"""QTasks' path ``qtasks.middlewares.task``: ``TaskMiddleware`` (the same class as
:mod:`qtasks.middlewares`)."""

from qtasks.middlewares import TaskMiddleware

__all__ = ["TaskMiddleware"]
