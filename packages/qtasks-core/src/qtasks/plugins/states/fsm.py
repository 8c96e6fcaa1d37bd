"""QTasks' path ``qtasks.plugins.states.fsm``: ``AsyncState`` and ``SyncState``
(:mod:`qtasks.state`)."""

from typing import TYPE_CHECKING

from qtasks.plugins.states import AsyncState, SyncState

__all__ = ["AsyncState", "SyncState"]


if not TYPE_CHECKING:  # a type checker reports QTasks' names qtasks lacks as missing
    from qtasks.compat.names import refuse

    __getattr__ = refuse(__name__)
