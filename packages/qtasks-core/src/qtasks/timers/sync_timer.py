"""QTasks' path ``qtasks.timers.sync_timer``: ``SyncTimer`` (``qtasks_timer.SyncTimer``)."""

from typing import TYPE_CHECKING

from qtasks.timers import SyncTimer

__all__ = ["SyncTimer"]


if not TYPE_CHECKING:  # a type checker reports QTasks' names qtasks lacks as missing
    from qtasks.compat.names import refuse

    __getattr__ = refuse(__name__)
