"""RedisBroker against the real Redis: every guarantee of the Broker contract, called directly."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from qtasks.components import Broker
from qtasks.config import QueueConfig
from qtasks.errors import (
    BrokerConnectionError,
    ComponentError,
    ComponentNotStartedError,
    ConfigError,
    TaskArgumentsError,
)
from qtasks.messages import Envelope
from qtasks_redis import (
    RedisBroker,
    RedisDelivery,
    RedisGlobalConfig,
    RedisStorage,
    broker_lua,
)
from qtasks_redis import broker_lua as lua
from qtasks_redis.lane import Lane

pytestmark = pytest.mark.anyio


async def make(stack: AsyncExitStack, url: str, prefix: str, **config: object) -> RedisBroker:
    broker = RedisBroker(url, prefix=prefix, queue="q")
    await broker.start(stack, QueueConfig().merged(**config))
    return broker


async def take(it: AsyncIterator[RedisDelivery], timeout: float = 3.0) -> RedisDelivery:
    with anyio.fail_after(timeout):
        return await it.__anext__()


async def test_is_a_broker(redis_url: str, prefix: str, stack: AsyncExitStack) -> None:
    broker = await make(stack, redis_url, prefix)
    assert isinstance(broker, Broker)


async def test_publish_consume_ack(redis_url: str, prefix: str, stack: AsyncExitStack) -> None:
    broker = await make(stack, redis_url, prefix)
    await broker.publish(Envelope("a", b"\x00body\xff", priority=3))
    async with broker.consume(prefetch=5) as it:
        d = await take(it)
        assert (d.id, d.body, d.priority, d.attempt) == ("a", b"\x00body\xff", 3, 1)
        assert d.token
        assert (await broker.stats()).in_flight == 1
        assert await d.ack()
        assert not await d.ack()
    stats = await broker.stats()
    assert (stats.in_flight, stats.ready_by_priority, stats.delayed) == (0, {}, 0)


async def test_priorities_across_queue_fifo_within(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    broker = await make(stack, redis_url, prefix)
    for id, prio in [("p5", 5), ("a0", 0), ("b0", 0), ("m1", -1), ("c0", 0), ("big", 2000)]:
        await broker.publish(Envelope(id, b"x", priority=prio))
    stats = await broker.stats()
    assert stats.ready_by_priority == {-1: 1, 0: 3, 5: 1, 899: 1}
    order = []
    async with broker.consume(prefetch=1) as it:
        for _ in range(6):
            d = await take(it)
            order.append(d.id)
            await d.ack()
    assert order == ["m1", "a0", "b0", "c0", "p5", "big"]


async def test_delayed_message_is_woken_when_due(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    broker = await make(stack, redis_url, prefix)
    start = time.time()
    await broker.publish(Envelope("late", b"x", eta=start + 0.4))
    await broker.publish(Envelope("now", b"y"))
    assert (await broker.stats()).delayed == 1
    async with broker.consume(prefetch=5) as it:
        first = await take(it)
        assert first.id == "now"
        late = await take(it)
        elapsed = time.time() - start
    assert late.id == "late"
    assert 0.35 <= elapsed < 0.6, elapsed


async def test_a_message_due_in_thousands_of_years_does_not_break_the_claim(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    """An ``eta`` given in milliseconds (``time.time() * 1000``, a JavaScript habit): the
    claim's wait until it is due (over 10**14 ms) came back as ``9.9e+14``, which the
    consumer could not read, so every worker of the queue crashed on every claim. An
    ``Envelope`` refuses such an eta now; the message is written as a release before that
    check (or another client) wrote it, with the broker's own publish script."""
    broker = await make(stack, redis_url, prefix)
    with pytest.raises(TaskArgumentsError, match="milliseconds"):
        Envelope("far", b"x", eta=time.time() * 1000)
    await broker._run(lua.PUBLISH, "far", b"x", 0, str(int(time.time() * 1000 * 1000)))
    async with broker.consume(prefetch=5) as it:
        # Nothing ready and nothing in flight: the claim's wait is the far message's.
        with anyio.move_on_after(0.3) as idle:
            await it.__anext__()
    assert idle.cancelled_caught  # nothing to claim, and no error
    await broker.publish(Envelope("now", b"y"))
    async with broker.consume(prefetch=5) as it:
        assert (await take(it)).id == "now"
    assert (await broker.stats()).delayed == 1


