"""Flow control on Redis (and a RabbitMQ broker with the Redis global config), with real worker
processes: the rate over any second, the concurrency per key, a killed slot holder, unique adds
from several processes, expiry, and flow requeues that are not delivery attempts."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from amqp_cleanup import URL as RABBITMQ_URL
from amqp_cleanup import delete_topology
from flow_app import BURST, PER_KEY, build
from flow_backlog import (
    a_backlog_keeps_every_slot_busy,
    a_burst_is_not_starved_by_steady_traffic,
    a_freed_slot_goes_to_a_waiter_at_once,
)
from flow_windows import earliest_starts, max_in_window, max_overlap
from sync_threads import a_slot_is_kept_while_its_thread_runs

from qtasks import AsyncQueueTasks, QueueConfig, TaskRecord, TaskStatus, chain, group
from qtasks.components import FlowControl, SlotRenewal, UniquePublish
from qtasks.errors import TaskArgumentsError, TaskDeclarationError
from qtasks.messages import Message, new_uuid
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

HERE = Path(__file__).parent


class Ledger:
    """The ``<prefix>:ledger`` list the tasks of flow_app.py write."""

    def __init__(self, url: str, prefix: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.key = f"{prefix}:ledger"

    def lines(self) -> list[tuple[str, int, str, float, int]]:
        out = []
        for raw in self.client.lrange(self.key, 0, -1):
            text = raw.decode() if isinstance(raw, bytes) else raw
            event, i, key, at, pid = text.split()
            out.append((event, int(i), key, float(at), int(pid)))
        return out

    async def wait_for(self, count: int, seconds: float) -> None:
        """Until the ledger holds ``count`` lines (a remote count: polled, with a deadline)."""
        with anyio.fail_after(seconds):
            while self.client.llen(self.key) < count:  # noqa: ASYNC110 - a remote count
                await anyio.sleep(0.2)


class Workers:
    """flow_app.py worker processes, each in its own process group."""

    def __init__(self, url: str, prefix: str, tmp: Path, **env: str) -> None:
        self.env = {
            **os.environ,
            "QT_URL": url,
            "QT_PREFIX": prefix,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
            **env,
        }
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, count: int) -> list[subprocess.Popen[bytes]]:
        started = []
        for _ in range(count):
            log = (self.tmp / f"w{len(self.procs)}.log").open("w")
            proc = subprocess.Popen(
                [sys.executable, str(HERE / "flow_app.py")],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.procs.append(proc)
            started.append(proc)
        return started

    def kill(self, pid: int) -> None:
        os.killpg(pid, signal.SIGKILL)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def logs(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.tmp.glob("w*.log")))


async def serving(app: AsyncQueueTasks, count: int, seconds: float = 60) -> None:
    """Until ``count`` workers heartbeat through the app's global config."""
    with anyio.fail_after(seconds):
        while len(await app.global_config.workers()) < count:  # noqa: ASYNC110 - remote
            await anyio.sleep(0.1)


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "rabbitmq":
        request.getfixturevalue("rabbitmq_url")  # skips locally / fails under CI when down
    return str(request.param)


@pytest.fixture
async def rig(
    redis_url: str, prefix: str, tmp_path: Path, broker_kind: str
) -> AsyncIterator[tuple[AsyncQueueTasks, Workers, Ledger]]:
    """A producer app, a pool of flow_app workers (none started) and the ledger."""
    queue = f"flow-{prefix}"
    rabbitmq = RABBITMQ_URL if broker_kind == "rabbitmq" else ""
    app = build(redis_url, prefix, queue=queue, rabbitmq=rabbitmq or None, lease=2.0)
    workers = Workers(
        redis_url, prefix, tmp_path, QT_QUEUE=queue, QT_RABBITMQ=rabbitmq, QT_LEASE="2"
    )
    await app.start()
    try:
        yield app, workers, Ledger(redis_url, prefix)
    finally:
        workers.close()
        await app.aclose()
        if rabbitmq:
            await asyncio.wait_for(delete_topology(queue), 30)
    assert "Traceback" not in workers.logs()


