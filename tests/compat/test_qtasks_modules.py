"""QTasks 1.7's imports: its long path of the sync app works; its component modules, which
qtasks does not have (its docs build a RabbitMQ app with ``from qtasks.brokers import
AsyncRabbitMQBroker``), are refused with what to write instead, not a bare
``ModuleNotFoundError``."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from qtasks import QueueConfig
from qtasks.compat.modules import INSTEAD
from qtasks.errors import QTasksError, QTasksModuleNotProvidedError
from qtasks.executors.base import BaseTaskExecutor
from qtasks.sync import QueueTasks


def test_the_sync_app_has_qtasks_long_path() -> None:
    from qtasks.qtasks import QueueTasks as Long

    assert Long is QueueTasks


LACKING = [name for name in INSTEAD if name != "qtasks.executors"]  # it has .base
SUBMODULES = {
    "qtasks.brokers.async_rabbitmq": "qtasks.brokers",
    "qtasks.executors.sync_task_executor": "qtasks.executors",
}


@pytest.mark.parametrize("name", [*LACKING, *SUBMODULES])
def test_a_qtasks_module_qtasks_lacks_says_what_to_write(name: str) -> None:
    with pytest.raises(QTasksModuleNotProvidedError) as raised:
        importlib.import_module(name)
    assert isinstance(raised.value, QTasksError | ModuleNotFoundError)
    key = SUBMODULES.get(name, name)
    named = key if key in LACKING else name  # a lacking parent is refused first
    assert str(raised.value).startswith(f"{named} is QTasks 1.7's module")
    assert INSTEAD[key] in str(raised.value)
    assert "coming-from-qtasks.md" in str(raised.value)
    assert name not in sys.modules


def test_qtasks_rabbitmq_example_import_names_the_broker_and_storage() -> None:
    """As a user runs it: a fresh interpreter, QTasks' documented RabbitMQ imports."""
    code = "from qtasks.asyncio import QueueTasks\nfrom qtasks.brokers import AsyncRabbitMQBroker\n"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("qtasks.errors.QTasksModuleNotProvidedError: qtasks.brokers is")
    assert "qtasks_rabbitmq.RabbitMQBroker(url)" in last and "RedisStorage" in last


def test_modules_qtasks_has_and_unknown_ones_are_left_alone() -> None:
    assert importlib.util.find_spec("qtasks.no_such_module") is None
    assert importlib.import_module("qtasks.plugins.base").BasePlugin is not None


MIDDLEWARE = """
from qtasks.middlewares import TaskMiddleware
from qtasks.executors.base import BaseTaskExecutor

SEEN = []


class MyTaskMiddleware(TaskMiddleware):
    def __init__(self, task_executor: "BaseTaskExecutor"):
        super().__init__(task_executor)

    async def __call__(self):
        executor = self.task_executor
        SEEN.append(
            (executor.task_func.name, executor.task_func.awaiting, executor.task_broker.name)
            + (executor.task_broker.args, executor._args, executor._kwargs, executor.task.name)
        )
        executor.log.info("middleware saw %s", executor.task_broker.uuid)
        return self.task_executor
"""


def test_qtasks_task_middleware_example_reads_its_executor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str, prefix: str
) -> None:
    """QTasks' example middleware (examples/sync/libs/task_middleware.py, with the executor
    attributes QTasks' middlewares read) imports and runs on a worker fed from Redis."""
    (tmp_path / "qtasks17_middleware.py").write_text(MIDDLEWARE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("qtasks17_middleware")
    app = QueueTasks(broker_url=redis_url, config=QueueConfig(extra={"redis_prefix": prefix}))

    @app.task(middlewares_before=[module.MyTaskMiddleware])
    def greet(name: str, *, punct: str = "!") -> str:
        return f"hi {name}{punct}"

    with app:
        assert app.add_task("greet", "ann", punct="?", timeout=10).returning == "hi ann?"
    app.close()
    assert module.SEEN == [("greet", False, "greet", ["ann"], ["ann"], {"punct": "?"}, "greet")]
    assert isinstance(BaseTaskExecutor, type)
