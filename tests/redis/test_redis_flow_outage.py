"""The worker's lease pass when a component other than the broker stalls, on a private
redis-server paused with SIGSTOP (review r18 #1, #2): the broker's renewal goes on whatever the
global config and the storage do, and a concurrency slot that ran out while its run went on is
taken back, past the limit if another run took it meanwhile."""

from __future__ import annotations

import logging
import os
import signal
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from redis_procs import RedisServer, start_server

from qtasks import (
    AsyncQueueTasks,
    MemoryBroker,
    MemoryGlobalConfig,
    MemoryStorage,
    QueueConfig,
    TaskStatus,
    hookimpl,
)
from qtasks.components import SlotRenewal
from qtasks_redis import RedisGlobalConfig, RedisStorage

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

LEASE = 1.0
KEY = "slots:limited:acme"


class Rig:
    """An app with an in-memory broker and one component on a private redis-server, its
    tasks ``limited`` (one run at a time per key) and ``plain`` (no flow option), each
    running until the test sets its key's event; what it saw, for the test to wait on."""

    def __init__(self, server: RedisServer, remote: str) -> None:
        self.server = server
        self.prefix = f"qt-fo-{uuid.uuid4().hex[:8]}"
        self.gc: RedisGlobalConfig | MemoryGlobalConfig = MemoryGlobalConfig()
        storage: RedisStorage | MemoryStorage = MemoryStorage()
        if remote == "global_config":
            self.gc = RedisGlobalConfig(server.url, prefix=self.prefix)
        else:
            storage = RedisStorage(server.url, prefix=self.prefix)
        self.broker = MemoryBroker()
        config = QueueConfig(lease=LEASE, max_tasks_process=4, shutdown_grace=1)
        self.app = AsyncQueueTasks(
            broker=self.broker, storage=storage, global_config=self.gc, config=config
        )
        self.starts: Counter[str] = Counter()
        self.started: dict[str, anyio.Event] = {}
        self.release: dict[str, anyio.Event] = {}
        self.live = 0
        self.most_live = 0
        self.stopped_at: float | None = None
        self.stalled_enough = anyio.Event()
        self.answers: list[tuple[float, list[SlotRenewal]]] = []
        self.answered = anyio.Event()
        self.requeued = anyio.Event()
        self._observe()

        @self.app.task(concurrency_key="k", max_concurrency=1)
        async def limited(k: str, name: str) -> str:
            await self._run(name, limited=True)
            return name

        @self.app.task
        async def plain(name: str) -> str:
            await self._run(name, limited=False)
            return name

        rig = self

        class Requeues:
            @hookimpl
            def qtasks_broker_requeued(self) -> None:
                rig.requeued.set()
                rig.requeued = anyio.Event()

        self.app.add_plugin(Requeues())

    async def _run(self, name: str, *, limited: bool) -> None:
        self.starts[name] += 1
        self.live += limited
        self.most_live = max(self.most_live, self.live)
        self.started.setdefault(name, anyio.Event()).set()
        try:
            await self.release.setdefault(name, anyio.Event()).wait()
        finally:
            self.live -= limited

    def _observe(self) -> None:
        """Wrap the broker's renewal and the global config's slot renewal, to see when they
        were answered (the components themselves run unchanged)."""
        extend_many = self.broker.extend_many

        async def broker_renewal(deliveries: Any) -> list[bool]:
            renewed = await extend_many(deliveries)
            stopped = self.stopped_at
            if stopped is not None and anyio.current_time() - stopped > 2 * LEASE:
                self.stalled_enough.set()
            return renewed

        self.broker.extend_many = broker_renewal  # type: ignore[method-assign]
        extend_slots = self.gc.extend_slots

        async def slot_renewal(
            slots: Sequence[tuple[str, str]], lease: float, limits: Sequence[int] | None = None
        ) -> list[SlotRenewal]:
            asked = anyio.current_time()
            found = await extend_slots(slots, lease, limits)
            self.answers.append((asked, found))
            self.answered.set()
            self.answered = anyio.Event()
            return found

        self.gc.extend_slots = slot_renewal  # type: ignore[method-assign]

    async def stall(self) -> None:
        """Pause the server until the broker renewed the leases more than two leases after
        the pause began (without the fix, its renewal waited for the stalled component)."""
        assert self.server.proc is not None
        self.stopped_at = anyio.current_time()
        os.kill(self.server.proc.pid, signal.SIGSTOP)
        try:
            with anyio.fail_after(20):
                await self.stalled_enough.wait()
        finally:
            os.kill(self.server.proc.pid, signal.SIGCONT)

    async def slot_answer(self, asked_after: float, wanted: SlotRenewal) -> None:
        """Until a slot renewal asked after ``asked_after`` answers ``wanted``."""
        with anyio.fail_after(10):
            while not any(at > asked_after and wanted in f for at, f in self.answers):
                await self.answered.wait()

    async def add(self, task: str, name: str) -> Any:
        args = ("acme", name) if task == "limited" else (name,)
        self.started.setdefault(name, anyio.Event())
        return await self.app.add_task(task, *args)

    async def wait_started(self, name: str) -> None:
        with anyio.fail_after(10):
            await self.started.setdefault(name, anyio.Event()).wait()

    def finish(self, name: str) -> None:
        self.release.setdefault(name, anyio.Event()).set()

    async def end_one_at_a_time(self, *tasks: Any) -> None:
        """Let ``a`` and ``b`` end; each of ``tasks`` succeeded, ran once, alone."""
        self.finish("a")
        self.finish("b")
        for task in tasks:
            assert (await task.wait_result(20)).status is TaskStatus.SUCCESS
        assert self.starts == {"a": 1, "b": 1}
        assert self.most_live == 1


