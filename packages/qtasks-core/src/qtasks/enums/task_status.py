"""``from qtasks.enums.task_status import TaskStatusEnum`` (QTasks' path).

qtasks' statuses are a ``StrEnum``, so ``record.status == TaskStatusEnum.SUCCESS.value`` and
``record.status == TaskStatusEnum.SUCCESS`` both hold; qtasks adds ``retry``."""

from qtasks.record import TaskStatus

TaskStatusEnum = TaskStatus

__all__ = ["TaskStatusEnum"]
