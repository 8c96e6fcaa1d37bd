"""One :class:`RedisBroker`, :class:`RedisStorage` and :class:`RedisGlobalConfig` shared by two
apps that serve in event loops of their own at once (two sync apps, each with its portal thread;
an async app and a sync app), as the component contract allows: starting the second app must
leave the first one's connections serving, so each app's worker retries a task, streams a
generator, cancels and reads the global config through the connections of its own loop."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import anyio
import pytest

from qtasks import AsyncQueueTasks, QueueConfig, QueueTasks, TaskStatus
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

pytestmark = pytest.mark.redis

App = TypeVar("App", QueueTasks, AsyncQueueTasks)

CONFIG = QueueConfig(max_tasks_process=2, heartbeat_interval=0.5, shutdown_grace=1.0)


class Shared:
    """The three components every app of a test shares, and what their tasks did."""

    def __init__(self, url: str, prefix: str, *, fast_lane: bool = True) -> None:
        options = {"redis_fast_lane": fast_lane}
        self.broker = RedisBroker(url, prefix=prefix, queue="shared", options=options)
        self.storage = RedisStorage(url, prefix=prefix, options=options)
        self.global_config = RedisGlobalConfig(url, prefix=prefix)
        self.failed: dict[str, set[str]] = {}  # task key -> the apps whose worker failed it
        self.lock = threading.Lock()

    def sync_app(self, name: str) -> QueueTasks:
        return self._tasks(QueueTasks(name, **self._components()), name)

    def async_app(self, name: str) -> AsyncQueueTasks:
        return self._tasks(AsyncQueueTasks(name, **self._components()), name)

    def _components(self) -> dict[str, Any]:
        return {
            "broker": self.broker,
            "storage": self.storage,
            "global_config": self.global_config,
            "config": CONFIG,
        }

    def _tasks(self, app: App, name: str) -> App:
        def flaky(key: str) -> str:
            """Fails once in each app that runs it: each such app publishes a retry."""
            with self.lock:
                if name not in self.failed.setdefault(key, set()):
                    self.failed[key].add(name)
                    raise RuntimeError("this app's first attempt fails; the task is retried")
            return name

        def count(n: int) -> Iterator[int]:
            yield from range(n)

        app.task(name="flaky", retry=3, retry_backoff=0.05)(flaky)
        app.task(name="count")(count)
        return app

    @property
    def retried_by(self) -> set[str]:
        with self.lock:
            return set().union(*self.failed.values())


def exercise(app: QueueTasks) -> None:
    """Through the sync ``app``, from this thread: a config round trip, a generator streamed,
    a delayed task cancelled."""
    name = app.aio.name
    app.config_set("shared", name, name)
    assert app.config_get("shared", name) == name
    streamed = app.add_task("count", 3)
    assert list(app.stream(streamed.uuid, timeout=15)) == [0, 1, 2]
    later = app.add_task("count", 1, delay=600)
    cancelled = app.cancel(later.uuid)
    assert cancelled is not None and cancelled.status is TaskStatus.CANCEL


def retry_in_each(shared: Shared, runs: dict[str, Callable[[str], TaskStatus]]) -> None:
    """Run flaky tasks through each app of ``runs`` in turn (each run enqueues one and waits
    for its end) until every such app's worker has failed (and retried) one: which worker
    claims a message is up to Redis. Each must end in success."""
    deadline = time.monotonic() + 60
    order = sorted(runs)
    for number in range(40):
        status = runs[order[number % len(order)]](f"k{number}")
        assert status is TaskStatus.SUCCESS, (number, status)
        if shared.retried_by >= set(runs) or time.monotonic() > deadline:
            break
    assert shared.retried_by >= set(runs), shared.failed


def no_warnings(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing failed on the side (heartbeats, hand-backs, settles log a warning or error)."""
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("fast_lane", [True, False], ids=["lane", "redis-py"])
def test_two_sync_apps_share_the_redis_components(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture, fast_lane: bool
) -> None:
    caplog.set_level(logging.WARNING)
    shared = Shared(redis_url, prefix, fast_lane=fast_lane)
    apps = {name: shared.sync_app(name) for name in ("a", "b")}

    def through(app: QueueTasks) -> Callable[[str], TaskStatus]:
        return lambda key: app.add_task("flaky", key, timeout=15).status

    try:
        with apps["a"]:
            with apps["b"]:  # both serve, each in its own loop (a started first)
                for app in apps.values():
                    exercise(app)
                retry_in_each(shared, {name: through(app) for name, app in apps.items()})
                for app in apps.values():  # once more, after the retries
                    exercise(app)
            apps["b"].close()  # b's connections close; a's still serve
            exercise(apps["a"])
    finally:
        for app in apps.values():
            app.close()
    no_warnings(caplog)


def test_an_async_app_and_a_sync_app_share_the_redis_components(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    shared = Shared(redis_url, prefix)
    aio = shared.async_app("aio")
    sync = shared.sync_app("sync")

    async def main() -> None:
        async with aio:  # the async app serves first, in this thread's loop
            loop = asyncio.get_running_loop()

            async def through_aio(key: str) -> TaskStatus:
                return (await aio.add_task("flaky", key, timeout=15)).status

            def in_thread() -> None:
                with sync:  # then the sync app, in its portal's loop
                    exercise(sync)
                    retry_in_each(
                        shared,
                        {
                            "aio": lambda key: asyncio.run_coroutine_threadsafe(
                                through_aio(key), loop
                            ).result(30),
                            "sync": lambda key: sync.add_task("flaky", key, timeout=15).status,
                        },
                    )
                sync.close()

            await anyio.to_thread.run_sync(in_thread)
            # The async app's own calls, in its loop, once the sync app closed its connections.
            await aio.config_set("shared", "aio", "aio")
            assert await aio.config_get("shared", "aio") == "aio"
            task = await aio.add_task("count", 2)
            assert [step async for step in aio.stream(task.uuid, timeout=15)] == [0, 1]
            later = await aio.add_task("count", 1, delay=600)
            cancelled = await aio.cancel(later.uuid)
            assert cancelled is not None and cancelled.status is TaskStatus.CANCEL

    try:
        asyncio.run(main())
    finally:
        sync.close()
    no_warnings(caplog)
