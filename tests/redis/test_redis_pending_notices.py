"""The notices of a Redis claim's dead letters survive the worker that got them: with the
storage on another server (:class:`~qtasks.components.BuryNotice`: the worker ends the
records of the messages its claims dead-letter), the claim also notes each one in the queue's
pending hash, deleted once ``buried()`` returned, and a consumer that starts tells what the
hash holds. Before, a worker killed between its claim's reply and the end of the record left
the record ``new``/``process`` until its TTL: its waiters hung, its workflow never learnt,
``qtasks_task_dead_lettered`` never fired.

Over ~500 lines: one scenario per way a note is told, kept or dropped, sharing the workers,
storages and brokers defined above them."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio
from anyio.abc import TaskGroup
from anyio.streams.text import TextReceiveStream
from bury_worker import LEASE, build
from redis_server import start_server

from qtasks import AsyncQueueTasks, QueueConfig, hookimpl, poison
from qtasks.errors import StorageConnectionError
from qtasks.messages import Envelope
from qtasks.record import TaskRecord, TaskStatus
from qtasks_redis import RedisBroker, RedisStorage
from qtasks_redis import broker_lua as lua
from qtasks_redis.connection import Client
from qtasks_redis.lane import Lane

pytestmark = pytest.mark.anyio

WORKER = Path(__file__).parent / "bury_worker.py"


class Heard:
    """Counts ``qtasks_task_dead_lettered`` by uuid; ``first`` is set at the first."""

    def __init__(self) -> None:
        self.uuids: list[str] = []
        self.first = anyio.Event()

    @hookimpl
    def qtasks_task_dead_lettered(self, record: TaskRecord, reason: str) -> None:
        self.uuids.append(record.uuid)
        self.first.set()


def pending_key(app: AsyncQueueTasks) -> str:
    broker = app.broker
    assert isinstance(broker, RedisBroker)
    return broker._pending_key


def on_lane(app: AsyncQueueTasks) -> bool:
    """Whether ``app``'s broker, started, talks through its fast lane (else redis-py)."""
    broker = app.broker
    assert isinstance(broker, RedisBroker)
    return isinstance(broker._shared.fast(), Lane)


async def lose_its_delivery(app: AsyncQueueTasks, name: str = "noop") -> str:
    """Add a task (``name``, taking 1) and lose its only allowed delivery (a consumer takes it
    and goes away without settling, as a killed worker does): the next claim dead-letters
    it. Its uuid."""
    assert app.shared_server is None  # the worker ends the record: BuryNotice
    task = await app.add_task(name, 1)
    async with app.broker.consume(prefetch=1) as raw:  # never settled
        with anyio.fail_after(5):
            await anext(raw)
    return task.uuid


async def serve_until_heard(app: AsyncQueueTasks, heard: Heard) -> None:
    """Run ``app``'s worker until ``qtasks_task_dead_lettered`` fired, then stop it."""
    async with anyio.create_task_group() as tg:
        await tg.start(app.worker.run, app)
        with anyio.fail_after(10):
            await heard.first.wait()
        app.worker.stop()


async def killed_inside_buried(app: AsyncQueueTasks, args: list[str], tmp_path: Path) -> None:
    """Start a worker process (``bury_worker.py args``: broker url, storage url, prefix, the
    uuid of a message whose one delivery was lost), wait until its claim dead-lettered the
    message and it is inside ``buried()``, reading the record, and SIGKILL it there: the
    record is left ``new``, the message dead-lettered, its note in the pending hash."""
    uuid = args[-1]
    with (tmp_path / "worker.log").open("w") as log:
        worker = await anyio.open_process(
            [sys.executable, str(WORKER), *args], stderr=log, start_new_session=True
        )
    try:
        assert worker.stdout is not None
        said = ""
        with anyio.fail_after(30):
            async for text in TextReceiveStream(worker.stdout):
                said += text
                if f"reading {uuid}\n" in said:
                    break
        assert f"reading {uuid}\n" in said, (tmp_path / "worker.log").read_text()
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        with anyio.fail_after(10):
            await worker.wait()
        await worker.aclose()
    left = await app.storage.get(uuid)
    assert left is not None and left.status is TaskStatus.NEW  # not ended: the kill came first
    assert [d.id for d in await app.broker.dead_letters()] == [uuid]


