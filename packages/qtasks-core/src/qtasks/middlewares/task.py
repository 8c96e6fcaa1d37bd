"""QTasks' path ``qtasks.middlewares.task``: ``TaskMiddleware`` (the same class as
:mod:`qtasks.middlewares`)."""

from typing import TYPE_CHECKING

from qtasks.middlewares import TaskMiddleware

__all__ = ["TaskMiddleware"]


if not TYPE_CHECKING:  # a type checker reports QTasks' names qtasks lacks as missing
    from qtasks.compat.names import refuse

    __getattr__ = refuse(__name__)