# --- across processes -----------------------------------------------------------------------


@pytest.mark.reliability
async def test_rate_limit_holds_across_three_workers(
    rig: tuple[AsyncQueueTasks, Workers, Ledger], broker_kind: str
) -> None:
    app, workers, ledger = rig
    workers.start(3)
    await serving(app, 3)
    tasks, added = [], []
    for i in range(1000):
        tasks.append(await app.add_task("limited", i))
        added.append(time.time())
    await ledger.wait_for(1000, 60)
    starts = sorted(at for event, _, _, at, _ in ledger.lines() if event == "start")
    assert len(starts) == 1000
    assert len({pid for *_, pid in ledger.lines()}) == 3  # every worker took part
    assert max_in_window(starts) <= 50 + BURST
    rate = (len(starts) - 1) / (starts[-1] - starts[0])
    # The limit holds tasks back, it cannot start them before they are added: the rate is
    # measured against the earliest schedule the limit allows for the tasks as they were
    # added. A quiet machine adds 1,000 tasks in a second or two, so that schedule is 50/s
    # throughout (19.9 s); a loaded one may add them at 25-40/s (the adds are sequential
    # round trips of this process), and the starts then follow the adds.
    allowed = earliest_starts(added, 1 / 50, BURST)
    allowed_span = allowed[-1] - allowed[0]
    print(  # the figures, for the record (pytest -s)
        f"\n{broker_kind}: at most {max_in_window(starts)} starts in any 1 s window "
        f"(limit 50 + burst {BURST}); overall {rate:.2f}/s; {starts[-1] - starts[0]:.2f} s "
        f"for the {allowed_span:.2f} s the limit allows as the tasks were added "
        f"(the adds took {added[-1] - added[0]:.2f} s)"
    )
    assert rate <= 50 * 1.05, rate
    assert starts[-1] - starts[0] <= allowed_span * 1.05, (starts[-1] - starts[0], allowed_span)
    # Every run is the first delivery: the flow requeues were not counted as attempts.
    sample = [await app.get(t.uuid) for t in tasks[::50]]
    assert all(r is not None and (r.status, r.attempt) == (TaskStatus.SUCCESS, 1) for r in sample)
    assert await app.broker.dead_letters() == []


@pytest.mark.reliability
async def test_max_concurrency_per_key_across_three_workers(
    rig: tuple[AsyncQueueTasks, Workers, Ledger],
) -> None:
    app, workers, ledger = rig
    workers.start(3)
    await serving(app, 3)
    for i in range(60):
        await app.add_task("per_customer", i, customer="ab"[i % 2], seconds=0.1)
    await ledger.wait_for(120, 60)
    lines = ledger.lines()
    for customer in "ab":
        started = {i: at for ev, i, key, at, _ in lines if ev == "start" and key == customer}
        ended = {i: at for ev, i, key, at, _ in lines if ev == "end" and key == customer}
        assert len(started) == len(ended) == 30
        spans = [(started[i], ended[i]) for i in started]
        assert max_overlap(spans) == PER_KEY  # reached, never exceeded
    assert await app.broker.dead_letters() == []


