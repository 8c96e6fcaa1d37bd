"""One :class:`RabbitMQBroker` shared by two sync apps, each serving in an event loop (and
thread) of its own, as the component contract allows (review r17 #1): each loop gets a link of
its own, so starting the second app leaves the first one's link serving, and both apps publish
retries through theirs."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from qtasks import QueueConfig, QueueTasks
from qtasks.memory import MemoryGlobalConfig, MemoryStorage
from qtasks_rabbitmq import RabbitMQBroker

from .conftest import URL, delete_topology

pytestmark = pytest.mark.rabbitmq


def test_two_sync_apps_sharing_a_broker_each_retry_a_task(queue_name: str) -> None:
    broker = RabbitMQBroker(URL, queue=queue_name)
    storage, global_config = MemoryStorage(), MemoryGlobalConfig()
    apps = {
        name: QueueTasks(
            broker=broker,
            storage=storage,
            global_config=global_config,
            config=QueueConfig(max_tasks_process=1),
        )
        for name in ("a", "b")
    }
    failed: dict[str, set[str]] = {}  # task key -> the apps whose worker failed an attempt
    lock = threading.Lock()
    for name, app in apps.items():

        def flaky(key: str, name: str = name) -> str:
            """Fails once in each app that runs it: each such app publishes a retry."""
            with lock:
                if name not in failed.setdefault(key, set()):
                    failed[key].add(name)
                    raise RuntimeError("this app's first attempt fails; the task is retried")
            return name

        app.task(name="flaky", retry=3, retry_backoff=0.1)(flaky)
    try:
        with apps["a"], apps["b"]:  # both serve, each in its own loop
            # RabbitMQ hands the messages round robin to the two consumers: the first task's
            # attempts alternate, so each app fails (and retries) one; a few more if not.
            deadline = time.monotonic() + 60
            for number in range(20):
                task = apps["ab"[number % 2]].add_task("flaky", f"k{number}")
                result = task.wait_result(timeout=15)
                assert result.status == "success", (number, result)
                retried_by = set().union(*failed.values())
                if retried_by == {"a", "b"} or time.monotonic() > deadline:
                    break
            assert retried_by == {"a", "b"}, failed
            assert broker.reconnects == 0
    finally:
        asyncio.run(delete_topology(queue_name))
