"""QTasks 1.7's imports: its long path of the sync app works; its component modules, which
qtasks does not have (its docs build a RabbitMQ app with ``from qtasks.brokers import
AsyncRabbitMQBroker``), are refused with what to write instead, not a bare
``ModuleNotFoundError``."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from qtasks.compat.modules import INSTEAD
from qtasks.errors import QTasksError, QTasksModuleNotProvidedError
from qtasks.sync import QueueTasks


def test_the_sync_app_has_qtasks_long_path() -> None:
    from qtasks.qtasks import QueueTasks as Long

    assert Long is QueueTasks


@pytest.mark.parametrize("name", [*INSTEAD, "qtasks.brokers.async_rabbitmq"])
def test_a_qtasks_module_qtasks_lacks_says_what_to_write(name: str) -> None:
    with pytest.raises(QTasksModuleNotProvidedError) as raised:
        importlib.import_module(name)
    assert isinstance(raised.value, QTasksError | ModuleNotFoundError)
    assert str(raised.value).startswith(f"{name.rpartition('.async_rabbitmq')[0] or name} is")
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
