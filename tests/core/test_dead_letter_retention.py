"""Dead-letter retention of the in-memory broker (``dead_letter_ttl``, ``max_dead_letters``) on
an injected clock: what the contract suite cannot set up on every backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import pytest

from qtasks import MemoryBroker, QueueConfig
from qtasks.messages import Envelope

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@asynccontextmanager
async def started(clock: Clock, **settings: object) -> AsyncIterator[MemoryBroker]:
    async with AsyncExitStack() as stack:
        broker = MemoryBroker(clock=clock)
        await broker.start(stack, QueueConfig().merged(**settings))
        yield broker


async def bury(broker: MemoryBroker, id: str) -> None:
    """Publish ``id`` and nack its delivery."""
    await broker.publish(Envelope(id, id.encode(), 0))
    async with broker.consume(prefetch=1) as deliveries:
        delivery = await anext(aiter(deliveries))
        assert delivery.id == id
        assert await delivery.nack("poison")


async def test_expiry_follows_the_clock_and_a_letter_that_died_again_is_the_newest(
    clock: Clock,
) -> None:
    async with started(clock, dead_letter_ttl=60.0, max_dead_letters=2) as broker:
        await bury(broker, "a")
        clock.now += 30
        await bury(broker, "b")
        await broker.requeue_dead_letters(["a"])
        await bury(broker, "a")  # dead again: now the newest, b is the oldest
        await bury(broker, "c")  # over the cap of 2: b goes, not a
        assert [d.id for d in await broker.dead_letters()] == ["a", "c"]
        clock.now += 59.9
        assert len(await broker.dead_letters()) == 2
        clock.now += 0.1  # exactly dead_letter_ttl after both died
        assert await broker.dead_letters() == []
        assert (await broker.stats()).dead_letters == 0


async def test_a_letter_that_died_while_the_clock_was_set_back_expires_too(
    clock: Clock,
) -> None:
    """Dropping starts with the oldest in dying order; one that died later with an earlier
    time (the clock set back) is still not listed once expired."""
    async with started(clock, dead_letter_ttl=60.0) as broker:
        await bury(broker, "a")
        clock.now -= 50
        await bury(broker, "b")  # died after a, at an earlier time
        clock.now += 50 + 20  # b expired (70 s old), a not (20 s old)
        assert [d.id for d in await broker.dead_letters()] == ["a"]
        assert await broker.requeue_dead_letters(["b"]) == 0


async def test_the_delivery_limit_dead_letters_within_the_cap(clock: Clock) -> None:
    """A message dead-lettered by a claim (past ``max_deliveries``) is capped as a nacked one."""
    async with started(clock, max_dead_letters=2, max_deliveries=1, lease=0.05) as broker:
        await bury(broker, "a")
        await bury(broker, "b")
        await broker.publish(Envelope("c", b"c", 0))
        buried = anyio.Event()

        async def notice(id: str, reason: str) -> None:
            buried.set()

        async def claim(deliveries: AsyncIterator[object]) -> None:
            await anext(deliveries)

        async with broker.consume_noticing(prefetch=1, buried=notice) as deliveries:
            first = await anext(aiter(deliveries))
            assert first.id == "c"
            # Not settled: its lease runs out; the claim that would redeliver it buries it.
            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(claim, deliveries)
                    await buried.wait()
                    tg.cancel_scope.cancel()
        assert [d.id for d in await broker.dead_letters()] == ["b", "c"]


async def test_none_keeps_every_dead_letter(clock: Clock) -> None:
    async with started(clock, dead_letter_ttl=None, max_dead_letters=None) as broker:
        for id in "abc":
            await bury(broker, id)
        clock.now += 10 * 365 * 86400
        assert [d.id for d in await broker.dead_letters()] == ["a", "b", "c"]
