"""qtasks apps on the RabbitMQ broker, with real worker processes where crashes are involved."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import anyio
import pytest

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks.components import DeadLetter
from qtasks.record import TaskStatus
from qtasks_rabbitmq import RabbitMQBroker
from qtasks_rabbitmq.topology import QueueType
from qtasks_redis import RedisStorage

from .conftest import URL, BrokerFactory, close_connections, poll

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq, pytest.mark.slow]

WORKER = Path(__file__).with_name("worker_app.py")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def wait_for_lines(path: Path, count: int, timeout: float) -> list[str]:
    """Poll a file another process appends to (no cross-process event to wait on)."""

    async def enough() -> list[str] | None:
        found = lines(path)
        return found if len(found) >= count else None

    return await poll(enough, timeout)


class Workers:
    """Worker subprocesses on one queue; all are killed at the end of the test."""

    def __init__(self, queue: str, out: Path) -> None:
        self.queue, self.out = queue, out
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log: Path | None = None
        """A file the workers' output goes to (else the test's own)."""

    def start(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        """A worker; ``args`` follow the queue and directory (a Redis URL and prefix),
        ``env`` is added to its environment."""
        root = Path(__file__).parents[2]
        path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, **env}
        with contextlib.ExitStack() as files:
            out = None if self.log is None else files.enter_context(self.log.open("ab"))
            proc = subprocess.Popen(
                [sys.executable, str(WORKER), self.queue, str(self.out), *args],
                env=env,
                cwd=root,
                stdout=out,
                stderr=None if out is None else subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.fixture
def workers(queue_name: str, tmp_path: Path, make_broker: BrokerFactory) -> Iterator[Workers]:
    # make_broker is requested so that the queue's topology is deleted after the test.
    group = Workers(queue_name, tmp_path)
    try:
        yield group
    finally:
        group.stop_all()


def producer(queue: str) -> AsyncQueueTasks:
    """An app that only enqueues (no worker), on the test's queue."""
    return AsyncQueueTasks(broker=RabbitMQBroker(URL, queue=queue))


async def test_kill_9_mid_task_is_redelivered_to_another_worker(
    workers: Workers, queue_name: str, tmp_path: Path, make_broker: BrokerFactory
) -> None:
    broker = await make_broker()  # declares the queue; the fixture deletes it afterwards
    first = workers.start()
    app = producer(queue_name)
    try:
        await app.add_task("slow", "k", 2.0)
        [started] = await wait_for_lines(tmp_path / "started", 1, 30)
        assert started == f"k {first.pid}"
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        second = workers.start()
        [done] = await wait_for_lines(tmp_path / "done", 1, 60)
        assert done == f"k {second.pid}"
        assert lines(tmp_path / "started") == [f"k {first.pid}", f"k {second.pid}"]
    finally:
        await app.aclose()
    stats = await broker.stats()
    assert stats.ready_by_priority == {}
    assert stats.dead_letters == 0


async def test_a_task_whose_every_worker_is_killed_ends_dead_lettered(
    workers: Workers,
    queue_name: str,
    tmp_path: Path,
    make_broker: BrokerFactory,
    redis_url: str,
    prefix: str,
) -> None:
    """kill -9 of the worker running the task, on each of its ``max_deliveries`` deliveries:
    the next worker's consumer dead-letters the message and, told so by the broker
    (``BuryNotice``), ends its record ``error``, so a waiter gets the error instead of
    waiting on a record that says ``process`` for ever. The ended record keeps its last run
    (when it began, on which worker), as a claim that ends it on Redis does."""
    await make_broker()  # declares the queue; the fixture deletes it afterwards
    limit = 2
    app = AsyncQueueTasks(
        broker=RabbitMQBroker(URL, queue=queue_name), storage=RedisStorage(redis_url, prefix=prefix)
    )
    try:
        task = await app.add_task("slow", "k", 600.0)
        for n in range(1, limit + 1):
            worker = workers.start(redis_url, prefix, WORKER_MAX_DELIVERIES=str(limit))
            started = await wait_for_lines(tmp_path / "started", n, 30)
            assert started[-1] == f"k {worker.pid}"
            running = await app.get(task.uuid)
            assert running is not None and running.status == TaskStatus.PROCESS
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
        workers.start(redis_url, prefix, WORKER_MAX_DELIVERIES=str(limit))
        ended = await app.wait(task.uuid, timeout=60)
        assert ended.status == TaskStatus.ERROR
        assert ended.error is not None and ended.error.startswith("dead-lettered: "), ended.error
        assert str(limit) in ended.error, "the reason names the limit"
        assert running is not None  # the record of the last run, read before its kill
        assert (ended.started_at, ended.worker) == (running.updated_at, running.worker)
        letters = await app.dead_letters()
        assert [letter.id for letter in letters] == [task.uuid]
        assert ended.error == f"dead-lettered: {letters[0].reason}"
        assert len(lines(tmp_path / "started")) == limit, "it ran again after the limit"
    finally:
        await app.aclose()


