"""QTasks' path ``qtasks.plugins.states.fsm``: ``AsyncState`` and ``SyncState``
(:mod:`qtasks.state`)."""

from qtasks.plugins.states import AsyncState, SyncState

__all__ = ["AsyncState", "SyncState"]