@pytest.mark.reliability
async def test_a_killed_slot_holder_frees_its_slot_within_the_lease(
    rig: tuple[AsyncQueueTasks, Workers, Ledger],
) -> None:
    app, workers, ledger = rig
    # The waiter bounces between the broker and the workers until the slot frees; the kill
    # may catch it in the holder's hands (claimed, not started). That delivery counts
    # (``max_deliveries`` counts crashes), so the limit leaves room for it: it is redelivered
    # when its own lease ends, as soon as the slot's. The holder, redelivered too, has expired
    # by then (3 s; the kill comes more than 4 s after its start) and does not take the slot.
    workers.env["QT_MAX_DELIVERIES"] = "3"
    workers.start(2)
    await serving(app, 2)
    first = await app.add_task("exclusive", 1, customer="k", seconds=120, expires=3)
    await ledger.wait_for(1, 30)
    holder = ledger.lines()[0][4]
    waiter = await app.add_task("exclusive", 2, customer="k", seconds=0.1)
    # The second run waits for the slot: nothing more starts while the holder lives.
    with anyio.move_on_after(2 * 2.0):
        await ledger.wait_for(2, 10)
    assert [line[:3] for line in ledger.lines()] == [("start", 1, "k")]
    killed_at = time.time()
    workers.kill(holder)
    await ledger.wait_for(2, 15)
    after = ledger.lines()[1]
    assert after[:3] == ("start", 2, "k") and after[4] != holder
    # The slot's lease (2 s) was renewed at most lease/3 before the kill; the waiter tries
    # again no later than the lease's end, plus a broker round of delivery.
    assert after[3] - killed_at <= 2.0 + 1.5, after[3] - killed_at
    done = await waiter.wait_result(timeout=15)
    assert done.status is TaskStatus.SUCCESS, done
    assert (await first.wait_result(timeout=15)).status is TaskStatus.EXPIRED


async def test_ten_concurrent_adds_with_one_key_from_three_processes_make_one_task(
    rig: tuple[AsyncQueueTasks, Workers, Ledger], redis_url: str, prefix: str, broker_kind: str
) -> None:
    # Redis broker: the claim is folded into the publish script (UniquePublish); RabbitMQ
    # broker: claimed in the global config first.
    app, _, _ = rig
    go = time.time() + 3.0
    rabbitmq = RABBITMQ_URL if broker_kind == "rabbitmq" else ""
    script = f"""
import sys, time, anyio
sys.path.insert(0, {str(HERE)!r})
from flow_app import build
async def main():
    app = build({redis_url!r}, {prefix!r}, queue="flow-{prefix}", rabbitmq={rabbitmq!r} or None)
    await app.start()
    time.sleep(max({go} - time.time(), 0))  # all processes add at the same moment
    uuids = []
    async def add():
        task = await app.add_task("per_customer", 1, customer="c", seconds=0.0,
                                  unique_key="order-42")
        uuids.append(task.uuid)
    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(add)
    print(" ".join(uuids))
    await app.aclose()
anyio.run(main)
"""
    outputs: list[str] = []

    async def add_from_a_process() -> None:
        done = await anyio.run_process([sys.executable, "-c", script], check=True)
        outputs.append(done.stdout.decode())

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(add_from_a_process)
    uuids = [u for out in outputs for u in out.split()]
    assert len(uuids) == 30
    assert len(set(uuids)) == 1
    assert await app.storage.stats() == {"new": 1}
    assert sum((await app.broker.stats()).ready_by_priority.values()) == 1
    folded = isinstance(app.broker, UniquePublish)
    assert folded == (broker_kind == "redis")


# --- in process -------------------------------------------------------------------------------


@pytest.fixture
async def local(redis_url: str, prefix: str) -> AsyncIterator[AsyncQueueTasks]:
    app = on_redis(redis_url, prefix, QueueConfig(max_deliveries=1, lease=5))
    yield app
    await app.aclose()


def on_redis(redis_url: str, prefix: str, config: QueueConfig) -> AsyncQueueTasks:
    """An app whose three components are on Redis (broker and storage share the server, so
    the worker begins records on claim)."""
    return AsyncQueueTasks(
        "flow",
        broker=RedisBroker(redis_url, prefix=prefix),
        storage=RedisStorage(redis_url, prefix=prefix),
        global_config=RedisGlobalConfig(redis_url, prefix=prefix),
        config=config,
    )


def test_the_redis_global_config_has_flow_control() -> None:
    assert isinstance(RedisGlobalConfig(), FlowControl)


