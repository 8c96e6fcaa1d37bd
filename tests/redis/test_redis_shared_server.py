"""RedisBroker as a SharedServer: enqueue and the final save + ack folded into one script each
when the storage is on the same server, with the same fencing as the plain path; an enqueue
script sent again (its reply lost) writes nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from begin_scenarios import (
    HoldClaim,
    cancel_while_waiting,
    cancelled_while_telling,
    claim_as_the_worker_stops,
    count_begins,
    lost_deliveries_are_told_once,
    publish_as_the_worker_stops,
    watch_put_backs,
)
from fault_fixtures import FaultRig
from fence_scenarios import late_result_after_a_shutdown_hand_back
from redis_worker_app import build

from qtasks import AsyncQueueTasks, MemoryStorage, TaskStatus, hookimpl
from qtasks.components import BeginOnClaim, RecordQuery, SharedServer
from qtasks.config import QueueConfig
from qtasks.errors import ComponentError, TaskArgumentsError
from qtasks.messages import Codec, Envelope, Message
from qtasks.record import TaskRecord
from qtasks.worker import QueueWorker
from qtasks_redis import RedisBroker, RedisDelivery, RedisStorage
from qtasks_redis import broker as broker_module
from qtasks_redis.connection import Script
from qtasks_redis.lane import Lane, _Conn

pytestmark = pytest.mark.anyio


def test_shares_server_only_with_a_redis_storage_on_the_same_server() -> None:
    url = "redis://user:secret@127.0.0.1:6379/2"
    broker = RedisBroker(url)
    assert isinstance(broker, SharedServer)
    assert broker.shares_server_with(RedisStorage(url, prefix="other"))
    assert not broker.shares_server_with(RedisStorage("redis://user:secret@127.0.0.1:6379/3"))
    assert not broker.shares_server_with(RedisStorage("redis://user:other@127.0.0.1:6379/2"))
    assert not broker.shares_server_with(RedisStorage("redis://user:secret@127.0.0.1:6380/2"))
    assert not broker.shares_server_with(RedisStorage("rediss://user:secret@127.0.0.1:6379/2"))
    assert not broker.shares_server_with(MemoryStorage())
    cluster = "redis+cluster://127.0.0.1:7000"
    assert not RedisBroker(cluster).shares_server_with(RedisStorage(cluster))


async def parts(
    stack: AsyncExitStack, url: str, prefix: str, **config: object
) -> tuple[RedisBroker, RedisStorage]:
    settings = QueueConfig().merged(**config)
    storage = RedisStorage(url, prefix=prefix)
    broker = RedisBroker(url, prefix=prefix, queue="q")
    await storage.start(stack, settings)
    await broker.start(stack, settings)
    assert broker.shares_server_with(storage)
    return broker, storage


def new_record(uuid: str) -> TaskRecord:
    return TaskRecord(uuid=uuid, task_name="t", args=[1], kwargs={"k": "ü"})


async def take(it: AsyncIterator[RedisDelivery]) -> RedisDelivery:
    with anyio.fail_after(3):
        return await it.__anext__()


async def begun(storage: RedisStorage, delivery: RedisDelivery) -> TaskRecord:
    claim = new_record(delivery.id)
    claim.status, claim.token, claim.attempt = TaskStatus.PROCESS, delivery.token, 1
    return await storage.begin(claim)


async def test_publish_new_stores_record_and_message(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    broker, storage = await parts(stack, redis_url, prefix)
    await broker.publish_new(Envelope("a", b"body", priority=2), storage, new_record("a"))
    stored = await storage.get("a")
    assert stored is not None
    assert (stored.status, stored.args, stored.kwargs) == (TaskStatus.NEW, [1], {"k": "ü"})
    assert (await broker.stats()).ready_by_priority == {2: 1}
    assert await storage.stats() == {"new": 1}
    # A delayed one is scheduled as publish() would.
    await broker.publish_new(Envelope("b", b"x", eta=4e9), storage, new_record("b"))
    assert (await broker.stats()).delayed == 1


async def test_publish_new_many_writes_what_publish_new_writes(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    """A batch of fresh tasks takes the batch's fast path (one write per record); one that
    meets a stored record or a queued message goes task by task. Both leave the keys as
    publish_new does: status indexes, no TTL on a record made new again, a republished message
    replacing the queued one."""
    broker, storage = await parts(stack, redis_url, prefix)
    client = aioredis.from_url(redis_url)
    stack.push_async_callback(client.aclose)
    await broker.publish_new_many(
        storage,
        [
            (new_record("a"), Envelope("a", b"a", priority=1)),
            (new_record("b"), Envelope("b", b"b", eta=4e9)),
        ],
    )
    assert await storage.stats() == {"new": 2}
    stats = await broker.stats()
    assert (stats.ready_by_priority, stats.delayed) == ({1: 1}, 1)
    async with broker.consume(prefetch=1) as it:
        assert await (await take(it)).ack() is True
    done = new_record("a")
    done.status, done.returning = TaskStatus.SUCCESS, "old"
    assert await storage.save(done) is True
    assert await client.pttl(storage._keys("a")[0]) > 0
    # The record of "a" is stored (final, expiring): this batch goes task by task.
    await broker.publish_new_many(
        storage, [(new_record("a"), Envelope("a", b"a2")), (new_record("c"), Envelope("c", b"c"))]
    )
    assert await storage.stats() == {"new": 3}
    assert await client.pttl(storage._keys("a")[0]) == -1
    # "d"'s message is delivered (no record): the batch replaces it, as publish would.
    await broker.publish(Envelope("d", b"d"))
    got = {}
    async with broker.consume(prefetch=10) as it:
        first = [await take(it) for _ in range(3)]
        old_d = next(delivery for delivery in first if delivery.id == "d")
        await broker.publish_new_many(storage, [(new_record("d"), Envelope("d", b"d2"))])
        assert await old_d.ack() is False  # that delivery was replaced
        for delivery in [*first, await take(it)]:
            if delivery is not old_d:
                got[delivery.id] = delivery.body
                await delivery.ack()
    assert await storage.stats() == {"new": 4}
    assert (await broker.stats()).delayed == 1
    assert got == {"a": b"a2", "c": b"c", "d": b"d2"}


async def test_ack_final_saves_then_acks(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    broker, storage = await parts(stack, redis_url, prefix)
    await broker.publish_new(Envelope("a", b"body"), storage, new_record("a"))
    async with broker.consume(prefetch=1) as it:
        delivery = await take(it)
        record = await begun(storage, delivery)
        record.status, record.returning = TaskStatus.SUCCESS, 42
        assert await broker.ack_final(delivery, storage, record)
    stored = await storage.get("a")
    assert stored is not None
    assert (stored.status, stored.returning) == (TaskStatus.SUCCESS, 42)
    stats = await broker.stats()
    assert (stats.in_flight, stats.ready_by_priority, stats.delayed) == (0, {}, 0)
    # The waiter is woken as by a plain save.
    with anyio.fail_after(3):
        assert (await storage.wait("a", 2)).returning == 42


async def test_ack_final_of_a_lost_lease_is_refused(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    broker, storage = await parts(stack, redis_url, prefix, lease=0.2)
    await broker.publish_new(Envelope("a", b"body"), storage, new_record("a"))
    async with broker.consume(prefetch=1) as it:
        stale = await take(it)
        await begun(storage, stale)
        # The lease runs out (not extended); the message is delivered again and begun.
        fresh = await take(it)
        assert (fresh.id, fresh.attempt) == ("a", 2)
        await begun(storage, fresh)
        late = new_record("a")
        late.status, late.token, late.returning = TaskStatus.SUCCESS, stale.token, "stale"
        assert not await broker.ack_final(stale, storage, late)
        stored = await storage.get("a")
        assert stored is not None
        assert (stored.status, stored.token) == (TaskStatus.PROCESS, fresh.token)
        assert (await broker.stats()).in_flight == 1  # the fresh delivery still holds it
        good = new_record("a")
        good.status, good.token, good.returning = TaskStatus.SUCCESS, fresh.token, "fresh"
        assert await broker.ack_final(fresh, storage, good)
    stored = await storage.get("a")
    assert stored is not None
    assert (stored.status, stored.returning) == (TaskStatus.SUCCESS, "fresh")
    assert (await broker.stats()).in_flight == 0


async def test_ack_final_refused_save_leaves_message_unacked(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    broker, storage = await parts(stack, redis_url, prefix)
    await broker.publish_new(Envelope("a", b"body"), storage, new_record("a"))
    async with broker.consume(prefetch=1) as it:
        delivery = await take(it)
        await begun(storage, delivery)
        # Another attempt took the record over (e.g. a requeue elsewhere).
        other = new_record("a")
        other.status, other.token = TaskStatus.PROCESS, "someone-else"
        assert await storage.save(other)
        mine = new_record("a")
        mine.status, mine.token = TaskStatus.SUCCESS, delivery.token
        assert not await broker.ack_final(delivery, storage, mine)
        assert (await broker.stats()).in_flight == 1
        assert await delivery.ack()


async def test_app_folds_enqueue_and_settle(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = build(redis_url, prefix)
    broker, storage = app.broker, app.storage
    assert isinstance(broker, RedisBroker)
    assert isinstance(storage, RedisStorage)
    calls: list[str] = []

    def spy(owner: object, name: str) -> None:
        original = getattr(owner, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return await original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    for name in ("publish_new", "ack_final", "ack_finals", "publish"):
        spy(broker, name)
    for name in ("add", "save"):
        spy(storage, name)
    async with app:
        assert app.shared_server is broker
        task = await app.add_task("noop", 21, timeout=5)
        assert (task.status, task.returning) == (TaskStatus.SUCCESS, 42)
        stats = await broker.stats()
        assert (stats.in_flight, stats.ready_by_priority, stats.delayed) == (0, {}, 0)
    assert calls == ["publish_new", "ack_finals"]


async def test_a_bad_add_tasks_item_after_a_full_batch_stores_nothing(
    redis_url: str, prefix: str
) -> None:
    """With one script per batch, batches overlapping the preparation of the next, the first
    1,000 were stored and queued before item 1500 was found bad; now nothing is."""
    app = build(redis_url, prefix)
    async with app:
        noop = app.tasks["noop"]
        items = [noop.s(i) for i in range(2500)]
        items[1500] = noop.s(1, 2)
        with pytest.raises(TaskArgumentsError, match=r"^add_tasks item 1500: "):
            await app.add_tasks(iter(items))
        assert app.enqueue_path == "shared"
        stats = await app.broker.stats()
        assert (stats.ready_by_priority, stats.delayed) == ({}, 0)
        assert await app.storage.stats() == {}


async def test_add_tasks_builds_a_batch_while_the_one_before_runs(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every item is prepared first; then a batch's script call (its records encoded, its
    arguments packed) was built only once the batch before had ended, so nothing overlapped
    the server's work. Now the broker builds it before it waits for that batch: the second
    batch's records are being encoded before the first batch's hooks fire (they fire once its
    script returned)."""
    app = build(redis_url, prefix)
    events: list[tuple[str, str]] = []
    encode = RedisStorage._encode

    def encoding(record: TaskRecord) -> str:
        events.append(("encoded", record.uuid))
        return encode(record)

    class Added:
        @hookimpl
        def qtasks_storage_added(self, record: TaskRecord) -> None:
            events.append(("added", record.uuid))

    app.add_plugin(Added())
    async with app:
        monkeypatch.setattr(app.storage, "_encode", encoding)
        records = await app.tasks["noop"].add_tasks(range(2500))
        assert app.enqueue_path == "shared"
    first_added = events.index(("added", records[0].uuid))
    second = {r.uuid for r in records[1000:2000]}
    encoded = [i for i, (what, uuid) in enumerate(events) if what == "encoded" and uuid in second]
    assert len(encoded) == 1000
    assert min(encoded) < first_added, "the second batch was built after the first ended"
    assert [u for what, u in events if what == "added"] == [r.uuid for r in records]


