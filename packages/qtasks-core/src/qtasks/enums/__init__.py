"""QTasks' ``qtasks.enums``: ``TaskStatusEnum`` is :class:`~qtasks.record.TaskStatus`."""

from qtasks.enums.task_status import TaskStatusEnum

__all__ = ["TaskStatusEnum"]
