"""QTasks' sync example app (examples/sync/based_sync_app.py), ported."""

import logging

import pydantic
import router_tasks
import shared_tasks  # noqa: F401  (its shared tasks are adopted by the app)
from _backend import BROKER_URL, CONFIG

from qtasks import QueueTasks
from qtasks.plugins.base import BasePlugin
from qtasks.registries import SyncTask

app = QueueTasks(broker_url=BROKER_URL, config=CONFIG)
app.config.logs_default_level_server = logging.INFO
app.config.running_older_tasks = True

app.include_router(router_tasks.router)


class MarkTests(BasePlugin):
    """Like QTasks' SyncTestPlugin: sees tasks declared with test=True."""

    def __init__(self):
        super().__init__("mark-tests")
        self.seen = []

    def trigger(self, name, **kwargs):
        task_func = kwargs.get("task_func")
        if name == "worker_execute_before" and task_func.options.extra.get("test"):  # type: ignore[union-attr]  # QTasks' code: no None check
            self.seen.append(task_func.name)  # type: ignore[union-attr]  # as above
        return None


marks = MarkTests()
app.add_plugin(
    marks,
    trigger_names=["worker_execute_before", "worker_remove_finished_task"],
    component="worker",
)


@app.task(name="test")
def test():
    return "It's a test task!"


@app.task(name="test_num")
def test_num(number: int):
    return number


@app.task(name="test_echo", echo=True)
def test_echo(self: SyncTask):
    task = self.add_task(5, task_name="test_num", timeout=50)
    if task:
        return f"Task {task.task_name}, Result: {task.returning}"


@app.task(retry=5, retry_on_exc=[ZeroDivisionError], retry_backoff=0)
def error_zero():
    result = 1 / 0
    print(result)


def yield_func(result):
    return result


@app.task(generate_handler=yield_func, echo=True)
def test_yield(self: SyncTask, n: int):
    for _ in range(n):
        n += 1
        yield n


class Item(pydantic.BaseModel):
    name: str
    value: int


@app.task(echo=True, test=True)
def example_pydantic(self: SyncTask, item: Item):
    return f"Hello, {item.name}!"


@app.task(echo=True, max_time=0.5)
def example_error_timeout(self: SyncTask):
    self.ctx.sleep(5)
    return "This task took too long to complete."


if __name__ == "__main__":
    app.run_forever()