async def ended_and_told_once(
    app: AsyncQueueTasks, heard: Heard, uuid: str, client: redis.asyncio.Redis
) -> None:
    record = await app.storage.get(uuid)
    assert record is not None
    assert record.status is TaskStatus.ERROR
    assert (record.error or "").startswith("dead-lettered: delivery limit reached")
    assert heard.uuids == [uuid]
    assert await client.hlen(pending_key(app)) == 0
    assert await client.exists(pending_key(app) + ":at") == 0


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "redis-py"])
async def test_a_worker_killed_while_telling_a_dead_letter_leaves_it_to_the_next(
    redis_url: str, prefix: str, tmp_path: Path, lane: bool
) -> None:
    """A worker process's claim dead-letters a message whose one delivery was lost, and the
    worker is killed (SIGKILL) inside ``buried()``, before the record is ended (its storage
    blocks reading it). The record is still ``new``; a worker started afterwards tells the
    notice the dead one left in the pending hash: the record ends ``error``, the hook fires
    once, the hash is empty. Before, the notice died with the worker. (``lane``: how the
    worker started afterwards talks to Redis.)"""
    records = start_server(tmp_path)  # the storage's server, outliving the worker
    client = redis.asyncio.Redis.from_url(redis_url)
    app = build(redis_url, records.url, prefix, lane=lane)
    heard = Heard()
    app.add_plugin(heard)
    await app.start()
    try:
        assert on_lane(app) is lane
        uuid = await lose_its_delivery(app)
        await killed_inside_buried(app, [redis_url, records.url, prefix, uuid], tmp_path)
        await serve_until_heard(app, heard)
        await ended_and_told_once(app, heard, uuid, client)
    finally:
        await app.aclose()
        await client.aclose()
        records.close()


class Watched(RedisStorage):
    """Reading the record of ``uuid`` notes what the broker's pending hash holds of it then
    (``buried()`` reads the record first) and that hash's TTL."""

    def __init__(self, url: str, *, prefix: str, client: redis.asyncio.Redis) -> None:
        super().__init__(url, prefix=prefix)
        self.client = client
        self.uuid = ""
        self.key = ""
        self.seen: list[tuple[bytes | None, int]] = []

    async def get(self, uuid: str) -> TaskRecord | None:
        if uuid == self.uuid:
            reason = await self.client.hget(self.key, uuid)
            assert not isinstance(reason, str)
            self.seen.append((reason, await self.client.pttl(self.key)))
        return await super().get(uuid)


async def told_through(
    storage: Watched,
    redis_url: str,
    prefix: str,
    client: redis.asyncio.Redis,
    *,
    lane: bool = True,
) -> tuple[list[tuple[bytes | None, int]], bytes]:
    """Lose the one delivery of a task and serve, with ``storage`` watching its note, until
    the hook of its dead letter fired; the record ended and was told once, no note left.
    What ``storage`` saw of the note at each read of the record, and the dead letter's
    reason."""
    app = build(redis_url, "", prefix, storage, lane=lane)  # no storage url: it is given
    heard = Heard()
    app.add_plugin(heard)
    await app.start()
    try:
        assert on_lane(app) is lane
        storage.uuid = await lose_its_delivery(app)
        storage.key = pending_key(app)
        await serve_until_heard(app, heard)
        seen = storage.seen[:]
        await ended_and_told_once(app, heard, storage.uuid, client)
        [letter] = await app.broker.dead_letters()
    finally:
        await app.aclose()
    return seen, letter.reason.encode()


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "redis-py"])
async def test_a_dead_letter_told_leaves_no_note(
    redis_url: str, prefix: str, tmp_path: Path, lane: bool
) -> None:
    """The claim that dead-letters a message notes it in the pending hash (with the dead
    letters' retention as its TTL) while the worker tells it; once told, the note is gone and
    the hook fired once."""
    records = start_server(tmp_path)
    client = redis.asyncio.Redis.from_url(redis_url)
    storage = Watched(records.url, prefix=prefix, client=client)
    try:
        seen, letter = await told_through(storage, redis_url, prefix, client, lane=lane)
    finally:
        await client.aclose()
        records.close()
    [(reason, ttl)] = seen  # read once: the notice was told once
    assert reason == letter
    ttl_ms = QueueConfig().dead_letter_ttl
    assert ttl_ms is not None and 0 < ttl <= ttl_ms * 1000


