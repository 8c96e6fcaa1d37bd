"""``from qtasks.qtasks import QueueTasks`` (QTasks' path): the sync app."""

from qtasks.sync import QueueTasks

__all__ = ["QueueTasks"]