@asynccontextmanager
async def rig(tmp_path: Path, remote: str = "global_config") -> AsyncIterator[Rig]:
    server = start_server(tmp_path, fsync="no")
    try:
        built = Rig(server, remote)
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(built.app)
            yield built
    finally:
        server.close()


async def deferred_or_started(rig: Rig, name: str) -> bool:
    """Wait until the next flow requeue or the start of ``name``; ``True`` when deferred."""
    started = rig.started.setdefault(name, anyio.Event())
    requeued = rig.requeued
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def on(event: anyio.Event) -> None:
                await event.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(on, started)
            tg.start_soon(on, requeued)
    return not started.is_set()


@pytest.mark.parametrize("remote", ["global_config", "storage"])
async def test_a_stalled_component_delays_no_broker_renewal(
    tmp_path: Path, remote: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Review r18 #1: the global config (or the storage) stops answering for over two
    leases while two tasks run, one holding a concurrency slot, one with no flow option. The
    broker's renewal goes on every lease / 3, so neither loses its lease nor runs twice
    (before, the pass waited a lease for the stalled call: both ran again)."""
    caplog.set_level(logging.WARNING)
    async with rig(tmp_path, remote) as r:
        tasks = [await r.add("limited", "a"), await r.add("plain", "p")]
        await r.wait_started("a")
        await r.wait_started("p")
        await r.stall()
        r.finish("a")
        r.finish("p")
        for task in tasks:
            done = await task.wait_result(20)
            assert (done.status, done.attempt) == (TaskStatus.SUCCESS, 1)
    assert r.starts == {"a": 1, "p": 1}
    assert not [m for m in caplog.messages if "its lease was lost, its result dropped" in m]


async def test_a_slot_that_ran_out_during_a_stall_is_taken_back(tmp_path: Path) -> None:
    """Review r18 #2: the global config stalls past the slot's lease while its run goes on.
    Once it answers again the renewal takes the slot back, so the next message of the key
    waits for the run (before, the slot stayed free and both ran at once)."""
    async with rig(tmp_path) as r:
        first = await r.add("limited", "a")
        await r.wait_started("a")
        await r.stall()
        resumed = anyio.current_time()
        await r.slot_answer(resumed, SlotRenewal.RENEWED)  # taken back before or by now
        assert isinstance(r.gc, RedisGlobalConfig)
        assert (await r.gc.flow_state())[KEY]["held"] == 1
        second = await r.add("limited", "b")
        assert await deferred_or_started(r, "b"), "b started while a still runs"
        await r.end_one_at_a_time(first, second)


async def test_a_slot_taken_meanwhile_is_taken_back_past_the_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Review r18 #2, the key full: the global config lost the slot of a running task (a
    failover: its keys gone) and another run took it. The renewal takes it back past the
    limit and says so; no new run of the key starts until both have ended, not as soon as the
    other one does (before, the slot was never taken back: the next message ran alongside)."""
    caplog.set_level(logging.INFO, logger="qtasks.flow")
    async with rig(tmp_path) as r:
        first = await r.add("limited", "a")
        await r.wait_started("a")
        assert isinstance(r.gc, RedisGlobalConfig)
        client = redis.Redis(port=r.server.port)
        leases = f"{{{r.prefix}:flow}}:{KEY}"
        seconds, micros = client.time()
        with client.pipeline(transaction=True) as lose_and_take:  # one step: no renewal between
            lose_and_take.delete(leases)
            lose_and_take.zadd(leases, {"other/run": seconds * 1000 + micros / 1000 + 60_000})
            lose_and_take.execute()
        client.close()
        lost = anyio.current_time()
        await r.slot_answer(lost, SlotRenewal.OVER_LIMIT)
        assert (await r.gc.flow_state())[KEY]["held"] == 2
        second = await r.add("limited", "b")
        assert await deferred_or_started(r, "b"), "b started over the limit"
        await r.gc.release_slot(KEY, "other/run")  # the other run ends; a still runs
        freed = anyio.current_time()
        await r.slot_answer(freed, SlotRenewal.RENEWED)
        assert await deferred_or_started(r, "b"), "b started while a still runs"
        await r.end_one_at_a_time(first, second)
    assert any("runs over its max_concurrency=1" in m for m in caplog.messages)
    assert any("is back within its max_concurrency=1" in m for m in caplog.messages)
