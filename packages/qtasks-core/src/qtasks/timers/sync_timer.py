"""QTasks' path ``qtasks.timers.sync_timer``: ``SyncTimer`` (``qtasks_timer.SyncTimer``)."""

from qtasks.timers import SyncTimer

__all__ = ["SyncTimer"]
