"""QTasks' path ``qtasks.routers.async_router``: ``AsyncRouter`` (see :mod:`qtasks.routers`)."""

from qtasks.routers import AsyncRouter

__all__ = ["AsyncRouter"]