async def test_idle_consumer_is_woken_by_publish(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    broker = await make(stack, redis_url, prefix)
    async with broker.consume(prefetch=5) as it:
        got: list[float] = []

        async def consumer() -> None:
            d = await take(it, 5)
            got.append(time.monotonic())
            await d.ack()

        async with anyio.create_task_group() as tg:
            tg.start_soon(consumer)
            await anyio.sleep(0.3)  # let the consumer block in BLPOP (idle cap is 5 s)
            sent = time.monotonic()
            await broker.publish(Envelope("x", b"x"))
    assert got[0] - sent < 0.1


async def test_lease_expiry_redelivers_and_fences_old_token(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    broker = await make(stack, redis_url, prefix, lease=0.3)
    await broker.publish(Envelope("a", b"x"))
    async with broker.consume(prefetch=1) as it:
        first = await take(it)
        second = await take(it, 2)  # the lease of ``first`` ran out
        assert second.id == "a"
        assert (first.attempt, second.attempt) == (1, 2)
        assert first.token != second.token
        assert not await first.extend()
        assert not await first.ack()
        assert not await first.nack("late")
        assert not await first.requeue()
        assert await second.ack()
    assert await broker.dead_letters() == []


async def test_extend_keeps_the_lease(redis_url: str, prefix: str, stack: AsyncExitStack) -> None:
    broker = await make(stack, redis_url, prefix, lease=0.4)
    await broker.publish(Envelope("a", b"x"))
    async with broker.consume(prefetch=1) as it:
        d = await take(it)
        other = RedisBroker(redis_url, prefix=prefix, queue="q")
        await other.start(stack, QueueConfig(lease=0.4))
        async with other.consume(prefetch=1) as it2:
            with anyio.move_on_after(1.2):
                async with anyio.create_task_group() as tg:

                    async def renew() -> None:
                        while True:
                            assert await d.extend()
                            await anyio.sleep(0.1)

                    tg.start_soon(renew)
                    stolen = await it2.__anext__()
                    pytest.fail(f"delivered twice while renewed: {stolen}")
        assert await d.ack()


async def test_delivery_limit_dead_letters_with_reason(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    broker = await make(stack, redis_url, prefix, lease=0.2, max_deliveries=2)
    await broker.publish(Envelope("poison", b"body", priority=4))
    async with broker.consume(prefetch=1) as it:
        assert (await take(it)).attempt == 1
        assert (await take(it)).attempt == 2
        with anyio.move_on_after(0.8):
            extra = await it.__anext__()
            pytest.fail(f"delivered past the limit: {extra}")
    [letter] = await broker.dead_letters()
    assert (letter.id, letter.body, letter.priority) == ("poison", b"body", 4)
    assert "delivery limit" in letter.reason
    assert "max_deliveries=2" in letter.reason
    assert (await broker.stats()).dead_letters == 1
    assert await broker.requeue_dead_letters() == 1
    async with broker.consume(prefetch=1) as it:
        again = await take(it)
        assert (again.id, again.attempt) == ("poison", 1)
        assert await again.ack()
    assert await broker.dead_letters() == []


async def test_a_claim_dead_letters_one_past_its_limit_and_hands_out_the_rest(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    # A claim pops several messages at once: the one past its delivery limit is
    # dead-lettered, the others are handed out in order, as many as were asked for.
    broker = await make(stack, redis_url, prefix, lease=0.2, max_deliveries=1)
    await broker.publish(Envelope("poison", b"p", priority=0))
    async with broker.consume(prefetch=1) as it:
        assert (await take(it)).id == "poison"  # not settled: handed back at exit, counted
    for id in ("a", "b", "c"):
        await broker.publish(Envelope(id, id.encode(), priority=1))
    async with broker.consume(prefetch=3) as it:
        got = [await take(it) for _ in range(3)]
        assert [d.id for d in got] == ["a", "b", "c"]
        for delivery in got:
            assert await delivery.ack()
    [letter] = await broker.dead_letters()
    assert letter.id == "poison" and "max_deliveries=1" in letter.reason


async def test_nack_and_requeue_dead_letters_by_id(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    broker = await make(stack, redis_url, prefix)
    await broker.publish(Envelope("a", b"A"))
    await broker.publish(Envelope("b", b"B"))
    async with broker.consume(prefetch=2) as it:
        for _ in range(2):
            assert await (await take(it)).nack("unknown task 'nope'")
    letters = await broker.dead_letters()
    assert [(x.id, x.body, x.reason) for x in letters] == [
        ("a", b"A", "unknown task 'nope'"),
        ("b", b"B", "unknown task 'nope'"),
    ]
    assert letters[0].dead_at <= letters[1].dead_at
    assert [x.id for x in await broker.dead_letters(limit=1)] == ["a"]
    assert await broker.requeue_dead_letters(["b", "missing"]) == 1
    assert [x.id for x in await broker.dead_letters()] == ["a"]
    async with broker.consume(prefetch=2) as it:
        assert (await take(it)).id == "b"


async def test_requeue_resets_attempt_replaces_body_and_delays(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    broker = await make(stack, redis_url, prefix, lease=0.2)
    await broker.publish(Envelope("a", b"v1"))
    async with broker.consume(prefetch=1) as it:
        await take(it)  # lease runs out
        second = await take(it)
        assert second.attempt == 2
        start = time.monotonic()
        assert await second.requeue(delay=0.3, body=b"v2")
        assert not await second.ack()
        third = await take(it)
        assert time.monotonic() - start >= 0.28
        assert (third.attempt, third.body) == (1, b"v2")
        assert await third.requeue()
        fourth = await take(it)
        assert (fourth.attempt, fourth.body) == (1, b"v2")
        assert await fourth.ack()


async def test_cancel_only_waiting_messages(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    broker = await make(stack, redis_url, prefix)
    await broker.publish(Envelope("queued", b"x"))
    await broker.publish(Envelope("delayed", b"x", eta=time.time() + 60))
    await broker.publish(Envelope("taken", b"x", priority=-5))
    async with broker.consume(prefetch=1) as it:
        taken = await take(it)
        assert taken.id == "taken"
        assert not await broker.cancel("taken")
        assert await broker.cancel("queued")
        assert await broker.cancel("delayed")
        assert not await broker.cancel("queued")
        assert not await broker.cancel("never")
        assert await taken.ack()
    stats = await broker.stats()
    assert (stats.ready_by_priority, stats.delayed, stats.in_flight) == ({}, 0, 0)


async def test_consumer_exit_hands_back_unsettled_at_once(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    broker = await make(stack, redis_url, prefix, lease=60)
    for i in range(4):
        await broker.publish(Envelope(f"m{i}", b"x"))
    async with broker.consume(prefetch=4) as it:
        first = await take(it)  # claims all four into the consumer's buffer
        assert await first.ack()
        assert (await broker.stats()).in_flight == 3
    stats = await broker.stats()
    assert (stats.in_flight, stats.ready_by_priority) == (0, {0: 3})
    async with broker.consume(prefetch=4) as it:
        again = [await take(it, 1) for _ in range(3)]
    assert sorted(d.id for d in again) == ["m1", "m2", "m3"]
    # Claimed but never handed out: not a delivery attempt (counted, they would come back
    # as suspects, each claimed alone, after a mere graceful stop).
    assert [d.attempt for d in again] == [1, 1, 1]


async def test_a_consumer_waiting_on_a_suspect_claims_nothing_and_exits_at_once(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    """A consumer holding a suspect (attempt 2 of max_deliveries=3: one of its last two)
    claims nothing more: its next claim waits for the suspect's settle. Cancelled there (the
    worker stopping), it exits at once and hands the suspect back, counted (it was handed
    out); what it never claimed stays as it was."""
    broker = await make(stack, redis_url, prefix, lease=60, max_deliveries=3)
    await broker.publish(Envelope("suspect", b"x"))
    async with broker.consume(prefetch=1) as it:
        assert (await take(it)).attempt == 1  # handed out, never settled: lost with its holder
    await broker.publish(Envelope("fresh", b"x"))
    async with broker.consume(prefetch=4) as it:
        held = await take(it)
        assert (held.id, held.attempt) == ("suspect", 2)
        with anyio.move_on_after(0.3) as waited:
            await it.__anext__()
        assert waited.cancelled_caught, "claimed beside a held suspect"
        stats = await broker.stats()
        assert (stats.in_flight, stats.ready_by_priority) == (1, {0: 1})
        exiting = time.monotonic()
    assert time.monotonic() - exiting < 1
    async with broker.consume(prefetch=4) as it:
        first, second = await take(it), await take(it)
    assert [(d.id, d.attempt) for d in (first, second)] == [("fresh", 1), ("suspect", 3)]


async def test_a_suspect_is_claimed_alone_keeping_its_place(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    """A claim takes a suspect only alone: met behind others, it is left in its place (FIFO
    and priority kept) and uncounted, and the claim stops; taken first, nothing comes with
    it. The claim reports more ready (no wait), so the consumer claims again at once."""
    broker = await make(stack, redis_url, prefix, lease=60, max_deliveries=3)
    await broker.publish(Envelope("s", b"x", priority=1))
    async with broker.consume(prefetch=1) as it:
        await take(it)  # never settled: lost with its holder
    await broker.publish(Envelope("a", b"x", priority=0))
    await broker.publish(Envelope("b", b"x", priority=1))  # behind s within priority 1
    await broker.publish(Envelope("c", b"x", priority=1))
    raw = broker._require()
    claimed = await lua.CLAIM(raw, broker.keys, (60000, 3, 10, "t/n1", "", ""))
    assert claimed[0] == b"0"
    assert claimed[1::5] == [b"a"]
    claimed = await lua.CLAIM(raw, broker.keys, (60000, 3, 10, "t/n2", "", ""))
    assert (claimed[0], claimed[1::5], claimed[4::5]) == (b"0", [b"s"], [b"2"])
    claimed = await lua.CLAIM(raw, broker.keys, (60000, 3, 10, "t/n3", "", ""))
    assert claimed[1::5] == [b"b", b"c"]
    assert claimed[4::5] == [b"1", b"1"]


async def test_a_message_lost_once_is_claimed_with_others_below_its_last_two(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    """With max_deliveries=5 only the 4th and 5th deliveries are claimed alone
    (qtasks.components.alone_from): a message lost once (a worker killed by a deploy) comes
    back in the same claim as the others, at full speed."""
    broker = await make(stack, redis_url, prefix, lease=60, max_deliveries=5)
    await broker.publish(Envelope("s", b"x"))
    async with broker.consume(prefetch=1) as it:
        await take(it)  # never settled: lost with its holder
    await broker.publish(Envelope("b", b"x"))
    claimed = await lua.CLAIM(broker._require(), broker.keys, (60000, 5, 10, "t/n1", "", ""))
    assert (claimed[1::5], claimed[4::5]) == ([b"s", b"b"], [b"2", b"1"])


async def test_prefetch_is_bounded(redis_url: str, prefix: str, stack: AsyncExitStack) -> None:
    broker = await make(stack, redis_url, prefix)
    for i in range(20):
        await broker.publish(Envelope(f"m{i}", b"x"))
    async with broker.consume(prefetch=3) as it:
        d = await take(it)
        stats = await broker.stats()
        assert stats.in_flight == 3
        assert stats.ready_by_priority == {0: 17}
        await d.ack()


async def test_republish_same_id_replaces(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    broker = await make(stack, redis_url, prefix)
    await broker.publish(Envelope("a", b"old"))
    await broker.publish(Envelope("a", b"new", priority=1))
    async with broker.consume(prefetch=5) as it:
        d = await take(it)
        assert (d.body, d.priority) == (b"new", 1)
        assert await d.ack()
    assert (await broker.stats()).ready_by_priority == {}


async def test_used_before_start() -> None:
    broker = RedisBroker()
    with pytest.raises(ComponentNotStartedError):
        await broker.publish(Envelope("a", b"x"))


async def test_unreachable_url_names_host_and_port_not_password(stack: AsyncExitStack) -> None:
    broker = RedisBroker("redis://alice:s3cret-pw@127.0.0.1:1/0")
    with pytest.raises(BrokerConnectionError) as info:
        await broker.start(stack, QueueConfig(extra={"redis_retries": 0}))
    text = str(info.value)
    assert "127.0.0.1:1" in text
    assert "s3cret" not in text
    assert "s3cret" not in repr(broker)
    # The public target, and the exception's frames' locals (what Sentry or ``pytest -l``
    # record): none shows the password.
    assert "s3cret" not in repr(broker.target)
    tb = info.value.__traceback__
    while tb is not None:
        for name, value in tb.tb_frame.f_locals.items():
            assert "s3cret" not in repr(value) or name in ("url", "self"), name
        tb = tb.tb_next


@pytest.mark.parametrize("component", [RedisBroker, RedisStorage, RedisGlobalConfig])
@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "redis://alice:s3cret-pw@127.0.0.1:6379/0?socket_timeout=abc",
            "redis://alice:***@127.0.0.1:6379/0?socket_timeout=abc",
        ),
        ("redis+cluster://:s3cret-pw@h:7000?max_connections=x", "redis+cluster://:***@h:7000"),
        ("unix:///tmp/redis.sock?db=one&password=s3cret-pw", "password=***"),
    ],
)
def test_a_url_option_the_client_cannot_read_is_refused_when_built(
    component: type[RedisBroker | RedisStorage | RedisGlobalConfig], url: str, shown: str
) -> None:
    # redis-py's ValueError came from start(), and the CLI printed it as a traceback. A
    # ConfigError now, as every bad URL (see the test below).
    with pytest.raises(ConfigError) as info:
        component(url)
    text = str(info.value)
    assert text.startswith("bad Redis URL ")
    assert shown in text
    assert "Invalid value for" in text
    assert "s3cret" not in text + repr(info.value)


@pytest.mark.parametrize("component", [RedisBroker, RedisStorage, RedisGlobalConfig])
@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://alice:s3cret@127.0.0.1:notaport/0", "bad port in Redis URL for host '127.0.0.1'"),
        ("redis://alice:s3cret@127.0.0.1:99999/0", "bad port in Redis URL for host '127.0.0.1'"),
        ("redis://alice:s3cret@[::1/0", "bad Redis URL ***: Invalid IPv6 URL"),
        ("http://alice:s3cret@h/", "unsupported Redis URL scheme 'http': use redis://, "),
        ("redis://alice:s3cret@h/zero", "bad database number 'zero' in Redis URL"),
        ("redis://alice:s3cret@h/0?db=x", "bad Redis URL redis://alice:***@h/0?db=x: Invalid"),
        (b"redis://alice:s3cret@h/0", "the Redis URL must be a str, got bytes"),
    ],
)
def test_a_bad_url_is_a_config_error_when_the_component_is_built(
    component: type[RedisBroker | RedisStorage | RedisGlobalConfig], url: Any, says: str
) -> None:
    """As RabbitMQ's (f70994e): a configuration error, raised by the constructor and so by
    ``from_config``, in one line without the password. It was a ComponentError (the
    component failing or used wrongly), or a bare ValueError (an IPv6 host not closed)."""
    keys = {"broker_url": url, "storage_url": url, "global_config_url": url}
    builds: list[Callable[[], object]] = [lambda: component(url)]
    if isinstance(url, str):  # QueueConfig refuses any other type itself
        builds.append(lambda: component.from_config(QueueConfig(**keys)))
    for build in builds:
        with pytest.raises(ConfigError) as caught:
            build()
        error = caught.value
        assert not isinstance(error, ComponentError)
        assert str(error).startswith(says), str(error)
        assert "\n" not in str(error)
        assert "s3cret" not in str(error) + repr(error)
        assert error.__cause__ is None  # no parser traceback under it
        assert error.__context__ is None or error.__suppress_context__


def test_from_config_reads_url_and_extra() -> None:
    config = QueueConfig(
        broker_url="redis://h:7000/3", extra={"redis_queue": "mail", "redis_prefix": "app"}
    )
    broker = RedisBroker.from_config(config)
    assert (broker.target.host, broker.target.port, broker.target.db) == ("h", 7000, 3)
    assert broker.keys[0] == "{app:mail}:ready"


def record_claims(broker: RedisBroker) -> list[str]:
    """How each claim of ``broker``'s consumers is made from now on: ``"block"`` (wait for a
    wake-up, then claim, in one round trip) or ``"claim"`` (at once)."""
    lane = broker._require()
    assert isinstance(lane, Lane)
    calls: list[str] = []
    block_then_script, script = lane.block_then_script, lane.script

    async def blocking(*args: Any, **kwargs: Any) -> Any:
        calls.append("block")
        return await block_then_script(*args, **kwargs)

    async def at_once(*args: Any, **kwargs: Any) -> Any:
        if args[0] is broker_lua.CLAIM:  # not the acks
            calls.append("claim")
        return await script(*args, **kwargs)

    lane.block_then_script = blocking  # type: ignore[method-assign]
    lane.script = at_once  # type: ignore[method-assign]
    return calls


async def test_an_idle_consumer_claims_once_per_wake_up(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    """A claim that took fewer messages than asked for found the queue empty: until the
    next deadline it told (a lease ending), the next claim waits for a wake-up in the same
    round trip instead of claiming at once first."""
    broker = await make(stack, redis_url, prefix, lease=30)
    calls = record_claims(broker)
    async with broker.consume(prefetch=5) as it:
        for n in range(3):

            async def publish_when_blocked(n: int = n) -> None:
                with anyio.fail_after(3):
                    while calls.count("block") <= n:  # noqa: ASYNC110 - polls a list
                        await anyio.sleep(0.001)
                await broker.publish(Envelope(f"m{n}", b"x"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(publish_when_blocked)
                delivery = await take(it)
            assert delivery.id == f"m{n}"
            assert await delivery.ack()
    # One claim at once (the first: no deadline known yet), then one blocking claim each.
    assert calls == ["claim", "block", "block", "block"]


@pytest.mark.parametrize("stalled", ["before the next pull", "in the turns before the claim"])
async def test_a_consumer_past_its_deadline_claims_at_once(
    redis_url: str, prefix: str, stack: AsyncExitStack, stalled: str
) -> None:
    """Once the deadline a claim told has passed (here: the lease of the message it took, while
    the holder's loop was blocked), the next claim is made at once and promotes the lease that
    ran out: redelivered without waiting for a wake-up. The loop may be blocked before the
    next delivery is pulled, or by another task in the turns the consumer yields before its
    blocking claim: then the time it was going to block for is stale (the CI failure of the
    dead-letter fence test: a sibling's stale result was stored before that claim came)."""
    lease = 0.2
    broker = await make(stack, redis_url, prefix, lease=lease)
    await broker.publish(Envelope("a", b"x"))
    calls = record_claims(broker)
    async with broker.consume(prefetch=5) as it:
        first = await take(it)  # took fewer than asked: block until its lease ends, next
        ends = time.monotonic() + lease

        async def stall() -> None:
            while time.monotonic() < ends + 0.05:
                time.sleep(0.01)  # noqa: ASYNC251 - the scenario: the loop is blocked

        if stalled == "before the next pull":
            await stall()
            second = await take(it, 1)
        else:
            async with anyio.create_task_group() as tg:
                tg.start_soon(stall)  # runs in the consumer's first turn before its claim
                second = await take(it, 1)
        assert (second.id, second.attempt) == ("a", 2)
        assert not await first.ack()
    assert calls[:2] == ["claim", "claim"]


async def test_an_idle_consumer_learns_a_lease_taken_while_it_slept(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    """Two idle consumers (two clients) block for a wake-up; a publish wakes one, which takes
    the message and then stalls (nothing pulls its next delivery). The other, still asleep
    when that lease began, redelivers the message when the lease ends: it never blocks longer
    than a lease, where it used to sleep out its 5 s safety net."""
    lease = 0.3
    brokers = [await make(stack, redis_url, prefix, lease=lease) for _ in range(2)]
    calls = [record_claims(broker) for broker in brokers]
    got: list[tuple[int, RedisDelivery, float]] = []
    async with AsyncExitStack() as consumers:
        its = [await consumers.enter_async_context(b.consume(prefetch=1)) for b in brokers]

        async def pull(i: int) -> None:
            """Deliveries of consumer ``i`` until it holds a first delivery (then it stalls)
            or the redelivery comes."""
            while True:
                delivery = await its[i].__anext__()
                got.append((i, delivery, time.monotonic()))
                if delivery.attempt == 1 or len(got) > 1:
                    return

        async with anyio.create_task_group() as tg:
            for i in range(2):
                tg.start_soon(pull, i)
            with anyio.fail_after(3):
                while not all("block" in c for c in calls):  # noqa: ASYNC110 - polls lists
                    await anyio.sleep(0.001)
            published = time.monotonic()
            await brokers[0].publish(Envelope("a", b"x"))
            with anyio.fail_after(lease + 1.5):  # the old safety net alone took up to 5 s
                while len(got) < 2:  # noqa: ASYNC110 - polls a list
                    await anyio.sleep(0.005)
            tg.cancel_scope.cancel()
        (holder, first, _), (other, second, at) = got
        assert (first.id, first.attempt, second.id, second.attempt) == ("a", 1, "a", 2)
        assert holder != other
        # Redelivered because the lease ran out, not before: as the server counts it, in whole
        # milliseconds (its deadline truncated), and now that the block ends at that deadline
        # rather than at Redis's next hz tick.
        assert at - published >= lease - 0.002
        assert not await first.ack()  # the stalled holder is fenced off
        assert await second.ack()


async def test_wake_ups_stop_at_64_while_nobody_consumes(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    """Every publish pushes one wake-up for the idle consumers, 64 at most; a consumer then
    takes every message, and the claim that empties the queue drops the wake-ups left."""
    broker = await make(stack, redis_url, prefix)
    client = aioredis.Redis.from_url(redis_url)
    stack.push_async_callback(client.aclose)
    notify = f"{{{prefix}:q}}:notify"
    for i in range(100):
        await broker.publish(Envelope(f"m{i}", b"x"))
    assert await client.llen(notify) == 64
    async with broker.consume(prefetch=200) as it:
        taken = [await take(it) for _ in range(100)]
        assert await client.llen(notify) == 0
        assert all([await d.ack() for d in taken])
    assert {d.id for d in taken} == {f"m{i}" for i in range(100)}