async def test_connection_closed_under_load_every_confirmed_enqueue_runs(
    workers: Workers, queue_name: str, tmp_path: Path, make_broker: BrokerFactory
) -> None:
    await make_broker()
    workers.start()
    app = producer(queue_name)
    n = 300
    try:
        async with anyio.create_task_group() as tg:

            async def chaos() -> None:
                await wait_for_lines(tmp_path / "done", 20, 30)
                for _ in range(2):
                    await anyio.to_thread.run_sync(close_connections, queue_name)
                    await anyio.sleep(0.5)

            tg.start_soon(chaos)
            for i in range(n):
                await app.add_task("record", i)  # returns only once RabbitMQ confirmed it
        done = await wait_for_lines(tmp_path / "done", n, 90)
        assert set(map(int, done)) == set(range(n)), "a confirmed enqueue never ran"
    finally:
        await app.aclose()


async def test_poison_messages_are_dead_lettered_and_the_worker_keeps_serving(
    make_broker: BrokerFactory, queue_name: str
) -> None:
    broker = await make_broker()
    app_broker = RabbitMQBroker(URL, queue=queue_name)
    app = AsyncQueueTasks(broker=app_broker, config=QueueConfig(max_tasks_process=2))
    seen: list[int] = []

    @app.task
    async def fine(i: int) -> int:
        seen.append(i)
        return i

    poison = {
        "bad-body": b"\x00\xff definitely not json",
        "unknown-task": json.dumps(
            {"uuid": "u1", "task": "no_such_task", "args": [], "kwargs": {}}
        ).encode(),
        "missing-fields": json.dumps({"task": "fine"}).encode(),
        # Runnable but for its version: it ran (seen == [8, 7]), its fields read as version 1's.
        "future-version": json.dumps(
            {"v": 7, "uuid": "u2", "task": "fine", "args": [8], "kwargs": {}}
        ).encode(),
    }
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        for name, body in poison.items():
            await channel.default_exchange.publish(
                aio_pika.Message(body, message_id=name), broker.topology.queue
            )
    async with app:
        task = await app.add_task("fine", 7, timeout=20)
        assert task.status == TaskStatus.SUCCESS
        assert task.returning == 7

        async def all_dead() -> list[DeadLetter] | None:
            letters = await app.dead_letters()
            return letters if len(letters) >= len(poison) else None

        letters = await poll(all_dead, 20)
    reasons = {letter.id: letter.reason for letter in letters}
    assert set(reasons) == set(poison)
    assert reasons["bad-body"].startswith("undecodable message")
    assert "no_such_task" in reasons["unknown-task"]
    assert "uuid" in reasons["missing-fields"]
    assert reasons["future-version"] == (
        "undecodable message: unsupported message version 7 (this qtasks reads version 1)"
    )
    assert seen == [7]


async def test_priorities_delays_and_retry_backoff(
    make_broker: BrokerFactory, queue_name: str
) -> None:
    await make_broker()
    order: list[int] = []
    tries: list[float] = []

    app = AsyncQueueTasks(
        broker=RabbitMQBroker(URL, queue=queue_name),
        config=QueueConfig(max_tasks_process=1, prefetch=1),
    )

    @app.task
    async def ordered(i: int) -> None:
        order.append(i)

    @app.task(retry=2, retry_backoff=0.4)
    async def flaky() -> str:
        tries.append(time.monotonic())
        if len(tries) < 3:
            raise RuntimeError(f"failure {len(tries)}")
        return "ok"

    try:
        # Enqueued before the worker starts, so the broker orders them.
        for priority in (5, 1, 9, 0, 3):
            await app.add_task("ordered", priority, priority=priority)
        async with app:

            async def all_ran() -> bool:
                return len(order) == 5

            await poll(all_ran, 20)
            assert order == [0, 1, 3, 5, 9]

            start = time.time()
            delayed = await app.add_task("ordered", 42, delay=0.6)
            result = await delayed.wait_result(timeout=20)
            assert result.status == TaskStatus.SUCCESS
            assert result.updated_at - start >= 0.6

            task = await app.add_task("flaky", timeout=30)
            assert task.status == TaskStatus.SUCCESS, task.error
            assert len(tries) == 3
            # equal jitter: retry k waits at least half of 0.4 * 2**(k-1)
            assert tries[1] - tries[0] >= 0.2
            assert tries[2] - tries[1] >= 0.4
    finally:
        await app.aclose()


