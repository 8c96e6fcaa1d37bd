"""QTasks' path ``qtasks.timers.async_timer``: ``AsyncTimer`` (``qtasks_timer.AsyncTimer``)."""

from typing import TYPE_CHECKING

from qtasks.timers import AsyncTimer

__all__ = ["AsyncTimer"]


if not TYPE_CHECKING:  # a type checker reports QTasks' names qtasks lacks as missing
    from qtasks.compat.names import refuse

    __getattr__ = refuse(__name__)