async def test_ack_finals_settles_each_pair_on_its_own(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    broker, storage = await parts(stack, redis_url, prefix)
    for uuid in "abc":
        await broker.publish_new(Envelope(uuid, b"body"), storage, new_record(uuid))
    async with broker.consume(prefetch=3) as it:
        got = {d.id: d for d in [await take(it) for _ in range(3)]}
        finals = []
        for uuid in "abc":
            record = await begun(storage, got[uuid])
            record.status, record.returning = TaskStatus.SUCCESS, uuid * 2
            finals.append((got[uuid], record))
        # Another attempt took b's record over: its save is refused, its message stays.
        other = new_record("b")
        other.status, other.token = TaskStatus.PROCESS, "someone-else"
        assert await storage.save(other)
        assert await broker.ack_finals(storage, finals) == [True, False, True]
        assert await broker.ack_finals(storage, []) == []
        stats = await broker.stats()
        assert (stats.in_flight, stats.ready_by_priority) == (1, {})
        assert await got["b"].ack()
    for uuid, status, returning in (
        ("a", TaskStatus.SUCCESS, "aa"),
        ("b", TaskStatus.PROCESS, None),
        ("c", TaskStatus.SUCCESS, "cc"),
    ):
        stored = await storage.get(uuid)
        assert stored is not None
        assert (stored.status, stored.returning) == (status, returning)
    # Waiters of each accepted record are woken as by a plain save.
    with anyio.fail_after(3):
        assert (await storage.wait("c", 2)).returning == "cc"


async def test_ack_finals_forgets_the_acked_messages_in_one_write_per_key(
    rig: FaultRig, prefix: str, stack: AsyncExitStack
) -> None:
    """The acks of a batch delete the messages' queue entries once for the batch (one ZREM
    and four HDEL), not once per message; a delivery given twice is acked once, one whose
    save is refused not at all. A private server, so its command counts are this test's."""
    broker, storage = await parts(stack, rig.direct_url, prefix)
    client = aioredis.Redis.from_url(rig.direct_url)
    stack.push_async_callback(client.aclose)
    for uuid in "abcd":
        await broker.publish_new(Envelope(uuid, b"body"), storage, new_record(uuid))
    async with broker.consume(prefetch=4) as it:
        got = {d.id: d for d in [await take(it) for _ in range(4)]}
        finals = []
        for uuid in "abcd":
            record = await begun(storage, got[uuid])
            record.status = TaskStatus.SUCCESS
            finals.append((got[uuid], record))
        other = new_record("d")  # another attempt took d over: refused, its message stays
        other.status, other.token = TaskStatus.PROCESS, "someone-else"
        assert await storage.save(other)
        await client.config_resetstat()
        assert await broker.ack_finals(storage, [*finals, finals[0]]) == [
            True,
            True,
            True,
            False,
            True,
        ]
        calls = {
            name: stat["calls"]
            for name, stat in (await client.info("commandstats")).items()
            if name in ("cmdstat_hdel", "cmdstat_zrem")
        }
        # The saves' own: an HDEL of the begin's fields and a ZREM from 'process' each of
        # the four written (a's twice); then the acks' five.
        assert calls == {"cmdstat_hdel": 4 + 4, "cmdstat_zrem": 4 + 1}
        stats = await broker.stats()
        assert (stats.in_flight, stats.ready_by_priority) == (1, {})
        assert not await got["a"].ack()
        assert await got["d"].ack()
    assert await client.hlen(broker.keys[3]) == 0  # body


async def test_ack_finals_refuses_a_foreign_delivery(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    broker, storage = await parts(stack, redis_url, prefix)
    other = RedisBroker(redis_url, prefix=prefix, queue="another")
    await other.start(stack, QueueConfig())
    await other.publish_new(Envelope("x", b"body"), storage, new_record("x"))
    async with other.consume(prefetch=1) as it:
        delivery = await take(it)
        with pytest.raises(ComponentError):
            await broker.ack_finals(storage, [(delivery, new_record("x"))])
        assert await delivery.ack()


async def test_consume_begun_begins_records_in_the_claim(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    broker, storage = await parts(stack, redis_url, prefix)
    assert isinstance(broker, BeginOnClaim)
    codec = Codec()
    for uuid, attempt in (("a", 0), ("b", 2)):
        message = Message(uuid=uuid, task_name="t", args=[1], attempt=attempt)
        await broker.publish_new(codec.encode(message), storage, new_record(uuid))
    await broker.publish(Envelope(id="nobody", body=b"no record stored"))
    await broker.publish_new(
        Envelope(id="gone", body=b"\xff not json"), storage, new_record("gone")
    )
    await storage.cancel("gone", "cancelled while queued")
    async with broker.consume_begun(
        prefetch=10, storage=storage, worker="w-1", starts=lambda: 10
    ) as it:
        got = {d.id: d for d in [await take(it) for _ in range(4)]}
    first, retried = got["a"].begun, got["b"].begun
    assert first is not None and retried is not None
    for delivery, record, attempt in ((got["a"], first, 1), (got["b"], retried, 3)):
        assert (record.status, record.token, record.worker, record.attempt) == (
            TaskStatus.PROCESS,
            delivery.token,
            "w-1",
            attempt,
        )
        assert await storage.get(delivery.id) == record  # what is stored, not a guess
    assert got["nobody"].begun is None  # no record: the worker begins it itself
    cancelled = got["gone"].begun
    assert cancelled is not None and cancelled.status is TaskStatus.CANCEL  # final: unchanged
    assert (await storage.stats())["process"] == 2


async def test_the_claim_reads_each_bodys_attempt_as_a_json_parser_does(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    """The claim reads the attempt of the codec's compact bodies without decoding them, and
    decodes any other: an 'attempt' key in the kwargs or headers, a string holding the text,
    a top-level value that is not digits, spaced JSON; the begun attempt is always the parsed
    one plus one."""
    broker, storage = await parts(stack, redis_url, prefix)
    codec = Codec()
    bodies = {
        "plain": codec.encode(Message(uuid="plain", task_name="t", attempt=4)).body,
        "kwarg": codec.encode(
            Message(uuid="kwarg", task_name="t", kwargs={"attempt": 9}, attempt=2)
        ).body,
        "header": codec.encode(
            Message(uuid="header", task_name="t", headers={"attempt": 7}, attempt=1)
        ).body,
        "text": codec.encode(
            Message(uuid="text", task_name="t", args=['"attempt":8'], attempt=3)
        ).body,
        # The one 'attempt' key followed by digits is the header's: not the top-level one.
        "negative": codec.encode(
            Message(uuid="negative", task_name="t", headers={"attempt": 5}, attempt=-1)
        ).body,
        "spaced": json.dumps(
            {"v": 1, "uuid": "spaced", "task": "t", "args": [], "kwargs": {}, "attempt": 5}
        ).encode(),
    }
    for uuid, body in bodies.items():
        await broker.publish_new(Envelope(id=uuid, body=body), storage, new_record(uuid))
    async with broker.consume_begun(
        prefetch=10, storage=storage, worker="w-1", starts=lambda: 10
    ) as it:
        got = {d.id: d.begun for d in [await take(it) for _ in bodies]}
    for uuid, body in bodies.items():
        record = got[uuid]
        assert record is not None and record.attempt == json.loads(body)["attempt"] + 1, uuid


async def test_consume_begun_refuses_a_storage_elsewhere(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    broker, _ = await parts(stack, redis_url, prefix)
    with pytest.raises(ComponentError):
        broker.consume_begun(prefetch=1, storage=MemoryStorage(), worker="w", starts=lambda: 1)


async def test_the_worker_uses_the_claim_time_record_instead_of_a_begin_call(
    redis_url: str, prefix: str
) -> None:
    app = build(redis_url, prefix)
    calls = count_begins(app)
    async with app:
        done = [await app.add_task("noop", i, timeout=5) for i in range(5)]
    assert [(t.status, t.returning, t.attempt) for t in done] == [
        (TaskStatus.SUCCESS, 2 * i, 1) for i in range(5)
    ]
    assert calls == []  # each was begun by the claim that took it
    await app.aclose()


def hold_the_idle_claim(monkeypatch: pytest.MonkeyPatch) -> HoldClaim:
    """The ``hold`` of :func:`begin_scenarios.publish_as_the_worker_stops` for a Redis app:
    its idle claim (a BLPOP then the claim script, in one round trip) blocks on a key of its
    own, so that a publish, whose wake-up goes to the queue's notify list, does not end it;
    only the stop does (the lane cuts the cancelled block short with ``CLIENT UNBLOCK``, or,
    whatever happens, its 5 s cap). The wait returned ends once the server has that claim's
    connection blocked in its BLPOP: a stop from then on reaches the claim while it is
    outstanding, and the claim script runs after the publish (before, a publish and a stop
    in one turn left it to the event loop whether the claim took the message: on CPython
    3.13 it seldom did, and a test then passed having tested nothing or gave up)."""

    def hold(app: AsyncQueueTasks) -> Callable[[], Awaitable[None]]:
        broker = app.broker
        assert isinstance(broker, RedisBroker)
        lane = broker._require()
        assert isinstance(lane, Lane)
        monkeypatch.setattr(broker, "_notify_key", f"{broker._notify_key}:held")
        blocking: list[_Conn] = []
        take_conn = lane._blocking_conn

        async def recorded() -> _Conn:
            conn = await take_conn()
            blocking.append(conn)  # the claim is written on it in this same turn
            return conn

        monkeypatch.setattr(lane, "_blocking_conn", recorded)

        async def outstanding() -> None:
            with anyio.fail_after(5):
                while not blocking or b"cmd=blpop" not in await lane.command(  # noqa: ASYNC110
                    "CLIENT", "LIST", "ID", blocking[-1].client_id
                ):
                    await anyio.sleep(0.001)  # the server's state, asked

        return outstanding

    return hold


async def test_a_claim_woken_as_the_worker_stops_is_handed_back_with_its_record_new(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = build(redis_url, prefix, concurrency=1, prefetch=1)
    await claim_as_the_worker_stops(app, hold_the_idle_claim(monkeypatch))


async def test_a_stale_result_is_refused_after_a_shutdown_hand_back(
    redis_url: str, prefix: str
) -> None:
    app = build(redis_url, prefix, lease=0.5, concurrency=1, prefetch=0, shutdown_grace=0.1)
    await late_result_after_a_shutdown_hand_back(app)


async def test_a_claim_that_dead_letters_lost_deliveries_fires_the_hook_once_each(
    redis_url: str, prefix: str
) -> None:
    await lost_deliveries_are_told_once(
        build(redis_url, prefix, lease=0.3, concurrency=2, max_deliveries=1)
    )


async def test_a_consumer_cancelled_while_telling_tells_once_and_hands_back_its_claim(
    redis_url: str, prefix: str
) -> None:
    await cancelled_while_telling(build(redis_url, prefix, lease=30, max_deliveries=2))


async def test_a_cancel_while_a_delivery_waits_holds_without_any_cancel_notice(
    redis_url: str, prefix: str
) -> None:
    app = build(redis_url, prefix, concurrency=1, prefetch=3)
    await cancel_while_waiting(app, count_begins(app))
    await app.aclose()


async def test_tasks_finishing_together_are_settled_in_shared_calls(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = build(redis_url, prefix, concurrency=20)
    broker = app.broker
    assert isinstance(broker, RedisBroker)
    batches: list[int] = []
    plain = broker.ack_finals

    async def counted(storage: Any, finals: Any) -> list[bool]:
        batches.append(len(finals))
        return await plain(storage, finals)

    monkeypatch.setattr(broker, "ack_finals", counted)
    gate, all_running = anyio.Event(), anyio.Event()
    running: list[int] = []

    @app.task
    async def together(i: int) -> int:
        running.append(i)
        if len(running) == 20:
            all_running.set()
        await gate.wait()  # all 20 end in the same moment
        return i

    tasks = [await app.add_task("together", i) for i in range(20)]
    async with app:
        with anyio.fail_after(5):
            await all_running.wait()
        gate.set()
        done = [await app.wait(t.uuid, timeout=5) for t in tasks]
        stats = await broker.stats()
    assert [(t.status, t.returning) for t in done] == [(TaskStatus.SUCCESS, i) for i in range(20)]
    assert (stats.in_flight, stats.ready_by_priority) == (0, {})
    assert sum(batches) == 20
    assert len(batches) < 20  # settled together, not one call per task


async def test_tasks_that_waited_and_start_together_are_begun_in_shared_calls(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten runners busy, ten more tasks waiting in the worker (their records still queued).
    When the runners free up together, the waiting tasks are begun in shared calls (with the
    settle calls of the tasks that ended: ``ack_finals_begin``), not one round trip each; one
    of them, whose stored record something else overwrote with garbage, fails alone
    (dead-lettered), the others run."""
    app = build(redis_url, prefix, concurrency=10, prefetch=10)
    broker = app.broker
    assert isinstance(broker, RedisBroker)
    batches: list[int] = []
    plain = broker.ack_finals_begin

    async def counted(
        storage: Any, finals: Any, begins: Any, **kw: Any
    ) -> tuple[list[bool], list[TaskRecord | None]]:
        batches.append(len(begins))
        return await plain(storage, finals, begins, **kw)

    monkeypatch.setattr(broker, "ack_finals_begin", counted)
    gate, all_running = anyio.Event(), anyio.Event()
    running: list[int] = []

    @app.task
    async def held(i: int) -> int:
        running.append(i)
        if len(running) == 10:
            all_running.set()
        await gate.wait()
        return i

    @app.task
    async def after(i: int) -> int:
        return -i

    async with app:
        worker = app.worker
        assert isinstance(worker, QueueWorker)
        first = [await app.add_task("held", i) for i in range(10)]
        with anyio.fail_after(5):
            await all_running.wait()
        later = [await app.add_task("after", i) for i in range(10)]
        with anyio.fail_after(5):
            while worker.waiting < 10:  # noqa: ASYNC110 - the worker has no event for this
                await anyio.sleep(0.005)
        garbled = later[3].uuid
        raw = aioredis.Redis.from_url(redis_url)
        try:
            await raw.hset(f"{{{prefix}:rec}}:r:{garbled}", "d", "{not json")
        finally:
            await raw.aclose()
        gate.set()
        done = [await app.wait(t.uuid, timeout=5) for t in first]
        finished = {t.uuid: await app.wait(t.uuid, timeout=5) for t in later if t.uuid != garbled}
        with anyio.fail_after(5):
            while not await app.broker.dead_letters():  # noqa: ASYNC110 - no event for this
                await anyio.sleep(0.01)
        [letter] = await app.broker.dead_letters()
    assert [t.returning for t in done] == list(range(10))
    assert [finished[t.uuid].returning for t in later if t.uuid != garbled] == [
        -i for i in range(10) if i != 3
    ]
    assert letter.id == garbled and "record unreadable" in letter.reason
    assert sum(batches) == 10 and len(batches) < 10, batches  # shared, not one call each
    await app.aclose()


Call = tuple[Script, tuple[str, ...], tuple[Any, ...], int]


def record_calls(broker: RedisBroker, monkeypatch: pytest.MonkeyPatch) -> list[Call]:
    """The script calls ``broker`` makes from now on, to send one again exactly as the lane
    (or redis-py) re-sends a command whose reply a lost connection took."""
    calls: list[Call] = []
    plain = broker._run_call

    async def recorded(
        script: Script, keys: Sequence[str], args: Sequence[Any], dynamic: int = 0
    ) -> Any:
        calls.append((script, tuple(keys), tuple(args), dynamic))
        return await plain(script, keys, args, dynamic)

    monkeypatch.setattr(broker, "_run_call", recorded)
    packed = Script.packed

    def recorded_packed(
        script: Script,
        client: Any,
        keys: Sequence[str],
        args: Sequence[Any],
        dynamic: int = 0,
    ) -> Callable[[], Awaitable[Any]]:
        """A call packed to be sent later (``publish_new_many``'s), recorded as it is built."""
        calls.append((script, tuple(keys), tuple(args), dynamic))
        return packed(script, client, keys, args, dynamic)

    monkeypatch.setattr(Script, "packed", recorded_packed)
    return calls


async def run_task(broker: RedisBroker, storage: RedisStorage, returning: object) -> str:
    """Claim the next message, begin its record and store it as a success (``returning``)."""
    async with broker.consume(prefetch=1) as it:
        delivery = await take(it)
        record = await begun(storage, delivery)
        record.status, record.returning = TaskStatus.SUCCESS, returning
        assert await broker.ack_final(delivery, storage, record)
    return delivery.id


async def assert_ran_once(
    broker: RedisBroker, storage: RedisStorage, results: dict[str, object]
) -> None:
    """Each task of ``results`` is stored final with its result, and nothing is queued."""
    for uuid, returning in results.items():
        stored = await storage.get(uuid)
        assert stored is not None
        assert (stored.status, stored.returning) == (TaskStatus.SUCCESS, returning), uuid
    stats = await broker.stats()
    assert (stats.in_flight, stats.ready_by_priority, stats.delayed) == (0, {}, 0)
    assert await storage.stats() == {"success": len(results)}


async def test_publish_new_sent_again_after_the_task_ran_changes_nothing(
    redis_url: str, prefix: str, stack: AsyncExitStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The script's reply was lost and the call re-sent, after a worker had claimed, run and
    finished the task: the second run set the record back to ``new`` (its result gone) and
    queued the task again."""
    broker, storage = await parts(stack, redis_url, prefix)
    calls = record_calls(broker, monkeypatch)
    await broker.publish_new(Envelope("a", b"body"), storage, new_record("a"))
    [sent] = calls
    assert await run_task(broker, storage, "first") == "a"
    assert await broker._run_call(*sent) == 1  # the first run's reply
    await assert_ran_once(broker, storage, {"a": "first"})


async def test_publish_new_sent_again_while_the_task_runs_keeps_its_delivery(
    redis_url: str, prefix: str, stack: AsyncExitStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-sent while a worker holds the message: the record stays begun and the message in
    flight under that worker's token (before, it was queued again, the holder's ack refused)."""
    broker, storage = await parts(stack, redis_url, prefix)
    calls = record_calls(broker, monkeypatch)
    await broker.publish_new(Envelope("a", b"body"), storage, new_record("a"))
    [sent] = calls
    async with broker.consume(prefetch=1) as it:
        delivery = await take(it)
        record = await begun(storage, delivery)
        await broker._run_call(*sent)
        assert await storage.get("a") == record
        assert (await broker.stats()).ready_by_priority == {}
        record.status, record.returning = TaskStatus.SUCCESS, "once"
        assert await broker.ack_final(delivery, storage, record)
    await assert_ran_once(broker, storage, {"a": "once"})


async def test_a_second_publish_new_of_a_uuid_still_replaces_it(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    """Only the same call run again is skipped: another call with a uuid that ran (a task id
    reused on purpose) replaces the record and queues the task, as before."""
    broker, storage = await parts(stack, redis_url, prefix)
    await broker.publish_new(Envelope("a", b"body"), storage, new_record("a"))
    await run_task(broker, storage, "first")
    await broker.publish_new(Envelope("a", b"again"), storage, new_record("a"))
    stored = await storage.get("a")
    assert stored is not None and stored.status is TaskStatus.NEW
    assert await run_task(broker, storage, "second") == "a"
    await assert_ran_once(broker, storage, {"a": "second"})


@pytest.mark.parametrize("stored_before", [False, True], ids=["fresh", "task-by-task"])
async def test_publish_new_many_sent_again_after_the_tasks_ran_changes_nothing(
    redis_url: str,
    prefix: str,
    stack: AsyncExitStack,
    monkeypatch: pytest.MonkeyPatch,
    stored_before: bool,
) -> None:
    """The bulk script re-sent after its tasks ran, for both of its ways: a batch of fresh
    tasks, and one meeting a stored record (a reused uuid) that goes task by task."""
    broker, storage = await parts(stack, redis_url, prefix)
    if stored_before:
        await storage.add(new_record("a"))
    calls = record_calls(broker, monkeypatch)
    batch = [(new_record(uuid), Envelope(uuid, uuid.encode())) for uuid in "abc"]
    await broker.publish_new_many(storage, batch)
    [sent] = calls
    ran = {await run_task(broker, storage, "first") for _ in batch}
    assert ran == set("abc")
    assert await broker._run_call(*sent) == 1
    await assert_ran_once(broker, storage, dict.fromkeys("abc", "first"))
    # Another call with the same uuids replaces them, as add_tasks of reused ids does.
    await broker.publish_new_many(storage, batch)
    assert await storage.stats() == {"new": 3}


async def test_a_uuid_given_twice_in_one_bulk_call_is_replaced_across_batches(
    redis_url: str, prefix: str, stack: AsyncExitStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later batch of one publish_new_many call meeting a record its earlier batch wrote is
    not a re-sent batch: it is written, its message replacing the first, as within a batch."""
    monkeypatch.setattr(broker_module, "_PUBLISH_BATCH", 2)
    broker, storage = await parts(stack, redis_url, prefix)
    batch = [
        (new_record(uuid), Envelope(uuid, body))
        for uuid, body in (("a", b"a1"), ("b", b"b"), ("a", b"a2"))
    ]
    await broker.publish_new_many(storage, batch)
    got = {}
    async with broker.consume(prefetch=2) as it:
        for delivery in [await take(it), await take(it)]:
            got[delivery.id] = delivery.body
            assert await delivery.ack()
    assert got == {"a": b"a2", "b": b"b"}


@pytest.mark.parametrize("stored_before", [False, True], ids=["fresh", "task-by-task"])
async def test_publish_new_many_indexes_names_and_parents_as_add_does(
    redis_url: str, prefix: str, stack: AsyncExitStack, stored_before: bool
) -> None:
    """Records a bulk enqueue writes are found by their parent, and one it made new again
    (its uuid given again after the task ended) leaves the index of finished tasks of its
    name, for both of the script's ways (the task-by-task one passed no name nor parent to
    SAVE; the batch one linked no parent)."""
    broker, storage = await parts(stack, redis_url, prefix)
    if stored_before:
        done = new_record("a")
        done.status, done.returning = TaskStatus.SUCCESS, "old"
        assert await storage.save(done) is True
        page = await storage.query(RecordQuery(task_name="t", status=TaskStatus.SUCCESS))
        assert [record.uuid for record in page.records] == ["a"]
    batch = []
    for uuid in "ab":
        record = new_record(uuid)
        record.parent_uuid = "p"
        batch.append((record, Envelope(uuid, b"x")))
    await broker.publish_new_many(storage, batch)
    children = await storage.query(RecordQuery(parent_uuid="p"))
    assert sorted(record.uuid for record in children.records) == ["a", "b"]
    finished = await storage.query(RecordQuery(task_name="t", status=TaskStatus.SUCCESS))
    assert finished.records == []
    named = await storage.query(RecordQuery(task_name="t"))
    assert sorted(record.uuid for record in named.records) == ["a", "b"]
    client = aioredis.from_url(redis_url)
    stack.push_async_callback(client.aclose)
    assert await client.zscore(f"{storage.key_tag}:nf:t", "a") is None


async def test_a_put_back_the_server_refuses_does_not_keep_the_messages_held(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in :func:`test_a_claim_woken_as_the_worker_stops_is_handed_back_with_its_record_new`,
    a claim takes a message as the worker stops (held open until the stop, see
    :func:`hold_the_idle_claim`); putting its record back then fails with an error reply
    (``READONLY``, a replica after a failover), not a lost connection. The consumer still
    releases the message at its exit (it is ready again at once, not held until its lease
    runs out)."""
    app = build(redis_url, prefix, concurrency=1, prefetch=1)
    await app.start()
    try:
        refusal = aioredis.ResponseError("READONLY You can't write against a read only replica.")
        put_backs = watch_put_backs(app, refusal)
        task = await publish_as_the_worker_stops(app, hold_the_idle_claim(monkeypatch))
        assert put_backs == [task.uuid], "no put-back: no claim took the message as it stopped?"
        stats = await app.broker.stats()
        assert (stats.ready_by_priority, stats.in_flight) == ({0: 1}, 0)
    finally:
        await app.aclose()
