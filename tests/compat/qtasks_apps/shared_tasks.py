"""Shared tasks, declared without an app (examples/sync/shared_tasks.py)."""

from task_middleware import MyTaskMiddleware

from qtasks import shared_task
from qtasks.registries.sync_task_decorator import SyncTask


def yield_func(result):
    return result * 10


@shared_task(
    description="Test synchronous task with decorator",
    middlewares_after=[MyTaskMiddleware],
    echo=True,
    generate_handler=yield_func,
)
def sync_test(self: SyncTask):
    yield 1
    yield 2


@shared_task(
    description="Test asynchronous task", middlewares_after=[MyTaskMiddleware], awaiting=True
)
async def async_test():
    return "async_test"
