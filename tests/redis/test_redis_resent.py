"""Scripts that change state are safe to run twice: the lane (and redis-py's retry) re-sends
a call whose reply was lost, and its first run may have gone through (review r16 #3). Here
the lane sends each such call twice and drops the first reply, as a lost reply would."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from qtasks.config import QueueConfig
from qtasks.messages import Envelope
from qtasks.record import TaskRecord, TaskStatus
from qtasks_redis import RedisBroker, RedisStorage, broker_lua, storage_lua
from qtasks_redis.connection import Script
from qtasks_redis.lane import Lane

pytestmark = pytest.mark.anyio


def resend(lane: Any, monkeypatch: pytest.MonkeyPatch, scripts: Iterable[Script]) -> list[int]:
    """Make ``lane`` send every call of ``scripts`` twice, the first reply dropped (lost);
    returns the list the number of calls so re-sent is counted in."""
    assert isinstance(lane, Lane)
    shas = [script.sha.encode() for script in scripts]
    one = lane._one
    resent = [0]

    async def twice(packed: bytes) -> Any:
        if any(sha in packed for sha in shas):
            resent[0] += 1
            await one(packed)  # its reply is lost
        return await one(packed)

    monkeypatch.setattr(lane, "_one", twice)
    return resent


def lose_a_claim_reply(
    lane: Any,
    monkeypatch: pytest.MonkeyPatch,
    lost: list[Any],
    idle: anyio.Event,
    grew: int,
    stride: int = 5,
    outage: float = 0.0,
) -> None:
    """Make the first idle claim (a block then the claim, which the lane does not re-send) of
    ``lane`` whose reply is over ``grew`` elements past a multiple of ``stride`` (5: 1, it
    leased something; 2, it dead-lettered something, CLAIM_NOTICED; 13, CLAIM_BEGIN_WF: 3, it
    ended a dead letter's record) run, then fail as a lost connection would, ``outage``
    seconds later (the server out of reach that long); its reply goes to ``lost``. ``idle``
    is set once a consumer blocks."""
    assert isinstance(lane, Lane)
    real = lane.block_then_script

    async def reply_lost(*args: Any, **kwargs: Any) -> Any:
        idle.set()
        reply = await real(*args, **kwargs)
        if not lost and len(reply) > 1 and len(reply) % stride == grew:
            lost.append(reply)
            await anyio.sleep(outage)  # the outage lasts that long: no race hidden
            raise RedisConnectionError("Connection closed by server.")
        return reply

    monkeypatch.setattr(lane, "block_then_script", reply_lost)


async def test_a_resent_add_step_appends_once(
    redis_url: str, prefix: str, stack: AsyncExitStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = RedisStorage(redis_url, prefix=prefix)
    await storage.start(stack, QueueConfig())
    await storage.add(TaskRecord(uuid="t1", task_name="gen"))
    resent = resend(storage._shared.fast(), monkeypatch, [storage_lua.ADD_STEP])
    for i in range(3):
        assert await storage.add_step("t1", i) == i
    assert resent == [3]
    record = await storage.get("t1")
    assert record is not None and record.steps == 3
    monkeypatch.undo()
    stored: list[Any] = []
    with anyio.fail_after(5):
        done = TaskRecord(uuid="t1", task_name="gen", status=TaskStatus.SUCCESS, steps=3)
        await storage.save(done)
        async for value in storage.steps("t1"):
            stored.append(value)
    assert stored == [0, 1, 2]


async def test_a_resent_claim_hands_back_what_it_leased(
    redis_url: str, prefix: str, stack: AsyncExitStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The re-sent claim returns the first run's deliveries; it leases nothing more and
    nothing is left leased to nobody (before: 8 in flight for 4 held, and with
    ``max_deliveries=1`` the 4 ghosts were dead-lettered without running)."""
    broker = RedisBroker(redis_url, prefix=prefix, queue="q")
    await broker.start(stack, QueueConfig(max_deliveries=1))
    for i in range(8):
        await broker.publish(Envelope(f"m{i}", b"x"))
    claims = [s for name, s in vars(broker_lua).items() if name.startswith("CLAIM")]
    resent = resend(
        broker._shared.fast(), monkeypatch, [s for s in claims if isinstance(s, Script)]
    )
    seen: list[str] = []
    async with broker.consume(prefetch=4) as it:
        for _ in range(2):
            held = []
            with anyio.fail_after(5):
                for _ in range(4):
                    held.append(await it.__anext__())
            assert (await broker.stats()).in_flight == 4
            for delivery in held:
                assert delivery.attempt == 1
                assert await delivery.ack()
            seen += [d.id for d in held]
    assert resent[0] >= 1
    assert sorted(seen) == [f"m{i}" for i in range(8)]
    stats = await broker.stats()
    assert (stats.in_flight, stats.ready_by_priority, stats.dead_letters) == (0, {}, 0)


async def test_a_claim_s_list_of_what_it_leased_goes_with_the_next_claim(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    """What a claim keeps for its re-run is one key per consuming loop, overwritten by its next
    claim that leases: one such key per consumer, not one per claim for a lease."""
    broker = RedisBroker(redis_url, prefix=prefix, queue="q")
    await broker.start(stack, QueueConfig())
    client = broker._shared.fast()
    assert isinstance(client, Lane)
    for i in range(6):
        await broker.publish(Envelope(f"m{i}", b"x"))

    async def lists() -> list[bytes]:
        keys: list[bytes] = await client.command("KEYS", f"*{prefix}*:c:*")
        return [k for k in keys if b":c:" in k]

    async with broker.consume(prefetch=2) as it:
        for _ in range(3):
            with anyio.fail_after(5):
                held = [await it.__anext__(), await it.__anext__()]
            assert len(await lists()) == 1  # this claim's own, the one before deleted
            for delivery in held:
                assert await delivery.ack()
    assert len(await lists()) <= 1


OUTAGES = [0.0, 1.0]
"""How long the server is out of reach after a claim's reply is lost: a moment, and longer
than three of the tests' leases (0.3 s), during which the claim's note must stay."""


@pytest.mark.parametrize("outage", OUTAGES)
async def test_a_blocking_claim_whose_reply_was_lost_is_made_again_with_its_nonce(
    redis_url: str,
    prefix: str,
    stack: AsyncExitStack,
    monkeypatch: pytest.MonkeyPatch,
    outage: float,
) -> None:
    """An idle consumer's claim (a BLPOP then the claim, on a connection of their own) whose
    reply is lost with its connection is not re-sent by the lane: the consumer claims again
    after the outage, with the lost claim's nonce, so that it gets what that one leased,
    leased again from then (the consumer counts its lease from that call). Before, a fresh
    claim left it leased to nobody until its lease ran out, a delivery burnt: with
    ``max_deliveries=1`` it was dead-lettered without ever running; and so it was still after
    an outage longer than a lease, the note of the lost claim gone with that lease."""
    broker = RedisBroker(redis_url, prefix=prefix, queue="q", lease=0.3)
    await broker.start(stack, QueueConfig(max_deliveries=1))
    lost: list[Any] = []
    idle = anyio.Event()
    lane = broker._shared.fast()
    assert isinstance(lane, Lane)
    lose_a_claim_reply(lane, monkeypatch, lost, idle, 1, outage=outage)
    got: list[Any] = []
    async with broker.consume(prefetch=1) as it:

        async def take() -> None:
            got.append(await it.__anext__())

        async with anyio.create_task_group() as tg:
            tg.start_soon(take)
            with anyio.fail_after(5):
                await idle.wait()
            await broker.publish(Envelope("m1", b"x"))  # wakes the idle claim
            with anyio.fail_after(5):
                while not got:
                    # Read only while the lease may hold: the read takes back expired leases
                    # (as another consumer's claim would), and after a long outage m1's is.
                    if not outage and (await broker.stats()).dead_letters:
                        break
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        assert lost
        assert [(d.id, d.attempt) for d in got] == [("m1", 1)]
        seconds, micros = await lane.command("TIME")
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        deadline = await lane.command("ZSCORE", broker.keys[2], "m1")
        assert deadline is not None and float(deadline) > now_ms, "handed back, lease over"
        assert await got[0].ack()
    stats = await broker.stats()
    assert (stats.in_flight, stats.ready_by_priority, stats.dead_letters) == (0, {}, 0)


async def dead_letter_with_its_claim_reply_lost(
    broker: RedisBroker,
    it: AsyncIterator[Any],
    lost: list[Any],
    publish: Callable[[str, bytes], Awaitable[None]],
) -> None:
    """``it`` (consuming ``broker``, limit 1, a claim reply that dead-letters to be lost)
    takes ``m1`` (published with ``publish``) and never settles it; its next claim, once the
    lease ran out, dead-letters it and its reply is lost; then ``m2`` is published and taken
    by a claim made after the lost one, and acked."""
    await publish("m1", b"x")
    with anyio.fail_after(5):
        first = await it.__anext__()  # never settled: its lease runs out
    assert (first.id, first.attempt) == ("m1", 1)
    got: list[Any] = []

    async def take() -> None:
        got.append(await it.__anext__())

    async with anyio.create_task_group() as tg:
        tg.start_soon(take)  # its claim, once the lease ran out, dead-letters m1
        with anyio.fail_after(5):
            while not lost:  # noqa: ASYNC110 - no event for it
                await anyio.sleep(0.01)
        await publish("m2", b"y")  # taken by a claim after the lost one
        with anyio.fail_after(5):
            while not got:  # noqa: ASYNC110 - no event for it
                await anyio.sleep(0.01)
    assert [d.id for d in got] == ["m2"]
    assert await got[0].ack()
    assert (await broker.stats()).dead_letters == 1


@pytest.mark.parametrize("outage", OUTAGES)
async def test_a_claim_whose_reply_was_lost_still_tells_what_it_dead_lettered(
    redis_url: str,
    prefix: str,
    stack: AsyncExitStack,
    monkeypatch: pytest.MonkeyPatch,
    outage: float,
) -> None:
    """A claim that dead-lettered a message past its delivery limit and whose reply was lost:
    the claim made again with its nonce still names the message, so that the worker ends
    its record (:class:`~qtasks.components.BuryNotice`: the storage is elsewhere). Before,
    the notice was lost with the reply and the record stayed unfinished for good."""
    broker = RedisBroker(redis_url, prefix=prefix, queue="q", lease=0.3)
    await broker.start(stack, QueueConfig(max_deliveries=1))
    lost: list[Any] = []
    lose_a_claim_reply(broker._shared.fast(), monkeypatch, lost, anyio.Event(), 2, outage=outage)
    buried: list[str] = []

    async def notice(id: str, reason: str) -> None:
        buried.append(id)

    async def publish(id: str, body: bytes) -> None:
        await broker.publish(Envelope(id, body))

    async with broker.consume_noticing(prefetch=1, buried=notice) as it:
        await dead_letter_with_its_claim_reply_lost(broker, it, lost, publish)
    assert buried == ["m1"]


@pytest.mark.parametrize("outage", OUTAGES)
async def test_a_claim_whose_reply_was_lost_still_carries_the_records_it_ended(
    redis_url: str,
    prefix: str,
    stack: AsyncExitStack,
    monkeypatch: pytest.MonkeyPatch,
    outage: float,
) -> None:
    """A claim that begins records (:class:`~qtasks.components.BeginOnClaim`) dead-letters a
    message past its delivery limit and ends its record, and its reply is lost: the claim
    made again with its nonce carries that record again, so that ``ended`` (the worker's
    ``qtasks_task_dead_lettered``) gets it, once. Before, the repeat found the record final
    already and said nothing: the hook never fired for it."""
    storage = RedisStorage(redis_url, prefix=prefix)
    await storage.start(stack, QueueConfig())
    broker = RedisBroker(redis_url, prefix=prefix, queue="q", lease=0.3)
    await broker.start(stack, QueueConfig(max_deliveries=1))
    lost: list[Any] = []
    lose_a_claim_reply(broker._shared.fast(), monkeypatch, lost, anyio.Event(), 3, 13, outage)
    ended: list[TaskRecord] = []

    async def end(record: TaskRecord) -> None:
        ended.append(record)

    async def publish(id: str, body: bytes) -> None:
        await storage.add(TaskRecord(uuid=id, task_name="job"))
        await broker.publish(Envelope(id, body))

    async with broker.consume_begun(
        prefetch=1, storage=storage, worker="w", starts=lambda: 1, ended=end
    ) as it:
        await dead_letter_with_its_claim_reply_lost(broker, it, lost, publish)
    assert [(r.uuid, r.status, r.token) for r in ended] == [("m1", TaskStatus.ERROR, "dead-letter")]
