"""The broker contract suite: :class:`BrokerContract`.

Over ~500 lines: a contract suite is a list of tests, one per guarantee of the protocol.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import ClassVar

import anyio
import pytest
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from qtasks.components import Broker, DeadLetter, Delivery, alone_from, delivery_limit
from qtasks.config import QueueConfig
from qtasks.errors import ComponentNotStartedError
from qtasks.messages import Envelope
from qtasks_testing.contract._base import (
    ContractSuite,
    assert_woken,
    single_failure,
    spread,
    wait_until,
)

BrokerFactory = Callable[[QueueConfig], Broker]


def envelope(body: bytes | None = None, *, priority: int = 0, eta: float | None = None) -> Envelope:
    """An envelope with a fresh id; the body defaults to one naming that id."""
    id = uuid.uuid4().hex
    return Envelope(
        id=id, body=body if body is not None else f"body-{id}".encode(), priority=priority, eta=eta
    )


class Consumer:
    """The test's end of an open :meth:`Broker.consume`.

    A background task pulls deliveries from the broker's iterator and hands them over one at a
    time, so a test can wait for "no delivery within N seconds" without cancelling the broker's
    iterator (cancelling ``__anext__`` would end an async generator for good). At most one
    delivery sits in that hand-over beyond what the test received.
    """

    def __init__(self, receive: ObjectReceiveStream[Delivery]) -> None:
        self._receive = receive

    async def next(self, *, timeout: float, what: str = "a delivery") -> Delivery:
        """The next delivery; fail the test if none comes within ``timeout`` seconds."""
        with anyio.move_on_after(timeout):
            return await self._receive.receive()
        pytest.fail(f"timed out after {timeout} s waiting for {what}")

    async def none_within(self, seconds: float) -> Delivery | None:
        """``None`` when nothing is delivered for ``seconds`` (waiting is the assertion)."""
        with anyio.move_on_after(seconds):
            return await self._receive.receive()
        return None


def consuming(broker: Broker, *, prefetch: int = 10) -> AbstractAsyncContextManager[Consumer]:
    """Open ``broker.consume(prefetch=...)`` for the duration of the block."""
    return consuming_from(broker.consume(prefetch=prefetch))


@asynccontextmanager
async def consuming_from(
    opened: AbstractAsyncContextManager[AsyncIterator[Delivery]],
) -> AsyncIterator[Consumer]:
    """:func:`consuming` of a consumer already made (e.g. by ``consume_begun``)."""

    async def pump(deliveries: AsyncIterator[Delivery], send: ObjectSendStream[Delivery]) -> None:
        async with send:
            async for delivery in deliveries:
                await send.send(delivery)

    failure: BaseException | None = None
    async with opened as deliveries:
        send, receive = anyio.create_memory_object_stream[Delivery](0)
        try:
            async with receive, anyio.create_task_group() as tg:
                tg.start_soon(pump, deliveries, send)
                try:
                    yield Consumer(receive)
                finally:
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The block failed (the pump was only cancelled): raise that failure itself, not
            # the task group's wrapper, and only once the broker's consumer is closed.
            failure = single_failure(group)
            if failure is None:
                raise
    if failure is not None:
        raise failure


async def dead_lettered(broker: Broker, count: int) -> list[Envelope]:
    """Publish ``count`` messages and nack each: they are dead letters now."""
    sent = [envelope() for _ in range(count)]
    for item in sent:
        await broker.publish(item)
    async with consuming(broker) as consumer:
        for _ in sent:
            await (await consumer.next(timeout=2)).nack("no")
    return sent


@asynccontextmanager
async def started(factory: BrokerFactory, config: QueueConfig) -> AsyncIterator[Broker]:
    """A broker from ``factory`` started with ``config`` for the duration of the block."""
    async with AsyncExitStack() as stack:
        broker = factory(config)
        await broker.start(stack, config)
        yield broker


async def monotonic_past(moment: float, *, slack: float) -> None:
    """Wait until :func:`time.monotonic` passes ``moment`` (a deadline ``slack`` later)."""

    async def past() -> bool:
        return time.monotonic() > moment

    await wait_until(past, timeout=moment - time.monotonic() + slack, what="the clock")


EXPIRY_ROUNDS = 3
"""Rounds of :meth:`BrokerContract.test_dead_letters_older_than_the_ttl_are_not_listed` at
most, each with twice the TTL of the one before, until one can check everything."""


class BrokerContract(ContractSuite):
    """The guarantees of :class:`qtasks.components.Broker`, as tests.

    Subclass it in a module pytest collects (name it ``Test...``) and provide a
    ``broker_factory`` fixture returning a callable that takes the
    :class:`~qtasks.config.QueueConfig` and returns an **unstarted** broker on an **empty,
    isolated** queue (a fresh queue name or key prefix per call)::

        class TestMyBroker(BrokerContract):
            @pytest.fixture
            def broker_factory(self) -> BrokerFactory:
                return lambda config: MyBroker(url=..., queue=f"t-{uuid.uuid4().hex}")

    The suite starts it with ``await broker.start(stack, config)`` on an
    :class:`~contextlib.AsyncExitStack` it closes after the test; ``config`` has a 1 s lease and
    ``max_deliveries=3``.

    Opt-outs (each one a documented reason, see :class:`ContractSuite`):

    ``cancel_unsupported``
        Why the broker cannot drop a queued message (e.g. an AMQP queue). The suite then checks
        the documented alternative instead of ``test_cancel_*``: :meth:`Broker.cancel` returns
        ``False`` and the message is still delivered, so the worker must find the task record
        cancelled and ack the delivery without running it.
    ``priority_stats_unsupported``
        Why :attr:`BrokerStats.ready_by_priority` cannot be split by priority; the suite then
        only checks that its values add up to the number of ready messages.

    Besides ``timing_slack`` and ``wake_latency`` (see :class:`ContractSuite`):

    ``due_latency``
        Seconds a delayed message may typically arrive after its eta: the median over several
        rounds must stay under it. The protocol allows checking for due messages every
        ~100 ms, which is ~50 ms late in the median and never much over 100 ms; the default
        0.15 fails a check every ~0.3 s or more. A backend that wakes its consumer at the eta
        should lower it (Redis: 0.02), so that a coarse timer there fails. Never raise it to
        admit a longer poll interval.
    """

    cancel_unsupported: ClassVar[str | None] = None
    priority_stats_unsupported: ClassVar[str | None] = None
    due_latency: ClassVar[float] = 0.15

    @pytest.fixture
    async def broker(
        self, broker_factory: BrokerFactory, contract_config: QueueConfig
    ) -> AsyncIterator[Broker]:
        """A started broker from ``broker_factory``, stopped after the test."""
        async with AsyncExitStack() as stack:
            broker = broker_factory(contract_config)
            await broker.start(stack, contract_config)
            yield broker

    # --- lifecycle ------------------------------------------------------------------------

    @pytest.mark.anyio
    async def test_satisfies_the_protocol(
        self, broker_factory: BrokerFactory, contract_config: QueueConfig
    ) -> None:
        assert isinstance(broker_factory(contract_config), Broker)

    @pytest.mark.anyio
    async def test_use_before_start_raises(
        self, broker_factory: BrokerFactory, contract_config: QueueConfig
    ) -> None:
        broker = broker_factory(contract_config)
        with pytest.raises(ComponentNotStartedError):
            await broker.publish(envelope())

    @pytest.mark.anyio
    async def test_shared_start_is_reference_counted(
        self, broker_factory: BrokerFactory, contract_config: QueueConfig
    ) -> None:
        """Several apps in one process may share a component: it stops with the last stack."""
        broker = broker_factory(contract_config)
        first, second = AsyncExitStack(), AsyncExitStack()
        await broker.start(first, contract_config)
        await broker.start(second, contract_config)
        await second.aclose()
        await broker.stats()  # still started: the first stack holds it
        await first.aclose()
        with pytest.raises(ComponentNotStartedError):
            await broker.stats()

    @pytest.mark.anyio
    async def test_use_after_stop_raises(
        self, broker_factory: BrokerFactory, contract_config: QueueConfig
    ) -> None:
        async with AsyncExitStack() as stack:
            broker = broker_factory(contract_config)
            await broker.start(stack, contract_config)
        with pytest.raises(ComponentNotStartedError):
            await broker.publish(envelope())

    # --- delivery -------------------------------------------------------------------------

    @pytest.mark.anyio
    async def test_publish_consume_round_trip(self, broker: Broker) -> None:
        sent = envelope(priority=3)
        await broker.publish(sent)
        async with consuming(broker) as consumer:
            got = await consumer.next(timeout=2)
            assert (got.id, got.body, got.priority, got.attempt) == (sent.id, sent.body, 3, 1)
            assert got.token
            assert await got.ack() is True
            assert await consumer.none_within(0.2) is None

    @pytest.mark.anyio
    async def test_consumer_waiting_is_woken_by_publish(self, broker: Broker) -> None:
        """A consumer with nothing to deliver blocks until a publish wakes it; it does not
        poll: over several rounds the median time from publish to delivery is under
        ``wake_latency`` (no round over ``timing_slack``)."""
        latencies = []
        async with consuming(broker) as consumer:
            for idle in spread(0.05, 0.2):
                assert await consumer.none_within(idle) is None
                sent = envelope()
                published = time.monotonic()
                await broker.publish(sent)
                got = await consumer.next(timeout=1 + self.timing_slack, what="the message")
                latencies.append(time.monotonic() - published)
                assert got.id == sent.id
                assert latencies[-1] < self.timing_slack, f"delivered {latencies[-1]:.3f} s late"
                await got.ack()
        assert_woken(latencies, self.wake_latency, "a waiting consumer, after a publish")

    @pytest.mark.anyio
    async def test_arbitrary_bytes_are_delivered_intact(self, broker: Broker) -> None:
        bodies = [b"", bytes(range(256)) * 4, b"\x00not json\xff", os.urandom(256 * 1024)]
        sent = [envelope(body) for body in bodies]
        for item in sent:
            await broker.publish(item)
        async with consuming(broker) as consumer:
            got = {}
            for _ in sent:
                delivery = await consumer.next(timeout=2)
                got[delivery.id] = delivery.body
                await delivery.ack()
        assert got == {item.id: item.body for item in sent}

    @pytest.mark.anyio
    async def test_lower_priority_number_first_fifo_within_priority(self, broker: Broker) -> None:
        priorities = [5, 1, 3, 1, 0, 5, 1, 0, 3]
        sent = [envelope(priority=p) for p in priorities]
        for item in sent:
            await broker.publish(item)
        expected = [e.id for e in sorted(sent, key=lambda e: e.priority)]  # sort is stable
        async with consuming(broker) as consumer:
            order = []
            for _ in sent:
                delivery = await consumer.next(timeout=2)
                order.append(delivery.id)
                await delivery.ack()
        assert order == expected

    @pytest.mark.anyio
    async def test_negative_priorities_order_before_zero(self, broker: Broker) -> None:
        sent = [envelope(priority=0), envelope(priority=-5), envelope(priority=2)]
        for item in sent:
            await broker.publish(item)
        async with consuming(broker) as consumer:
            order = [(await consumer.next(timeout=2)).priority for _ in sent]
        assert order == [-5, 0, 2]

    @pytest.mark.anyio
    async def test_delayed_message_not_before_eta_promptly_after(self, broker: Broker) -> None:
        """A delayed message is not delivered before its eta, and promptly after it: to a
        consumer opened later, and to one already waiting when it was published (woken at the
        eta, not by a poll). Over several rounds the median lateness is under
        ``due_latency`` (no round over ``timing_slack``)."""
        late: list[float] = []

        async def due(consumer: Consumer, sent: Envelope, eta: float) -> None:
            left = eta - time.time()
            got = await consumer.next(timeout=left + 1 + self.timing_slack, what="the due message")
            arrived = time.time()
            assert got.id == sent.id
            assert arrived >= eta - 0.01, "delivered before its eta"
            late.append(arrived - eta)
            assert late[-1] < self.timing_slack, f"delivered {late[-1]:.3f} s late"
            await got.ack()

        eta = time.time() + 0.6
        sent = envelope(eta=eta)
        await broker.publish(sent)
        async with consuming(broker) as consumer:
            assert await consumer.none_within(0.4) is None
            await due(consumer, sent, eta)
            for delay in spread(0.1, 0.3):
                eta = time.time() + delay
                sent = envelope(eta=eta)
                await broker.publish(sent)
                await due(consumer, sent, eta)
        assert_woken(late, self.due_latency, "a delayed message, after its eta")

    @pytest.mark.anyio
    async def test_eta_in_the_past_is_due_now(self, broker: Broker) -> None:
        sent = envelope(eta=time.time() - 60)
        await broker.publish(sent)
        async with consuming(broker) as consumer:
            assert (await consumer.next(timeout=1)).id == sent.id

    @pytest.mark.anyio
    async def test_due_delayed_message_takes_its_priority_place(self, broker: Broker) -> None:
        late = envelope(priority=5)
        urgent = envelope(priority=0, eta=time.time() + 0.3)
        await broker.publish(late)
        await broker.publish(urgent)
        await anyio.sleep(0.5)  # past the eta: the urgent message is due and must come first
        async with consuming(broker) as consumer:
            order = [(await consumer.next(timeout=2)).id for _ in range(2)]
        assert order == [urgent.id, late.id]

    # --- settling -------------------------------------------------------------------------

    @pytest.mark.anyio
    async def test_ack_removes_for_good(self, broker: Broker, contract_config: QueueConfig) -> None:
        sent = envelope()
        await broker.publish(sent)
        async with consuming(broker) as consumer:
            got = await consumer.next(timeout=2)
            assert await got.ack() is True
            # Past the lease: an acked message must not come back.
            assert await consumer.none_within(contract_config.lease + 0.3) is None
        stats = await broker.stats()
        assert (sum(stats.ready_by_priority.values()), stats.in_flight, stats.delayed) == (0, 0, 0)
        assert await broker.dead_letters() == []

    @pytest.mark.anyio
    async def test_nack_dead_letters_with_reason(self, broker: Broker) -> None:
        sent = envelope(b"\x00poison\xff", priority=2)
        await broker.publish(sent)
        async with consuming(broker) as consumer:
            got = await consumer.next(timeout=2)
            assert await got.nack("undecodable message: boom") is True
            assert await consumer.none_within(0.3) is None
        letters = await broker.dead_letters()
        assert [(d.id, d.body, d.reason) for d in letters] == [
            (sent.id, sent.body, "undecodable message: boom")
        ]
        assert letters[0].priority == 2
        assert letters[0].deliveries >= 1
        assert (await broker.stats()).dead_letters == 1

    @pytest.mark.anyio
    async def test_requeue_dead_letters_puts_them_back(self, broker: Broker) -> None:
        sent = await dead_lettered(broker, 3)
        assert await broker.requeue_dead_letters([sent[1].id, "no-such-id"]) == 1
        async with consuming(broker) as consumer:
            again = await consumer.next(timeout=2)
            assert (again.id, again.body, again.attempt) == (sent[1].id, sent[1].body, 1)
            await again.ack()
            assert await consumer.none_within(0.2) is None
        assert {d.id for d in await broker.dead_letters()} == {sent[0].id, sent[2].id}
        assert await broker.requeue_dead_letters() == 2
        assert await broker.dead_letters() == []
        async with consuming(broker) as consumer:
            ids = {(await consumer.next(timeout=2)).id for _ in range(2)}
        assert ids == {sent[0].id, sent[2].id}

    @pytest.mark.anyio
    async def test_purge_dead_letters_deletes_them_for_good(self, broker: Broker) -> None:
        purge = getattr(broker, "purge_dead_letters", None)
        if purge is None:
            pytest.skip("purge_dead_letters is optional (see qtasks.components)")
        sent = await dead_lettered(broker, 3)
        assert await purge([sent[1].id, "no-such-id"]) == 1
        assert {d.id for d in await broker.dead_letters()} == {sent[0].id, sent[2].id}
        assert await purge([]) == 0
        assert await purge() == 2
        assert await broker.dead_letters() == []
        assert (await broker.stats()).dead_letters == 0
        assert await broker.requeue_dead_letters() == 0  # nothing comes back
        async with consuming(broker) as consumer:
            assert await consumer.none_within(0.2) is None

    @pytest.mark.anyio
    async def test_requeued_dead_letters_keep_their_priority(self, broker: Broker) -> None:
        urgent, usual = envelope(priority=-2), envelope(priority=3)
        for item in (urgent, usual):
            await broker.publish(item)
        async with consuming(broker) as consumer:
            for _ in range(2):
                await (await consumer.next(timeout=2)).nack("no")
        assert {d.id: d.priority for d in await broker.dead_letters()} == {
            urgent.id: -2,
            usual.id: 3,
        }
        assert await broker.requeue_dead_letters() == 2
        # Between the two requeued messages in priority order: a requeue at priority 0 (or
        # any other than the message's own) puts them in the wrong place.
        middle = envelope(priority=1)
        await broker.publish(middle)
        async with consuming(broker) as consumer:
            got = []
            for _ in range(3):
                delivery = await consumer.next(timeout=2)
                got.append((delivery.id, delivery.priority))
                await delivery.ack()
        assert got == [(urgent.id, -2), (middle.id, 1), (usual.id, 3)]

    @pytest.mark.anyio
    async def test_dead_letters_lists_oldest_first_up_to_limit(self, broker: Broker) -> None:
        sent = [envelope() for _ in range(4)]
        for item in sent:
            await broker.publish(item)
        async with consuming(broker) as consumer:
            for _ in sent:
                await (await consumer.next(timeout=2)).nack("no")
        letters: list[DeadLetter] = await broker.dead_letters(limit=2)
        assert [d.id for d in letters] == [sent[0].id, sent[1].id]

    # --- dead-letter retention (dead_letter_ttl, max_dead_letters) -------------------------

    @pytest.mark.anyio
    async def test_dead_letters_older_than_the_ttl_are_not_listed(
        self, broker_factory: BrokerFactory, contract_config: QueueConfig
    ) -> None:
        """Once ``dead_letter_ttl`` passed, a dead letter is neither listed nor counted, though
        no message died since (nothing dead-lettered could have dropped it); a younger one
        stays.

        The young one dies half the TTL after the old ones, so whether it must still be there
        when the old ones are seen gone depends on when that look was made: each round
        measures it. A round on a machine too loaded to look in time (the young one may have
        expired too) still checks what holds anyway, and the test runs another round with a
        TTL twice as long, until one round could check everything."""
        ttl = 2.0
        for _ in range(EXPIRY_ROUNDS):
            config = contract_config.merged(dead_letter_ttl=ttl)
            async with started(broker_factory, config) as broker:
                if await self._old_dead_letters_expire(broker, ttl):
                    return
            ttl *= 2
        pytest.fail(f"{EXPIRY_ROUNDS} rounds, up to a {ttl / 2:g} s TTL, all too slow to tell")

    async def _old_dead_letters_expire(self, broker: Broker, ttl: float) -> bool:
        """One round of the test above: ``False`` when it came too late to check everything.
        Times are taken on the monotonic clock around each call: a letter that died after
        ``t`` is still there at any moment before ``t + ttl``."""
        begun = time.monotonic()
        old = await dead_lettered(broker, 2)
        old_expired = time.monotonic() + ttl  # both expired by then
        listed = [d.id for d in await broker.dead_letters()]
        if time.monotonic() >= begun + ttl:
            return False  # the old ones may have expired before that look
        assert listed == [e.id for e in old]
        await monotonic_past(begun + ttl / 2, slack=self.timing_slack)
        young_born = time.monotonic()
        young = await dead_lettered(broker, 1)
        while True:  # until a look finds the old ones gone; a look begun late must
            asked = time.monotonic()
            letters = [d.id for d in await broker.dead_letters()]
            seen = time.monotonic()
            # Both gone: they died a few milliseconds apart, so a look may fall between.
            if old[0].id not in letters and old[1].id not in letters:
                break
            late = asked - old_expired
            assert late < self.timing_slack, f"expired dead letters still listed {late:.2f} s on"
            await anyio.sleep(0.02)
        dead = (await broker.stats()).dead_letters
        counted = time.monotonic()
        young_dies = young_born + ttl
        if counted < young_dies:
            assert letters == [young[0].id]
            assert dead == 1
            return True
        # Counted too late to tell whether the young one is still there; nothing else may be.
        if seen < young_dies:
            assert letters == [young[0].id]
        else:
            assert letters in ([young[0].id], [])
        assert dead in (0, 1)
        return False

    @pytest.mark.anyio
    async def test_expired_dead_letters_are_not_requeued(
        self, broker_factory: BrokerFactory, contract_config: QueueConfig
    ) -> None:
        """An expired dead letter is not requeued, asked for by id or with all of them, even
        when nothing read or dropped it since it expired."""
        ttl = 1.0
        config = contract_config.merged(dead_letter_ttl=ttl)
        async with started(broker_factory, config) as broker:
            sent = await dead_lettered(broker, 2)
            await monotonic_past(time.monotonic() + ttl + 0.2, slack=self.timing_slack)
            assert await broker.requeue_dead_letters([sent[0].id]) == 0
            assert await broker.requeue_dead_letters() == 0
            async with consuming(broker) as consumer:
                assert await consumer.none_within(0.3) is None
            assert await broker.dead_letters() == []
            assert (await broker.stats()).dead_letters == 0

    @pytest.mark.anyio
    async def test_max_dead_letters_keeps_the_newest(
        self, broker_factory: BrokerFactory, contract_config: QueueConfig
    ) -> None:
        """With ``max_dead_letters = N``, dead-lettering N + k messages keeps the newest N
        (oldest first, as always); the dropped ones cannot be requeued."""
        config = contract_config.merged(max_dead_letters=3)
        async with started(broker_factory, config) as broker:
            sent = await dead_lettered(broker, 5)
            assert [d.id for d in await broker.dead_letters()] == [e.id for e in sent[2:]]
            assert (await broker.stats()).dead_letters == 3
            assert await broker.requeue_dead_letters([sent[0].id, sent[1].id]) == 0
            more = await dead_lettered(broker, 2)
            kept = [sent[4].id, *(e.id for e in more)]
            assert [d.id for d in await broker.dead_letters()] == kept
            assert await broker.requeue_dead_letters() == 3

    @pytest.mark.anyio
    async def test_requeue_with_delay_and_new_body_resets_attempt(
        self, broker: Broker, contract_config: QueueConfig
    ) -> None:
        sent = envelope(b"first")
        await broker.publish(sent)
        async with consuming(broker) as consumer:
            first = await consumer.next(timeout=2)
            # Let it be redelivered once so the attempt counter is above 1.
            second = await consumer.next(timeout=contract_config.lease * 2 + self.timing_slack)
            assert second.attempt == 2
            requeued_at = time.monotonic()
            assert await second.requeue(delay=0.5, body=b"second") is True
            assert await consumer.none_within(0.3) is None
            third = await consumer.next(timeout=1 + self.timing_slack)
            waited = time.monotonic() - requeued_at
            assert 0.49 <= waited < 0.5 + self.timing_slack
            assert (third.id, third.body, third.attempt) == (sent.id, b"second", 1)
            assert third.token not in (first.token, second.token)
            assert await third.ack() is True

    @pytest.mark.anyio
    async def test_requeue_without_delay_is_due_now_and_keeps_body(self, broker: Broker) -> None:
        sent = envelope(priority=1)
        await broker.publish(sent)
        async with consuming(broker) as consumer:
            first = await consumer.next(timeout=2)
            assert await first.requeue() is True
            again = await consumer.next(timeout=1)
            assert (again.id, again.body, again.priority, again.attempt) == (
                sent.id,
                sent.body,
                1,
                1,
            )

    @pytest.mark.anyio
    async def test_a_stopping_workers_requeue_keeps_the_lost_deliveries(
        self, broker: Broker, contract_config: QueueConfig
    ) -> None:
        """A stopping worker's hand-back does not wipe the deliveries lost before it (a
        message that killed workers must still reach its limit): ``count="earlier"`` (held,
        never begun) takes back only this delivery, ``count="kept"`` (a run the stop
        interrupted) counts it, so a message that keeps stopping its workers is
        dead-lettered at the limit like one that keeps killing them."""
        limit, lease = contract_config.max_deliveries, contract_config.lease
        assert limit == 3, "written for the suite's max_deliveries=3"
        sent = envelope()
        await broker.publish(sent)
        async with consuming(broker) as consumer:
            await consumer.next(timeout=2)  # never settled: lost with its holder
            lost_once = await consumer.next(timeout=lease * 2 + self.timing_slack)
            assert lost_once.attempt == 2
            assert await lost_once.requeue(count="earlier") is True
            held = await consumer.next(timeout=1 + self.timing_slack, what="the hand-back")
            assert (held.id, held.attempt) == (sent.id, 2)
            assert await held.requeue(count="kept") is True
            last = await consumer.next(timeout=1 + self.timing_slack, what="the hand-back")
            assert (last.id, last.attempt) == (sent.id, limit)
            assert await last.requeue(count="kept") is True

            async def dead() -> list[DeadLetter]:
                return [d for d in await broker.dead_letters() if d.id == sent.id]

            letters = await wait_until(dead, timeout=2 + self.timing_slack, what="the dead letter")
            assert await consumer.none_within(0.2) is None
        assert str(limit) in letters[0].reason, letters[0].reason

    # --- leases ---------------------------------------------------------------------------

    @pytest.mark.anyio
    async def test_lease_expiry_redelivers_with_next_attempt(
        self, broker: Broker, contract_config: QueueConfig
    ) -> None:
        lease = contract_config.lease
        sent = envelope()
        await broker.publish(sent)
        async with consuming(broker) as holder, consuming(broker) as other:
            first = await holder.next(timeout=2)
            taken = time.monotonic()
            # Either consumer may get the redelivery; the first consumer keeps the old one.
            async with anyio.create_task_group() as tg:
                got: list[Delivery] = []

                async def take(consumer: Consumer) -> None:
                    got.append(await consumer.next(timeout=lease * 2 + self.timing_slack))
                    tg.cancel_scope.cancel()

                tg.start_soon(take, holder)
                tg.start_soon(take, other)
            second = got[0]
            assert time.monotonic() - taken >= lease * 0.9, "redelivered before the lease ran out"
            assert (second.id, second.body, second.attempt) == (sent.id, sent.body, 2)
            assert second.token != first.token
            assert await second.ack() is True

    @pytest.mark.anyio
    async def test_stale_delivery_is_fenced(
        self, broker: Broker, contract_config: QueueConfig
    ) -> None:
        sent = envelope()
        await broker.publish(sent)
        async with consuming(broker) as consumer:
            old = await consumer.next(timeout=2)
            new = await consumer.next(timeout=contract_config.lease * 2 + self.timing_slack)
            assert new.id == old.id
            assert await old.extend() is False
            assert await old.ack() is False
            assert await old.nack("stale") is False
            assert await old.requeue(body=b"stale") is False
            assert await broker.dead_letters() == []
            # The old holder's calls did nothing: the new delivery still owns the message.
            assert await new.extend() is True
            assert await new.ack() is True
            assert await consumer.none_within(contract_config.lease + 0.3) is None

    @pytest.mark.anyio
    async def test_settling_twice_returns_false(self, broker: Broker) -> None:
        for item in (envelope(), envelope()):
            await broker.publish(item)
        async with consuming(broker) as consumer:
            acked = await consumer.next(timeout=2)
            assert await acked.ack() is True
            assert await acked.ack() is False
            assert await acked.nack("late") is False
            assert await acked.extend() is False
            nacked = await consumer.next(timeout=2)
            assert await nacked.nack("no") is True
            assert await nacked.requeue() is False
        assert len(await broker.dead_letters()) == 1

    @pytest.mark.anyio
    async def test_extend_keeps_the_lease(
        self, broker: Broker, contract_config: QueueConfig
    ) -> None:
        lease = contract_config.lease
        sent = envelope()
        await broker.publish(sent)
        async with consuming(broker) as holder, consuming(broker) as other:
            held = await holder.next(timeout=2)
            deadline = time.monotonic() + lease * 2.5
            while time.monotonic() < deadline:
                assert await held.extend() is True
                assert await other.none_within(lease / 3) is None
                assert await holder.none_within(0.01) is None
            assert await held.ack() is True

    @pytest.mark.anyio
    async def test_delivery_limit_dead_letters_with_reason(
        self, broker: Broker, contract_config: QueueConfig
    ) -> None:
        limit, lease = contract_config.max_deliveries, contract_config.lease
        sent = envelope()
        await broker.publish(sent)
        async with consuming(broker) as consumer:
            attempts = []
            for _ in range(limit):
                delivery = await consumer.next(timeout=lease * 2 + self.timing_slack)
                attempts.append(delivery.attempt)  # never settled: the lease runs out
            assert attempts == list(range(1, limit + 1))

            async def dead() -> list[DeadLetter]:
                return [d for d in await broker.dead_letters() if d.id == sent.id]

            letters = await wait_until(
                dead, timeout=lease * 2 + self.timing_slack, what="the dead letter"
            )
            assert await consumer.none_within(0.2) is None
        assert letters[0].body == sent.body
        assert "deliver" in letters[0].reason.lower(), letters[0].reason
        assert str(limit) in letters[0].reason, "the reason should name the limit"

    @pytest.mark.anyio
    async def test_consumer_exit_hands_back_unsettled(
        self, broker: Broker, contract_config: QueueConfig
    ) -> None:
        sent = [envelope(), envelope()]
        for item in sent:
            await broker.publish(item)
        async with consuming(broker) as consumer:
            settled = await consumer.next(timeout=2)
            unsettled = await consumer.next(timeout=2)
            await settled.ack()
        exited = time.monotonic()
        async with consuming(broker) as consumer:
            again = await consumer.next(timeout=contract_config.lease / 2, what="the hand-back")
            assert time.monotonic() - exited < contract_config.lease / 2
            assert again.id == unsettled.id
            assert again.attempt == unsettled.attempt + 1
            assert await unsettled.ack() is False
            assert await again.ack() is True
            assert await consumer.none_within(0.2) is None

    @pytest.mark.anyio
    async def test_taken_but_never_handed_out_is_not_a_delivery(self, broker: Broker) -> None:
        """What a consumer took ahead (its prefetch) and never handed out when it closes goes
        back uncounted: its next delivery is its first (counted, a graceful stop would make
        suspects of a prefetch's worth of messages, see the test below)."""
        sent = [envelope() for _ in range(3)]
        for item in sent:
            await broker.publish(item)
        async with broker.consume(prefetch=10) as deliveries:
            with anyio.fail_after(2):
                first = await deliveries.__anext__()
            assert await first.ack() is True
        async with consuming(broker) as consumer:
            for _ in range(2):
                again = await consumer.next(timeout=2, what="a message taken ahead")
                assert again.attempt == 1, again
                assert await again.ack() is True

    @pytest.mark.anyio
    async def test_a_suspect_is_delivered_alone(self, broker: Broker) -> None:
        """A message on one of its last two allowed deliveries (:func:`alone_from`; with the
        suite's ``max_deliveries=3`` from its second), the earlier ones lost with their
        holders (a worker killed, a lease run out), is a suspect: should it kill its worker
        again, what that worker holds beside it loses a delivery too, and innocent messages
        follow it to the dead-letter queue. So a consumer never takes it together with other
        messages (they stay ready for other consumers, in their order, uncounted), and takes
        nothing more while it holds it, until it is settled or lost.

        Where the suspect comes in the order is the broker's: memory and Redis put a lost
        delivery back behind what was published meanwhile; RabbitMQ puts it back at its old
        place, and a classic queue's copy with its count goes behind the messages ready then.
        What a consumer hands out ahead of it comes in order, uncounted, and may be held."""
        first, suspect, fresh, later = envelope(), envelope(), envelope(), envelope()
        await broker.publish(suspect)
        async with broker.consume(prefetch=1) as deliveries:
            with anyio.fail_after(2):
                held = await deliveries.__anext__()
            assert held.id == suspect.id
            await broker.publish(first)
        # Its holder went away without settling it: the delivery counts, and is lost.
        for item in (fresh, later):
            await broker.publish(item)
        innocents = [first, fresh, later]
        async with consuming(broker) as consumer:
            ahead: list[Delivery] = []  # handed out before the suspect, held unsettled
            while True:
                got = await consumer.next(timeout=2, what="the suspect")
                if got.id == suspect.id:
                    break
                assert (got.id, got.attempt) == (innocents[len(ahead)].id, 1)
                ahead.append(got)
            assert got.attempt == 2
            # Not taken with the suspect, nor after it while it is held: another consumer
            # gets the others, in their order, uncounted (RabbitMQ: none is left on the
            # suspect's channel).
            last = envelope()
            await broker.publish(last)
            async with consuming(broker) as other:
                for item in [*innocents[len(ahead) :], last]:
                    taken = await other.next(timeout=2, what="a message not taken with it")
                    assert (taken.id, taken.attempt) == (item.id, 1)
                    assert await taken.ack() is True
            for delivery in ahead:
                assert await delivery.ack() is True
            resumed = envelope()
            await broker.publish(resumed)
            assert await consumer.none_within(0.3) is None, "taken beside a held suspect"
            assert await got.ack() is True
            after = await consumer.next(timeout=2, what="the message published meanwhile")
            assert (after.id, after.attempt) == (resumed.id, 1)
            assert await after.ack() is True

    @pytest.mark.anyio
    async def test_a_delivery_lost_once_is_not_kept_apart(
        self, broker_factory: BrokerFactory, contract_config: QueueConfig
    ) -> None:
        """Only a message's last two allowed deliveries are kept apart
        (:func:`~qtasks.components.alone_from`): with ``max_deliveries=5`` a message lost once
        with its holder (a worker killed by a deploy) comes back as usual, and its consumer
        goes on taking messages while it holds it, so the deliveries one crash lost come back
        at full speed."""
        config = dataclasses.replace(contract_config, max_deliveries=5)
        async with AsyncExitStack() as stack:
            broker = broker_factory(config)
            await broker.start(stack, config)
            limit = delivery_limit(broker, config)
            assert alone_from(limit) > 2, f"the broker's own delivery limit is {limit}"
            lost = envelope()
            await broker.publish(lost)
            async with broker.consume(prefetch=1) as deliveries:
                with anyio.fail_after(2):
                    held = await deliveries.__anext__()
                assert held.id == lost.id
            behind = envelope()
            await broker.publish(behind)
            async with consuming(broker) as consumer:
                # Both taken while neither is settled (in whichever order the broker hands
                # them: RabbitMQ puts a lost delivery back at its old place).
                taken = [
                    await consumer.next(timeout=2, what="the message lost once, or the other")
                    for _ in range(2)
                ]
                assert {d.id: d.attempt for d in taken} == {lost.id: 2, behind.id: 1}
                for delivery in taken:
                    assert await delivery.ack() is True

    # --- consumers ------------------------------------------------------------------------

    @pytest.mark.anyio
    async def test_bounded_prefetch_leaves_the_rest_to_others(self, broker: Broker) -> None:
        total, prefetch = 20, 2
        for _ in range(total):
            await broker.publish(envelope())
        async with consuming(broker, prefetch=prefetch) as slow:
            await slow.next(timeout=2)  # held, never settled during the test
            # The slow consumer may hold at most ``prefetch`` more (plus the one being handed
            # over by the test helper): everything else must reach another consumer.
            floor = total - 1 - prefetch - 1
            async with consuming(broker, prefetch=total) as fast:
                got = 0
                while got < floor:
                    await (await fast.next(timeout=2, what=f"message {got + 1} of {floor}")).ack()
                    got += 1

    @pytest.mark.anyio
    async def test_concurrent_consumers_each_message_once(self, broker: Broker) -> None:
        items = [envelope(priority=i % 3) for i in range(60)]
        sent = {item.id for item in items}
        for item in items:
            await broker.publish(item)
        received: list[str] = []
        done = anyio.Event()

        async def work(prefetch: int) -> None:
            async with consuming(broker, prefetch=prefetch) as consumer:
                while not done.is_set():
                    delivery = await consumer.none_within(0.05)
                    if delivery is None:
                        continue
                    received.append(delivery.id)
                    assert await delivery.ack() is True
                    if len(received) >= len(sent):
                        done.set()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for prefetch in (1, 2, 5, 10):
                    tg.start_soon(work, prefetch)
        assert sorted(received) == sorted(sent), "a message was lost or delivered twice"

    # --- cancel ---------------------------------------------------------------------------

    @pytest.mark.anyio
    async def test_cancel_queued_message(self, broker: Broker) -> None:
        dropped, kept = envelope(), envelope()
        await broker.publish(dropped)
        await broker.publish(kept)
        if self.cancel_unsupported is not None:
            assert await broker.cancel(dropped.id) is False
            async with consuming(broker) as consumer:
                ids = {(await consumer.next(timeout=2)).id for _ in range(2)}
            assert ids == {dropped.id, kept.id}, "cannot cancel, so it must still be delivered"
            return
        assert await broker.cancel(dropped.id) is True
        assert await broker.cancel(dropped.id) is False
        assert await broker.cancel("no-such-id") is False
        async with consuming(broker) as consumer:
            got = await consumer.next(timeout=2)
            assert got.id == kept.id
            await got.ack()
            assert await consumer.none_within(0.3) is None

    @pytest.mark.anyio
    async def test_cancel_delayed_message(self, broker: Broker) -> None:
        sent = envelope(eta=time.time() + 0.3)
        await broker.publish(sent)
        if self.cancel_unsupported is not None:
            assert await broker.cancel(sent.id) is False
            async with consuming(broker) as consumer:
                assert (await consumer.next(timeout=2)).id == sent.id
            return
        assert await broker.cancel(sent.id) is True
        async with consuming(broker) as consumer:
            assert await consumer.none_within(0.6) is None
        assert (await broker.stats()).delayed == 0

    @pytest.mark.anyio
    async def test_cancel_of_a_delivered_message_returns_false(self, broker: Broker) -> None:
        sent = envelope()
        await broker.publish(sent)
        async with consuming(broker) as consumer:
            held = await consumer.next(timeout=2)
            assert await broker.cancel(sent.id) is False
            assert await held.ack() is True

    # --- introspection --------------------------------------------------------------------

    @pytest.mark.anyio
    async def test_stats(self, broker: Broker) -> None:
        for priority in (0, 0, 2):
            await broker.publish(envelope(priority=priority))
        await broker.publish(envelope(eta=time.time() + 60))
        stats = await broker.stats()
        if self.priority_stats_unsupported is None:
            assert stats.ready_by_priority == {0: 2, 2: 1}
        else:
            assert sum(stats.ready_by_priority.values()) == 3
        assert (stats.delayed, stats.in_flight, stats.dead_letters) == (1, 0, 0)
        async with consuming(broker, prefetch=1) as consumer:
            held = await consumer.next(timeout=2)

            async def counted() -> bool:
                stats = await broker.stats()
                ready = sum(stats.ready_by_priority.values())
                # A consumer may hold its prefetch besides the delivery the test has.
                return stats.in_flight >= 1 and ready + stats.in_flight == 3

            await wait_until(counted, timeout=2, what="stats to count the delivery in flight")
            await held.nack("no")
            stats = await broker.stats()
            assert stats.dead_letters == 1
            assert stats.delayed == 1

    @pytest.mark.anyio
    async def test_stats_of_an_empty_queue(self, broker: Broker) -> None:
        stats = await broker.stats()
        assert sum(stats.ready_by_priority.values()) == 0
        assert (stats.delayed, stats.in_flight, stats.dead_letters) == (0, 0, 0)