async def consumers_of(queue: str) -> int:
    """How many consumers RabbitMQ counts on ``queue`` (a passive declare)."""
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        result = declared.declaration_result
        return int(result.consumer_count or 0)


@pytest.mark.reliability
# Classic queues only: on a quorum queue RabbitMQ (3.10 here) may still give a message to a
# consumer after its basic.cancel while it holds unacked messages, and return it counted
# (rabbitmq-server#3729), so a message handed back beside a suspect can come back counted
# once: the guarantee is not given there, a limit said in docs/rabbitmq.md.
@pytest.mark.parametrize("queue_type", ["classic"])
async def test_a_task_that_kills_its_worker_takes_no_innocent_with_it(
    workers: Workers,
    queue_name: str,
    tmp_path: Path,
    make_broker: BrokerFactory,
    redis_url: str,
    prefix: str,
    queue_type: QueueType,
) -> None:
    """A task that SIGKILLs its worker process every time it runs, among 300 no-op tasks, on
    two workers (concurrency 5, prefetch 5, max_deliveries 3) that the test restarts when
    they die. The poison runs exactly max_deliveries times and is dead-lettered with the
    delivery-limit reason; every other task succeeds and none is dead-lettered.

    Before the consumer kept suspects apart, the messages RabbitMQ had pushed to a killed
    worker (its prefetch) and those it ran came back counted, met the poison again on its
    next deliveries, and a few were dead-lettered beside it."""
    limit, n, poison = 3, 300, 1_000_000
    await make_broker(max_deliveries=limit, queue_type=queue_type)  # deleted afterwards
    env = {
        "WORKER_MAX_DELIVERIES": str(limit),
        "WORKER_CONCURRENCY": "5",
        "WORKER_PREFETCH": "5",
        "WORKER_QUEUE_TYPE": queue_type,
    }
    app = AsyncQueueTasks(
        broker=RabbitMQBroker(URL, queue=queue_name, queue_type=queue_type),
        storage=RedisStorage(redis_url, prefix=prefix),
        config=QueueConfig(max_deliveries=limit),
    )

    @app.task
    async def record(i: int) -> int:  # run by the workers only
        return i

    @app.task
    async def suicide(i: int) -> None:  # run by the workers only
        return None

    live = [workers.start(redis_url, prefix, **env) for _ in range(2)]
    restarts = 0
    try:

        async def both_consume() -> bool:
            return await consumers_of(queue_name) >= 2

        await poll(both_consume, 30)
        # In one publish, the poison among the first: pushed to a worker with others.
        signatures = [app.signature("record", (i,)) for i in range(n)]
        signatures.insert(3, app.signature("suicide", (poison,)))
        tasks = await app.add_tasks(signatures)
        bad = tasks.pop(3)

        async def done() -> bool:
            dead = len(await app.dead_letters())
            return dead > 0 and (await app.storage.stats()).get("success", 0) + dead >= n + 1

        with anyio.fail_after(90):
            while not await done():
                for at, proc in enumerate(live):
                    if proc.poll() is not None:  # killed by the poison: restart it
                        live[at] = workers.start(redis_url, prefix, **env)
                        restarts += 1
                await anyio.sleep(0.05)
        letters = await app.dead_letters()
        assert [letter.id for letter in letters] == [bad.uuid], [
            (letter.id, letter.reason) for letter in letters
        ]
        assert "delivery limit" in letters[0].reason, letters[0].reason
        runs = lines(tmp_path / "killed")
        assert len(runs) == limit, f"the poison ran {len(runs)} times: {runs}"
        assert restarts >= limit - 1
        assert set(map(int, lines(tmp_path / "done"))) == set(range(n)), "a task never ran"
        for task in tasks:
            stored = await app.storage.get(task.uuid)
            assert stored is not None and stored.status is TaskStatus.SUCCESS, stored
        ended = await app.wait(bad.uuid, timeout=10)
        assert ended.status is TaskStatus.ERROR, ended
    finally:
        await app.aclose()
