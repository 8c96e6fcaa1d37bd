"""QTasks' path ``qtasks.plugins.states.sync_state``: ``SyncState`` (:mod:`qtasks.state`), which
QTasks re-exported there; its ``SyncStatePlugin`` is built in (reading it says so)."""

from typing import TYPE_CHECKING

from qtasks.plugins.states import SyncState

__all__ = ["SyncState"]

if not TYPE_CHECKING:  # a type checker reports QTasks' names qtasks lacks as missing
    from qtasks.compat.names import refuse

    __getattr__ = refuse(__name__)
