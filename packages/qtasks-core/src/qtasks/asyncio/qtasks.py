"""``from qtasks.asyncio.qtasks import QueueTasks`` (QTasks' path): the async app."""

from qtasks.app import AsyncQueueTasks as QueueTasks

__all__ = ["QueueTasks"]
