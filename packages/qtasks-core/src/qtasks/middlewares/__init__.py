"""``from qtasks.middlewares import TaskMiddleware`` (QTasks' path); see
:mod:`qtasks.compat.middleware`. qtasks' own middlewares are plain functions
(:data:`qtasks.executor.Middleware`)."""

from qtasks.compat.middleware import TaskMiddleware

__all__ = ["TaskMiddleware"]
