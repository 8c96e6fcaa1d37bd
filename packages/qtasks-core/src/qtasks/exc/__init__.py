"""QTasks' ``qtasks.exc`` names, on the qtasks error tree (:mod:`qtasks.errors`)."""

from qtasks.errors import QTasksError, TaskCancelledError

TaskCancelError = TaskCancelledError
"""QTasks' name of :class:`~qtasks.errors.TaskCancelledError` (``self.ctx.cancel`` raises it)."""


class TaskPluginTriggerError(QTasksError):
    """Raised by ``self.ctx.plugin_error(**kwargs)``: QTasks plugins registered on
    ``task_executor_run_task_trigger_error`` may turn it into the task's result (see
    :mod:`qtasks.compat.plugins`); otherwise the task fails with it."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.kwargs = kwargs
        super().__init__(*args or ("plugin error",))


__all__ = ["TaskCancelError", "TaskPluginTriggerError"]
