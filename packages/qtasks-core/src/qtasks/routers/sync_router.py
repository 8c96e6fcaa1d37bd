"""QTasks' path ``qtasks.routers.sync_router``: ``SyncRouter`` (see :mod:`qtasks.routers`)."""

from qtasks.routers import SyncRouter

__all__ = ["SyncRouter"]
