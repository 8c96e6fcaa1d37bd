"""A toolkit for fault tests on real processes: a private redis-server, a :class:`FaultProxy`
in front of it, worker subprocesses that reach Redis through the proxy, a producer app that
reaches it directly, runs counted per task, and waits with a deadline.

The ``rig`` fixture (tests/redis/conftest.py) hands a test a :class:`FaultRig`::

    async def test_something(rig: FaultRig) -> None:
        worker = rig.worker(concurrency=10, lease=2.0, max_deliveries=3)
        async with rig.producer() as app:
            await rig.wait_serving(app, worker)
            rig.proxy.latency(0.1)                      # or blackhole() / reset() / passthrough()
            task = await app.add_task("slow", 1, 4.0)   # tasks: see redis_worker_app.py
            await wait_until(lambda: rig.runs("end")[1] >= 1, timeout=20, what="task 1 ran",
                             workers=[worker])
            [record] = await outcome(app, [task.uuid], 20)  # once final (or dead-lettered)
        assert record.status is TaskStatus.SUCCESS
        assert rig.runs("start") == {1: 1}              # runs per task number, from the ledger
        assert not worker.problems()                    # no traceback, no unretrieved exception
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from faultproxy import FaultProxy
from redis_procs import RedisServer, Worker, counts, unavailable
from redis_worker_app import build

from qtasks import AsyncQueueTasks, TaskRecord


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float,
    what: str,
    workers: Iterable[Worker] = (),
    every: float = 0.05,
) -> None:
    """Poll ``condition`` (sync or async) until it holds; after ``timeout`` seconds fail the
    test saying ``what`` was awaited. A worker that dies meanwhile fails it at once, with its
    log."""
    watched = list(workers)
    deadline = anyio.current_time() + timeout
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        for worker in watched:
            if worker.proc.poll() is not None:
                pytest.fail(
                    f"worker {worker.name} exited while waiting for {what}:\n{worker.output()}"
                )
        if anyio.current_time() > deadline:
            logs = "\n".join(f"--- {w.name}\n{w.output()}" for w in watched)
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{logs}")
        await anyio.sleep(every)


async def outcome(
    app: AsyncQueueTasks, uuids: list[str], seconds: float
) -> list[TaskRecord | None]:
    """The tasks' records once each is final or dead-lettered (a dead-lettered task's record
    may never become final), or as they are after ``seconds``."""
    records: list[TaskRecord | None] = []
    with anyio.move_on_after(seconds):
        while True:
            records = [await app.storage.get(uuid) for uuid in uuids]
            dead = {letter.id for letter in await app.broker.dead_letters()}
            if all(
                (r is not None and r.status.final) or uuid in dead
                for r, uuid in zip(records, uuids, strict=True)
            ):
                break
            await anyio.sleep(0.1)
    return records


class FaultRig:
    """A private redis-server with a :class:`FaultProxy` in front, and what a test starts on
    them (closed by the fixture, in reverse)."""

    def __init__(self, tmp: Path, prefix: str) -> None:
        self.tmp = tmp
        self.prefix = prefix
        # AOF on (a test may kill and restart it), fsync once a second: an fsync per write
        # would add its own latency to what the proxy injects.
        self.server = RedisServer(tmp, fsync="everysec")
        try:
            self.proxy = FaultProxy(("127.0.0.1", self.server.port)).start()
        except BaseException:
            self.server.close()
            raise
        self.workers: list[Worker] = []

    @property
    def direct_url(self) -> str:
        """The redis-server itself (for producers and checks)."""
        return self.server.url

    @property
    def proxied_url(self) -> str:
        """The same server through the proxy (for workers)."""
        return f"redis://127.0.0.1:{self.proxy.port}/0"

    @property
    def ledger(self) -> Path:
        """``start N`` / ``end N`` lines appended by every run of a ledger task."""
        return self.tmp / "ledger.txt"

    def worker(
        self,
        *,
        concurrency: int = 10,
        lease: float = 30.0,
        max_deliveries: int | None = None,
        name: str | None = None,
        direct: bool = False,
        **config: Any,
    ) -> Worker:
        """A worker subprocess of ``redis_worker_app.py``, reaching Redis through the proxy
        (``direct=True``: not). ``config`` holds further QueueConfig fields (``extra`` for the
        Redis options, e.g. ``extra={"redis_socket_timeout": 2.0}``)."""
        if max_deliveries is not None:
            config["max_deliveries"] = max_deliveries
        worker = Worker(
            self.direct_url if direct else self.proxied_url,
            self.prefix,
            self.tmp,
            lease=lease,
            concurrency=concurrency,
            name=name or f"w{len(self.workers)}",
            config=config,
        )
        self.workers.append(worker)
        return worker

    @asynccontextmanager
    async def producer(self, **config: Any) -> AsyncIterator[AsyncQueueTasks]:
        """A started app on the redis-server directly (adds tasks, reads records)."""
        app = build(self.direct_url, self.prefix, **config)
        await app.start()
        try:
            yield app
        finally:
            await app.aclose()

    async def wait_serving(
        self, app: AsyncQueueTasks, *workers: Worker, timeout: float = 20
    ) -> None:
        """Until ``workers`` have all sent a heartbeat (they claim tasks from then on)."""

        async def serving() -> bool:
            return len(await app.global_config.workers()) >= len(workers)

        await wait_until(serving, timeout=timeout, what="the workers to serve", workers=workers)

    def runs(self, event: str = "start") -> Counter[int]:
        """How many times each task number logged ``event`` (``start`` or ``end``)."""
        return counts(self.ledger, event)

    def close(self) -> None:
        for worker in reversed(self.workers):
            worker.stop()
        self.proxy.close()
        self.server.close()


def make_rig(tmp: Path, prefix: str) -> FaultRig:
    """A :class:`FaultRig`, or skip (fail under ``CI``) when no redis-server can be started."""
    try:
        return FaultRig(tmp, prefix)
    except (FileNotFoundError, OSError) as exc:
        unavailable(f"cannot start a redis-server: {exc}")
