"""QTasks' smaller examples (states, depends, plugins, env, timers), ported with their call
shapes and run in memory."""

import time
import warnings
from contextlib import contextmanager
from typing import Annotated, Any

import anyio
import pytest

from qtasks.asyncio import QueueTasks as AsyncQueueTasks
from qtasks.plugins import AsyncState
from qtasks.plugins.depends import Depends, ScopeEnum
from qtasks.registries import AsyncTask
from qtasks.timers import SyncTimer

WAIT = 10
pytestmark = pytest.mark.anyio


class MyState(AsyncState):
    pass


async def test_states_example() -> None:
    app = AsyncQueueTasks()

    @app.task
    async def step1(state: MyState):
        await state.set("state", "await_phone")
        await state.update(step=1, prompt="Enter your phone number")
        return "ok"

    @app.task(echo=True)
    async def step2(self: AsyncTask, state: MyState):
        everything = await state.get_all()
        cur = await state.get("state")
        if cur != "await_phone":
            return "error"
        await state.update(step=2)
        await state.delete("state")
        after = await state.get()
        await state.clear()
        return [everything, after]

    with anyio.fail_after(WAIT):
        async with app:
            await step1.add_task(timeout=50)
            task = await step2.add_task(timeout=50)
    assert task.returning == [
        {"state": "await_phone", "step": 1, "prompt": "Enter your phone number"},
        {"step": 2, "prompt": "Enter your phone number"},
    ]


def test_depends_example_sync() -> None:
    from qtasks import QueueTasks

    events: list[str] = []

    @contextmanager
    def test_dep():
        events.append("Open")
        yield 123
        events.append("Close")

    app = QueueTasks()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        app.config.delete_finished_tasks = True
        app.config.running_older_tasks = True
    app.config.logs_default_level_server = 20

    @app.task
    def test(dep: Annotated[int, Depends(test_dep, scope=ScopeEnum.TASK)]):
        return dep

    try:
        with app:
            assert app.add_task("test", timeout=WAIT).returning == 123
    finally:
        app.close()
    assert events == ["Open", "Close"]


async def test_depends_example_async_generator_dependency() -> None:
    app = AsyncQueueTasks()
    events: list[str] = []

    async def test_dep():
        events.append("Open")
        try:
            yield 123
        finally:
            events.append("Close")

    @app.task
    async def test(dep: Annotated[int, Depends(test_dep, scope=ScopeEnum.TASK)]):
        return dep

    with anyio.fail_after(WAIT):
        async with app:
            assert (await app.add_task("test", timeout=WAIT)).returning == 123
    assert events == ["Open", "Close"]


async def test_plugins_example() -> None:
    from qtasks.exc import TaskPluginTriggerError
    from qtasks.plugins.base import BasePlugin

    app = AsyncQueueTasks()
    seen: list[dict[str, Any]] = []

    class TestPlugin(BasePlugin):
        def __init__(self, name=None):
            super().__init__(name)
            self.handlers = {"task_executor_run_task_trigger_error": self.task_trigger_error}

        async def start(self, *args, **kwargs):
            return super().start(*args, **kwargs)

        async def stop(self, *args, **kwargs):
            return super().stop(*args, **kwargs)

        async def trigger(self, name, **kwargs):
            handler = self.handlers.get(name)
            if handler:
                return handler(**kwargs)
            return None

        def task_trigger_error(self, **kwargs):
            seen.append(kwargs)
            return None

    app.add_plugin(
        TestPlugin(), trigger_names=["task_executor_run_task_trigger_error"], component="worker"
    )

    @app.task(echo=True)
    async def test_task(self: AsyncTask):
        self.ctx.plugin_error()

    with anyio.fail_after(WAIT):
        async with app:
            record = await app.add_task("test_task", timeout=WAIT)
    assert record.status.value == "error"
    assert isinstance(seen[0]["e"], TaskPluginTriggerError)
    assert seen[0]["task_func"].name == "test_task"


def test_env_example(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QTASKS_TASK_DEFAULT_PRIORITY", "21")
    # QTasks read QTASKS_* in its constructor; qtasks reads them when the app is built from
    # configuration (from_config, the CLI).
    app = AsyncQueueTasks.from_config()
    assert app.config.task_default_priority == 21
    assert app.config.default_priority == 21
    assert app.config_sources["default_priority"] == "env QTASKS_TASK_DEFAULT_PRIORITY"


def test_timer_example() -> None:
    from apscheduler.triggers.cron import CronTrigger  # type: ignore[import-untyped]  # no stubs

    from qtasks import QueueTasks

    app = QueueTasks()
    app.config.logs_default_level_server = 20
    ran: list[int] = []

    @app.task(name="test", description="Test task")
    async def test(num: int):
        ran.append(num)

    timer = SyncTimer(app=app)
    timer.add_task(5, task_name="test", trigger=CronTrigger(second="*"))  # type: ignore[arg-type]  # QTasks' form add_task(5, task_name=...) is not in the typed signature
    try:
        with app:  # the timer runs inside the serving app (QTasks: timer.run_forever())
            deadline = time.monotonic() + 5
            while not ran and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        app.close()
    assert ran and ran[0] == 5


async def test_cls_example() -> None:
    app = AsyncQueueTasks()

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    assert await add(2, 3) == 5  # qtasks: a task is still its function
    with anyio.fail_after(WAIT):
        async with app:
            assert (await add.add_task(2, 3, timeout=WAIT)).returning == 5
