"""QTasks' path ``qtasks.plugins.states``: ``AsyncState`` and ``SyncState``."""

from typing import TYPE_CHECKING

from qtasks.state import AsyncState, SyncState

__all__ = ["AsyncState", "SyncState"]


if not TYPE_CHECKING:  # a type checker reports QTasks' names qtasks lacks as missing
    from qtasks.compat.names import refuse

    __getattr__ = refuse(__name__)
