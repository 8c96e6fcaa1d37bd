"""QTasks' path ``qtasks.plugins.states``: ``AsyncState`` and ``SyncState``."""

from qtasks.state import AsyncState, SyncState

__all__ = ["AsyncState", "SyncState"]