async def serving_busy(app: AsyncQueueTasks, tg: TaskGroup) -> anyio.Event:
    """Start ``app``'s worker in ``tg`` (one slot: ``max_tasks_process=1``), so that its
    start's sweep of the pending hash is over, and keep it busy with a task until the event
    returned is set: meanwhile it claims nothing."""
    running, release = anyio.Event(), anyio.Event()

    @app.task
    async def hold() -> None:
        running.set()
        await release.wait()

    await tg.start(app.worker.run, app)
    await app.add_task("hold")
    with anyio.fail_after(10):
        await running.wait()
    return release


async def test_a_running_worker_tells_a_dead_letter_a_killed_one_left(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """A worker (one slot) is already serving, so its start's sweep of the pending hash is
    over, and busy with a task (it claims nothing meanwhile). A worker process's claim
    dead-letters a message whose one delivery was lost, and that process is SIGKILLed inside
    ``buried()``. Once the first worker's task ends, its claims take the note left (untaken
    for a lease): the record ends ``error``, the hook fires once, the hash is empty. Before,
    only a consumer that started later told it: with the killed worker not restarted, the
    record stayed ``new`` for ever."""
    records = start_server(tmp_path)
    client = redis.asyncio.Redis.from_url(redis_url)
    app = build(redis_url, records.url, prefix, max_tasks_process=1)
    heard = Heard()
    app.add_plugin(heard)
    await app.start()
    try:
        async with anyio.create_task_group() as tg:
            release = await serving_busy(app, tg)
            uuid = await lose_its_delivery(app)
            await killed_inside_buried(app, [redis_url, records.url, prefix, uuid], tmp_path)
            assert await client.hexists(pending_key(app), uuid)
            release.set()
            with anyio.fail_after(20):
                await heard.first.wait()
            app.worker.stop()
        await ended_and_told_once(app, heard, uuid, client)
    finally:
        await app.aclose()
        await client.aclose()
        records.close()


class Slow(RedisStorage):
    """Reading the record of ``uuid`` sets ``reading``, then waits for ``go``: a live worker
    slow to tell a notice (its storage slow)."""

    def __init__(self, url: str, *, prefix: str) -> None:
        super().__init__(url, prefix=prefix)
        self.uuid = ""
        self.reading, self.go = anyio.Event(), anyio.Event()

    async def get(self, uuid: str) -> TaskRecord | None:
        if uuid == self.uuid:
            self.reading.set()
            await self.go.wait()
        return await super().get(uuid)


class Forgetting(RedisBroker):
    """Sets ``forgot`` once the notes of notices told were deleted: a telling is over."""

    def __init__(self, url: str | None = None, **options: Any) -> None:
        super().__init__(url, **options)
        self.forgot = anyio.Event()

    async def _forget_notices(self, client: Client | Lane, ids: list[str]) -> None:
        await super()._forget_notices(client, ids)
        self.forgot.set()


async def test_a_note_taken_from_a_slow_live_worker_is_told_twice_safely(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """Worker A's claim dead-letters a message and A is slow to tell it (reading the record
    waits). Worker B, free (its one slot was busy until then), does not take the note at
    once, only once it is a lease old, and ends the record; then A's telling goes on and
    finds the record final. The record is ended once, the hook fires once (in B), no note is
    left: a note taken from a live worker is told twice, harmlessly."""
    records = start_server(tmp_path)
    client = redis.asyncio.Redis.from_url(redis_url)
    slow = Slow(records.url, prefix=prefix)
    a = build(redis_url, records.url, prefix, slow, broker=Forgetting)
    b = build(redis_url, records.url, prefix, max_tasks_process=1)
    heard_a, heard_b = Heard(), Heard()
    a.add_plugin(heard_a)
    b.add_plugin(heard_b)
    await a.start()
    await b.start()
    try:
        async with anyio.create_task_group() as tg:
            release = await serving_busy(b, tg)
            slow.uuid = await lose_its_delivery(a)
            await tg.start(a.worker.run, a)
            with anyio.fail_after(10):
                await slow.reading.wait()  # A's claim dead-lettered it: A is telling it
            noted = time.monotonic()
            release.set()
            with anyio.fail_after(20):
                await heard_b.first.wait()
            # Not at B's first claim, a moment after the release: a lease after A's claim.
            assert time.monotonic() - noted > LEASE * 0.75
            slow.go.set()
            assert isinstance(a.broker, Forgetting)
            with anyio.fail_after(10):
                await a.broker.forgot.wait()
            a.worker.stop()
            b.worker.stop()
        heard = Heard()
        heard.uuids = heard_a.uuids + heard_b.uuids
        await ended_and_told_once(b, heard, slow.uuid, client)
    finally:
        await a.aclose()
        await b.aclose()
        await client.aclose()
        records.close()


class FailsOnce(Watched):
    """:class:`Watched`, whose first save of the record of ``uuid`` fails (an outage of the
    storage while ``buried()`` ends it)."""

    def __init__(self, url: str, *, prefix: str, client: redis.asyncio.Redis) -> None:
        super().__init__(url, prefix=prefix, client=client)
        self.failed = False

    async def save(self, record: TaskRecord, *, fence: str | None = None) -> bool:
        if record.uuid == self.uuid and not self.failed:
            self.failed = True
            raise StorageConnectionError("the storage is down (once)")
        return await super().save(record, fence=fence)


async def test_a_dead_letter_whose_record_could_not_be_written_is_told_again(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """The worker's ``buried()`` fails to write the record (the storage raises once): the
    note stays in the pending hash, and a claim of the same worker a lease later tells it
    again; the record then ends ``error``, the hook fires once, the hash is empty. Before,
    ``buried()`` logged the failure and returned, the note was deleted, and the record stayed
    ``new`` for ever."""
    records = start_server(tmp_path)
    client = redis.asyncio.Redis.from_url(redis_url)
    storage = FailsOnce(records.url, prefix=prefix, client=client)
    try:
        seen, letter = await told_through(storage, redis_url, prefix, client)
    finally:
        await client.aclose()
        records.close()
    assert storage.failed
    # Read at each telling: the first, whose save failed, and the one after, the note kept.
    assert [reason for reason, _ in seen] == [letter] * 2


class Sweeping(RedisBroker):
    """Its consumers tell notices through :func:`qtasks.poison.buried` of ``app``
    (:meth:`tell`); :meth:`told_all` waits until one told what its start-time sweep read."""

    app: AsyncQueueTasks

    def __init__(self, url: str | None = None, **options: Any) -> None:
        super().__init__(url, **options)
        self.swept: set[str] = set()
        self.read, self.telling = anyio.Event(), anyio.Event()

    async def _pending_notices(self, client: Client | Lane) -> list[tuple[str, str]]:
        notes = await super()._pending_notices(client)
        self.swept = {id for id, _ in notes}
        self.read.set()
        return notes

    async def tell(self, id: str, reason: str) -> bool:
        done = await poison.buried(self.app, id, reason)
        self.swept.discard(id)
        if not self.swept:
            self.telling.set()
        return done

    async def told_all(self) -> None:
        await self.read.wait()
        if self.swept:
            await self.telling.wait()


async def claiming_until(
    consumer: AbstractAsyncContextManager[AsyncIterator[Any]], until: Callable[[], Awaitable[None]]
) -> None:
    """Claim with ``consumer`` (it gets nothing to deliver) until ``until()`` returns."""

    async def claim(claims: AsyncIterator[Any]) -> None:
        await anext(claims)

    async with consumer as claims, anyio.create_task_group() as tg:
        tg.start_soon(claim, claims)
        with anyio.fail_after(10):
            await until()
        tg.cancel_scope.cancel()


async def live_again(app: AsyncQueueTasks, uuid: str, how: str) -> None:
    """The dead letter ``uuid`` made live again: ``requeued`` (``qtasks dlq requeue``), or
    ``published`` again under its id (the dead letter left as it is)."""
    if how == "requeued":
        assert await app.requeue_dead_letters([uuid]) == 1
    else:
        [letter] = await app.broker.dead_letters()
        await app.broker.publish(Envelope(uuid, letter.body))


@pytest.mark.parametrize("how", ["requeued", "published"])
async def test_a_dead_letter_live_again_before_its_notice_was_told_keeps_its_new_run(
    redis_url: str, prefix: str, tmp_path: Path, how: str
) -> None:
    """A claim dead-letters a message, its notice untold (``buried()`` could not write the
    record: the note stays); it is requeued (or published again) and a worker runs it again;
    a consumer that starts sweeps the pending hash. The re-run's record is untouched
    (``process``, then ``success``), the hook never fires, no note is left. Before, the note
    stayed, and its telling ended the running task's record ``error`` (fenced by the re-run's
    token)."""
    records = start_server(tmp_path)
    client = redis.asyncio.Redis.from_url(redis_url)
    app = build(redis_url, records.url, prefix, max_tasks_process=1)
    heard = Heard()
    app.add_plugin(heard)
    running, done = anyio.Event(), anyio.Event()

    @app.task
    async def again(i: int) -> int:
        running.set()
        await done.wait()
        return i

    starting = build(redis_url, records.url, prefix, broker=Sweeping)
    starting.add_plugin(heard)
    sweeping = starting.broker
    assert isinstance(sweeping, Sweeping)
    sweeping.app = starting
    await app.start()
    await starting.start()
    try:
        async with anyio.create_task_group() as tg:
            # Serving, its start's sweep over (the hash empty then), busy: it claims nothing.
            release = await serving_busy(app, tg)
            uuid = await lose_its_delivery(app, "again")
            untold = anyio.Event()

            async def not_written(id: str, reason: str) -> bool:
                untold.set()
                return False  # as when the storage fails: the note is kept

            # Its claim dead-letters it (handed back at once), its note is kept.
            assert isinstance(app.broker, RedisBroker)
            noticing = app.broker.consume_noticing(prefetch=1, buried=not_written)
            await claiming_until(noticing, untold.wait)
            assert await client.hexists(pending_key(app), uuid)
            await live_again(app, uuid, how)
            # Requeued: the note dropped with it; published: left for the sweep to drop.
            assert await client.hexists(pending_key(app), uuid) == (how == "published")
            release.set()
            with anyio.fail_after(10):
                await running.wait()
            begun = await app.storage.get(uuid)
            assert begun is not None and begun.status is TaskStatus.PROCESS
            # A consumer that starts tells what the pending hash holds.
            told = sweeping.consume_noticing(prefetch=1, buried=sweeping.tell)
            await claiming_until(told, sweeping.told_all)
            now = await app.storage.get(uuid)
            assert now is not None and now.status is TaskStatus.PROCESS
            assert now.token == begun.token
            done.set()
            with anyio.fail_after(10):
                ended = await app.storage.wait(uuid, None)
            app.worker.stop()
        assert ended.status is TaskStatus.SUCCESS
        assert heard.uuids == []
        assert await client.exists(pending_key(app), pending_key(app) + ":at") == 0
    finally:
        await app.aclose()
        await starting.aclose()
        await client.aclose()
        records.close()


async def test_a_claim_drops_the_stale_note_of_a_message_published_again(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """A note a lease old whose message was published again under its id (its body back) is
    dropped by the claim that would take it, not named in its reply: told, it would end the
    record of the new life. (Run through the claim script itself: a consumer's start-time
    sweep drops it first, tested above.) Before, the claim named it."""
    records = start_server(tmp_path)
    client = redis.asyncio.Redis.from_url(redis_url)
    app = build(redis_url, records.url, prefix)
    await app.start()
    try:
        uuid = await lose_its_delivery(app)
        untold = anyio.Event()

        async def not_written(id: str, reason: str) -> bool:
            untold.set()
            return False

        assert isinstance(app.broker, RedisBroker)
        noticing = app.broker.consume_noticing(prefetch=1, buried=not_written)
        await claiming_until(noticing, untold.wait)
        await live_again(app, uuid, "published")
        at = pending_key(app) + ":at"
        await client.zadd(at, {uuid: 0})  # taken by nobody for a lease (not waited for here)
        keys = (*app.broker.keys, pending_key(app), at)
        reply = await lua.CLAIM_NOTICED(client, keys, (LEASE * 1000, 1, 1, "c/n", "", ""))
        assert [id.decode() for id in reply[1:2]] == [uuid]  # claimed, its new life
        assert len(reply) == 6  # and no list of dead letters to tell
        assert await client.exists(pending_key(app), at) == 0
    finally:
        await app.aclose()
        await client.aclose()
        records.close()
