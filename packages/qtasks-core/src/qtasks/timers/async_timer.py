"""QTasks' path ``qtasks.timers.async_timer``: ``AsyncTimer`` (``qtasks_timer.AsyncTimer``)."""

from qtasks.timers import AsyncTimer

__all__ = ["AsyncTimer"]
