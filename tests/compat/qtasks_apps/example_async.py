"""QTasks' async example app (examples/async/based_async_app.py), ported (no sleeps)."""

import json
import logging

import pydantic
from _backend import BROKER_URL, CONFIG

from qtasks.asyncio.qtasks import QueueTasks
from qtasks.registries.async_task_decorator import AsyncTask

app = QueueTasks(broker_url=BROKER_URL, config=CONFIG)
app.config.logs_default_level_server = logging.DEBUG
app.config.running_older_tasks = True
app.config.result_time_interval = 0.1


@app.task(name="test", description="Test Task.")
async def test():
    return "It's a test task!"


@app.task(name="test_num", description="Test task with a number")
def test_num(number: int):
    return number


@app.task(name="test_echo", description="Test task with console output", echo=True)
async def test_echo(self: AsyncTask):
    task = await self.add_task(5, task_name="test_num", timeout=50)
    if task:
        return f"Task {task.task_name}, result: {task.returning}"


async def yield_func(result):
    return result + 2


@app.task(description="Test task with generator", echo=True, generate_handler=yield_func)
async def test_yield(self: AsyncTask, n: int):
    self.ctx.get_logger().info(self.ctx.task_uuid)
    for _ in range(n):
        n += 1
        yield n


@app.task(description="Test task with retry", echo=True, retry=2, retry_backoff=0)
async def test_retry(self: AsyncTask):
    self.ctx.get_logger().info("Retry...")
    raise KeyError("Test error")


class Item(pydantic.BaseModel):
    name: str
    value: int


@app.task(description="Test task with Pydantic", tags=["example"], decode=json.dumps)
async def example_pydantic(item: Item):
    return f"Hello, {item.name}!"


@app.task(
    description="Test task for demonstrating context usage",
    echo=True,
    tags=["test"],
    priority=1,
    retry=3,
    retry_on_exc=[KeyError],
    decode=json.dumps,
    test="test",
)
async def test_echo_ctx(self: AsyncTask):
    self.ctx.get_logger().info("This is a test task!")
    await self.ctx.sleep(0.01)
    self.ctx.get_logger().info(self.ctx.get_config())
    task = await self.ctx.get_metadata(cache=True)
    self.ctx.get_logger().info(
        f"UUID: {self.ctx.task_uuid} Name: {self.task_name} Tags: {self.tags} "
        f"Priority: {self.priority} Extra: {self.extra} Retry: {self.retry} "
        f"Retry on: {self.retry_on_exc} Handler: {self.ctx.generate_handler} "
        f"Echo: {self.echo} Decode: {self.decode} Executor: {self.executor} "
        f"Before: {self.middlewares_before} After: {self.middlewares_after} Status: {task.status}"
    )
    self.ctx.cancel("Test task cancelled")
    return "Hello, world!"


@app.task(echo=True, max_time=0.5)
async def example_error_timeout(self: AsyncTask):
    await self.ctx.sleep(5)
    return "This task took too long to complete."


if __name__ == "__main__":
    app.run_forever()
