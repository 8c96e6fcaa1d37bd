"""A QTasks-style task middleware (examples/sync/libs/task_middleware.py)."""

from qtasks.middlewares import TaskMiddleware

CALLS: list[str] = []


class MyTaskMiddleware(TaskMiddleware):
    def __init__(self, task_executor):
        super().__init__(task_executor)

    async def __call__(self):
        CALLS.append(self.task_executor.task.name)
        return self.task_executor
