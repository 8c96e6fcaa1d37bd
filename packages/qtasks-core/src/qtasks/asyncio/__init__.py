"""``from qtasks.asyncio import QueueTasks``: the async app under its QTasks 1.x name."""

from qtasks.app import AsyncQueueTasks as QueueTasks

__all__ = ["QueueTasks"]