async def test_a_slot_key_keeps_its_ttl_while_its_holders_renew(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    # The lease ZSET must have a TTL from the first acquire on, and each renewal must push it
    # out again: otherwise it expires under holders that run longer than the TTL with no new
    # acquire, and the next tasks of the key find no holder at all.
    gc = RedisGlobalConfig(redis_url, prefix=prefix)
    await gc.start(stack, QueueConfig())
    client = redis.Redis.from_url(redis_url)
    slot = "slots:sync:acme"
    base = f"{{{prefix}:flow}}:{slot}"
    leases, since, meta = base, f"{base}:s", f"{base}:m"
    ttl = 600_000  # max(2 * lease, 600 s) in ms
    assert await gc.acquire_slot(slot, 2, "a", 30.0) == 0
    assert ttl - 2_000 < client.pttl(leases) <= ttl  # the first acquire's own ZADD
    assert await gc.acquire_slot(slot, 2, "b", 30.0) == 0
    for key in (leases, since, meta):  # as if ~600 s had passed with no acquire
        client.pexpire(key, 1_000)
    renewed = SlotRenewal.RENEWED
    assert await gc.extend_slots([(slot, "a"), (slot, "b")], 30.0) == [renewed, renewed]
    for key in (leases, since, meta):
        assert ttl - 2_000 < client.pttl(key) <= ttl, key
    assert await gc.acquire_slot(slot, 2, "c", 30.0) > 0  # both slots still held


async def test_flow_state_survives_a_rate_stored_with_a_zero_interval(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    # An older release rounded the interval of a rate above 2,000,000/s to "0.000" ms (no
    # limit at all); dividing by it made flow_state (qtasks inspect) fail for every key. Such
    # a rate is refused at declaration now; one left in Redis must not break the report.
    gc = RedisGlobalConfig(redis_url, prefix=prefix)
    await gc.start(stack, QueueConfig())
    assert await gc.reserve_rate("rate:huge", 1e-7, 1, None) == 0
    assert await gc.reserve_rate("rate:fine", 1.0, 1, None) == 0
    client = redis.Redis.from_url(redis_url)
    client.hset(f"{{{prefix}:flow}}:rate:huge", "i", "0.000")
    state = await gc.flow_state()
    assert state["rate:fine"]["per_second"] == pytest.approx(1)
    assert state["rate:huge"]["burst"] == 1


async def test_a_sync_thread_given_up_on_keeps_its_slot_on_redis(
    redis_url: str, prefix: str
) -> None:
    # Past its max_time the task's record is final; its thread runs on and keeps the slot
    # (renewed in Redis past the lease) until it returns.
    app = on_redis(redis_url, prefix, QueueConfig(lease=1.0))
    try:
        await a_slot_is_kept_while_its_thread_runs(app, "max_time")
    finally:
        await app.aclose()


async def test_rate_requeues_are_not_attempts_and_expiry_on_redis(local: AsyncQueueTasks) -> None:
    app = local
    starts: list[float] = []

    @app.task(rate_limit="40/s")
    async def limited(i: int) -> int:
        starts.append(time.monotonic())
        return i

    @app.task
    def late() -> None: ...

    async with app:
        tasks = [await app.add_task("limited", i) for i in range(20)]
        expired = await app.add_task("late", delay=0.3, expires=0.1)
        records = [await app.wait(t.uuid, timeout=10) for t in tasks]
        assert (await app.wait(expired.uuid, timeout=5)).status is TaskStatus.EXPIRED
        state = await app.global_config.flow_state()  # type: ignore[attr-defined]
        stats = await app.storage.stats()
    # max_deliveries=1: one counted redelivery would have dead-lettered a task.
    assert [(r.status, r.attempt) for r in records] == [(TaskStatus.SUCCESS, 1)] * 20
    assert max_in_window(starts, 0.5) <= 20 + 1
    assert 19 * 0.025 * 0.9 <= max(starts) - min(starts) <= 19 * 0.025 * 1.5
    assert stats == {"success": 20, "expired": 1}
    assert state["rate:limited"]["per_second"] == pytest.approx(40)
    assert 0 <= state["rate:limited"]["tokens"] <= 1


async def test_a_backlog_keeps_every_slot_busy_on_redis(local: AsyncQueueTasks) -> None:
    await a_backlog_keeps_every_slot_busy(local)


async def test_a_burst_of_waiters_is_not_starved_on_redis(local: AsyncQueueTasks) -> None:
    await a_burst_is_not_starved_by_steady_traffic(local)


async def test_a_freed_slot_goes_to_a_waiter_at_once_on_redis(local: AsyncQueueTasks) -> None:
    await a_freed_slot_goes_to_a_waiter_at_once(local)


async def test_a_held_message_s_record_says_new_until_it_runs(local: AsyncQueueTasks) -> None:
    # The Redis broker begins records on claim ('process'); a message held by flow control
    # goes back to 'new', with the moment it is due as its eta.
    app = local

    @app.task(rate_limit="1/m")
    async def rare(i: int) -> int:
        return i

    async with app:
        first = await app.add_task("rare", 1)
        assert (await app.wait(first.uuid, timeout=5)).status is TaskStatus.SUCCESS
        held = await app.add_task("rare", 2)
        with anyio.fail_after(5):
            while True:  # a remote record: looked at until the worker held the message
                record = await app.get(held.uuid)
                assert record is not None
                if record.eta is not None:
                    break
                await anyio.sleep(0.02)
        assert record.status is TaskStatus.NEW
        assert 50 < record.eta - time.time() <= 60


async def test_the_unique_claim_is_folded_into_the_publish_script(local: AsyncQueueTasks) -> None:
    app = local

    @app.task
    async def send(to: str) -> str:
        return to

    await app.start()
    broker, gc = app.broker, app.global_config
    assert isinstance(broker, UniquePublish) and isinstance(gc, FlowControl)
    assert broker.shares_server_with_config(gc)
    results: list[str] = []

    async def add(to: str) -> None:
        results.append((await app.add_task("send", to, unique_key="k")).uuid)

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(add, str(i))
    assert len(set(results)) == 1
    # One script claims, stores and publishes: a held key writes nothing at all.
    message = Message(uuid=new_uuid(), task_name="send", args=["x"])
    record = TaskRecord(uuid=message.uuid, task_name="send", args=["x"])
    envelope = app.codec.encode(message)
    held = await broker.publish_new_unique(
        envelope, app.storage, record, gc, ("unique:k", "other@0@", None, None)
    )
    assert held is not None and held.startswith(results[0])
    assert await app.storage.get(message.uuid) is None
    assert await app.storage.stats() == {"new": 1}
    assert sum((await broker.stats()).ready_by_priority.values()) == 1
    # Claimed: the record and the message are written with it.
    assert (
        await broker.publish_new_unique(
            envelope, app.storage, record, gc, ("unique:k2", "mine@0@", None, None)
        )
        is None
    )
    assert await gc.claim_unique("unique:k2", "x", None) == "mine@0@"
    assert await app.storage.stats() == {"new": 2}


async def test_a_unique_publish_sent_again_after_the_task_ended_claims_nothing(
    local: AsyncQueueTasks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unique claim and publish re-sent (its reply lost) after the task ran and its
    worker freed the key: the second run claimed the key again for a task that is over (no
    one frees it now) and set the task back to ``new``."""
    app = local
    await app.start()
    broker, storage, gc = app.broker, app.storage, app.global_config
    assert isinstance(broker, RedisBroker) and isinstance(storage, RedisStorage)
    assert isinstance(gc, RedisGlobalConfig)
    sent: list[tuple[Any, ...]] = []
    plain = broker._run_call

    async def recorded(*call: Any) -> Any:
        sent.append(call)
        return await plain(*call)

    monkeypatch.setattr(broker, "_run_call", recorded)
    message = Message(uuid=new_uuid(), task_name="send", args=["x"])
    record = TaskRecord(uuid=message.uuid, task_name="send", args=["x"])
    claim = ("unique:k3", "mine@0@", None, None)
    envelope = app.codec.encode(message)
    assert await broker.publish_new_unique(envelope, storage, record, gc, claim) is None
    async with broker.consume(prefetch=1) as deliveries:
        with anyio.fail_after(3):
            delivery = await deliveries.__anext__()
        record.status, record.token, record.returning = TaskStatus.SUCCESS, delivery.token, "sent"
        assert await broker.ack_final(delivery, storage, record)
    assert await gc.release_unique("unique:k3", "mine@0@")
    assert await plain(*sent[0]) == 1  # the first run's reply: claimed and published
    stored = await storage.get(message.uuid)
    assert stored is not None and (stored.status, stored.returning) == (TaskStatus.SUCCESS, "sent")
    assert sum((await broker.stats()).ready_by_priority.values()) == 0
    assert await gc.claim_unique("unique:k3", "next@0@", None) is None  # the key is free


def test_max_overlap_counts_an_end_before_a_start_at_a_tie() -> None:
    assert max_overlap([(0, 1), (1, 2)]) == 1
    assert max_in_window([0.0, 0.5, 0.99, 1.0]) == 3


async def test_a_workflow_step_s_concurrency_key_is_of_its_input(local: AsyncQueueTasks) -> None:
    # A chain step's first argument is its predecessor's result, read when it starts: its
    # concurrency key is of that value (the message carries only a placeholder), and a step
    # without an input has its key checked when the workflow is run, as add_task does.
    app = local

    @app.task
    async def pick(name: str) -> str:
        return name

    @app.task(concurrency_key="account", max_concurrency=1)
    async def sync_account(account: str, n: int) -> str:
        return f"{account}:{n}"

    @app.task(concurrency_key=lambda account, **_: ("acct", account), max_concurrency=1)
    async def by_function(account: str) -> str:
        return account

    async with app:
        flow = chain(pick.s("acme"), group(sync_account.s(1), by_function.s()))
        state = await app.wait_workflow((await app.run_workflow(flow)).id, timeout=10)
        assert (state.status, state.result, state.error) == ("success", ["acme:1", "acme"], None)
        keys = await app.global_config.flow_state()  # type: ignore[attr-defined]
        assert {"slots:sync_account:acme", "slots:by_function:acct:acme"} <= set(keys)
        with pytest.raises(TaskArgumentsError, match="concurrency_key gave"):
            await app.run_workflow(chain(sync_account.s(["not", "a", "key"], 1), pick.s()))


async def test_unique_for_on_the_task_holds_the_key_past_the_end(local: AsyncQueueTasks) -> None:
    # @app.task(unique_key=..., unique_for=...) holds each add's key for unique_for, final or
    # not, as add_task(unique_for=...) does; it was taken for an unknown option and dropped,
    # so a second add after the first ended ran the work again.
    app = local
    runs: list[str] = []

    @app.task(unique_key=lambda order, **_: f"receipt:{order}", unique_for=3600)
    async def send_receipt(order: str) -> None:
        runs.append(order)

    async with app:
        first = await send_receipt.add_task("order-7")
        assert (await first.wait_result(timeout=5)).status is TaskStatus.SUCCESS
        again = await send_receipt.add_task("order-7")
        short = await send_receipt.add_task("order-8", unique_for=0.1)  # add_task's wins
        await short.wait_result(timeout=5)
    assert again.uuid == first.uuid
    assert runs == ["order-7", "order-8"]
    assert send_receipt.options.extra == {}
    with pytest.raises(TaskDeclarationError, match="unique_for expects seconds > 0"):

        @app.task(unique_key=lambda order, **_: order, unique_for=0)
        async def bad(order: str) -> None: ...
