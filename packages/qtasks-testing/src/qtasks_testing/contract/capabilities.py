"""Contract suites of the optional capabilities of :mod:`qtasks.components`.

:class:`SharedServerContract`, :class:`SettleBeginContract`, :class:`BeginOnClaimContract`,
:class:`BeginManyContract`, :class:`LeaseBatchContract`, :class:`CancelCheckContract` and
:class:`CancelFeedContract` check :class:`~qtasks.components.SharedServer`,
:class:`~qtasks.components.SettleBegin`, :class:`~qtasks.components.BeginOnClaim`,
:class:`~qtasks.components.BeginMany`, :class:`~qtasks.components.LeaseBatch`,
:class:`~qtasks.components.CancelCheck` and :class:`~qtasks.components.CancelFeed`. Each is
wired like the basic suites (a ``broker_factory`` and/or ``storage_factory`` fixture). A
component without the capability (``isinstance`` says no) has every test of the suite
*skipped* with a reason naming it, so a capability that is missing, or lost in a
refactoring, shows in the report instead of passing.

Over ~500 lines: a contract suite per optional capability, each a list of tests, one per
guarantee. :class:`ConsumeHealthContract` and :class:`LeaseDeadlineContract` check
:class:`~qtasks.components.ConsumeHealth` and :class:`~qtasks.components.LeaseDeadline` the
same way.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, cast

import anyio
import pytest

from qtasks.components import (
    AttemptLog,
    BeginMany,
    BeginOnClaim,
    Broker,
    BuryNotice,
    CancelCheck,
    CancelFeed,
    ConsumeHealth,
    DeadLetter,
    Delivery,
    FreshWait,
    LeaseBatch,
    LeaseDeadline,
    SettleBegin,
    SharedServer,
    Storage,
    delivery_lease,
)
from qtasks.config import QueueConfig
from qtasks.errors import TaskTimeoutError
from qtasks.messages import Envelope
from qtasks.record import TaskRecord, TaskStatus
from qtasks_testing.contract._base import ContractSuite, assert_woken, spread, wait_until
from qtasks_testing.contract.broker import (
    BrokerFactory,
    Consumer,
    consuming,
    consuming_from,
    envelope,
)
from qtasks_testing.contract.storage import StorageFactory, finished, record


def lacks(component: object, capability: type) -> str:
    """The skip reason of a suite whose component does not implement ``capability``."""
    return (
        f"{type(component).__name__} does not implement the optional capability "
        f"{capability.__name__} (isinstance check), so its contract suite does not apply"
    )


@dataclass(slots=True)
class Shared:
    """What :class:`SharedServerContract`'s tests get: the started broker (twice, typed as
    each protocol) and the started storage it shares a server with."""

    broker: Broker
    server: SharedServer
    storage: Storage

    def new(self, **fields: Any) -> tuple[Envelope, TaskRecord]:
        """A new task's envelope and record (same uuid)."""
        rec = record(**fields)
        return Envelope(id=rec.uuid, body=f"body-{rec.uuid}".encode()), rec

    async def begun(self, rec: TaskRecord, token: str) -> TaskRecord:
        """``rec`` begun by the delivery holding ``token``, as the worker would."""
        claim = rec.copy()
        claim.status, claim.attempt, claim.token, claim.worker = (
            TaskStatus.PROCESS,
            1,
            token,
            "contract-worker",
        )
        return await self.storage.begin(claim)


class _SharedFixtures(ContractSuite):
    capabilities: tuple[type, ...] = (SharedServer,)

    @pytest.fixture
    async def shared(
        self,
        broker_factory: BrokerFactory,
        storage_factory: StorageFactory,
        contract_config: QueueConfig,
    ) -> AsyncIterator[Shared]:
        broker = broker_factory(contract_config)
        for capability in self.capabilities:
            if not isinstance(broker, capability):
                pytest.skip(lacks(broker, capability))
        assert isinstance(broker, SharedServer)
        async with AsyncExitStack() as stack:
            storage = storage_factory(contract_config)
            await storage.start(stack, contract_config)
            await broker.start(stack, contract_config)
            if not broker.shares_server_with(storage):
                pytest.fail(
                    f"{type(broker).__name__}.shares_server_with() is False for the suite's "
                    f"{type(storage).__name__}: storage_factory must build a storage this "
                    "broker shares a server with"
                )
            yield Shared(broker, broker, storage)


class SharedServerContract(_SharedFixtures):
    """The guarantees of :class:`qtasks.components.SharedServer`, as tests.

    Provide a ``broker_factory`` (as for :class:`~qtasks_testing.contract.BrokerContract`) and a
    ``storage_factory`` (as for :class:`~qtasks_testing.contract.StorageContract`) whose storage
    the broker :meth:`~qtasks.components.SharedServer.shares_server_with` (for a server-backed
    pair: the same server, e.g. the same key prefix on one Redis). Every test is skipped when
    the broker is not a ``SharedServer``; a storage the broker does not share a server with is
    an error of the wiring.
    """

    @staticmethod
    async def deliveries(consumer: Consumer, count: int) -> dict[str, Delivery]:
        got: dict[str, Delivery] = {}
        for _ in range(count):
            delivery = await consumer.next(timeout=2)
            got[delivery.id] = delivery
        return got

    @pytest.mark.anyio
    async def test_shares_no_server_with_a_foreign_storage(self, shared: Shared) -> None:
        assert shared.server.shares_server_with(cast(Storage, _ForeignStorage())) is False

    @pytest.mark.anyio
    async def test_publish_new_stores_the_record_then_publishes(self, shared: Shared) -> None:
        sent, rec = shared.new(priority=2)
        async with consuming(shared.broker) as consumer:
            await shared.server.publish_new(sent, shared.storage, rec)
            got = await consumer.next(timeout=2)
            # The record was added before the message was published: whoever receives the
            # message finds the record.
            assert await shared.storage.get(rec.uuid) == rec
            assert (got.id, got.body) == (sent.id, sent.body)
            assert await got.ack() is True
            assert await consumer.none_within(0.2) is None

    @pytest.mark.anyio
    async def test_publish_new_replaces_a_stored_record(self, shared: Shared) -> None:
        """``publish_new`` is ``storage.add(record)`` (replace), e.g. a task id reused."""
        sent, rec = shared.new()
        await shared.storage.add(rec)
        assert await shared.storage.save(finished(rec, returning="old")) is True
        fresh = record(uuid=rec.uuid, priority=1)
        await shared.server.publish_new(sent, shared.storage, fresh)
        assert await shared.storage.get(rec.uuid) == fresh
        async with consuming(shared.broker) as consumer:
            assert (await consumer.next(timeout=2)).id == rec.uuid

    @pytest.mark.anyio
    async def test_ack_final_stores_fenced_and_acks(
        self, shared: Shared, contract_config: QueueConfig
    ) -> None:
        sent, rec = shared.new()
        await shared.server.publish_new(sent, shared.storage, rec)
        async with consuming(shared.broker) as consumer:
            delivery = await consumer.next(timeout=2)
            begun = await shared.begun(rec, delivery.token)
            done = finished(begun, returning={"answer": 42})
            assert await shared.server.ack_final(delivery, shared.storage, done) is True
            assert await shared.storage.get(rec.uuid) == done
            assert await delivery.ack() is False, "ack_final did not ack the delivery"
            assert await consumer.none_within(contract_config.lease + 0.3) is None
        with anyio.fail_after(2):
            assert (await shared.storage.wait(rec.uuid, 2)).status is TaskStatus.SUCCESS

    @pytest.mark.anyio
    async def test_ack_final_refused_by_the_fence_acks_nothing(self, shared: Shared) -> None:
        """Another attempt owns the record: its result is not written, and the message stays
        with its holder (acking it would lose the owning attempt's message)."""
        sent, rec = shared.new()
        await shared.server.publish_new(sent, shared.storage, rec)
        async with consuming(shared.broker) as consumer:
            delivery = await consumer.next(timeout=2)
            owner = await shared.begun(rec, "another-attempt")
            stale = finished(owner, returning="stale", token=delivery.token)
            assert await shared.server.ack_final(delivery, shared.storage, stale) is False
            assert await shared.storage.get(rec.uuid) == owner
            assert await delivery.extend() is True, "ack_final settled a fenced-off delivery"
            assert await delivery.ack() is True

    @pytest.mark.anyio
    async def test_ack_final_refused_because_final_acks(
        self, shared: Shared, contract_config: QueueConfig
    ) -> None:
        """Cancelled while it ran: the cancel stays, and the message is gone (the task is
        over), yet ``ack_final`` says the save was not accepted."""
        sent, rec = shared.new()
        await shared.server.publish_new(sent, shared.storage, rec)
        async with consuming(shared.broker) as consumer:
            delivery = await consumer.next(timeout=2)
            begun = await shared.begun(rec, delivery.token)
            cancelled = await shared.storage.cancel(rec.uuid, "cancelled while running")
            assert cancelled is not None
            done = finished(begun, returning="too late")
            assert await shared.server.ack_final(delivery, shared.storage, done) is False
            stored = await shared.storage.get(rec.uuid)
            assert stored is not None
            assert (stored.status, stored.cancel_reason) == (
                TaskStatus.CANCEL,
                "cancelled while running",
            )
            assert await delivery.ack() is False, "the message of an ended task was not acked"
            assert await consumer.none_within(contract_config.lease + 0.3) is None

    @pytest.mark.anyio
    async def test_ack_final_over_a_final_record_without_a_token_acks(
        self, shared: Shared, contract_config: QueueConfig
    ) -> None:
        """A stored record without a token accepts any fence, so a refusal there is only
        because it is final (e.g. reset by ``add`` and then cancelled): the task is over."""
        sent, rec = shared.new()
        await shared.server.publish_new(sent, shared.storage, rec)
        async with consuming(shared.broker) as consumer:
            delivery = await consumer.next(timeout=2)
            assert await shared.storage.cancel(rec.uuid, "before it began") is not None
            done = finished(rec, returning="late", token=delivery.token)
            assert await shared.server.ack_final(delivery, shared.storage, done) is False
            stored = await shared.storage.get(rec.uuid)
            assert stored is not None
            assert stored.status is TaskStatus.CANCEL
            assert await delivery.ack() is False, "the message of an ended task was not acked"
            assert await consumer.none_within(contract_config.lease + 0.3) is None

    @pytest.mark.anyio
    async def test_ack_finals_is_ack_final_per_pair_in_order(
        self, shared: Shared, contract_config: QueueConfig
    ) -> None:
        news = [shared.new() for _ in range(3)]
        for sent, rec in news:
            await shared.server.publish_new(sent, shared.storage, rec)
        (_, fenced), (_, accepted), (_, ended) = news
        assert await shared.server.ack_finals(shared.storage, []) == []
        async with consuming(shared.broker) as consumer:
            held = await self.deliveries(consumer, 3)
            owner = await shared.begun(fenced, "another-attempt")
            accepted_done = finished(await shared.begun(accepted, held[accepted.uuid].token))
            ended_done = finished(await shared.begun(ended, held[ended.uuid].token))
            await shared.storage.cancel(ended.uuid, "stop")
            fenced_done = finished(owner, token=held[fenced.uuid].token)
            results = await shared.server.ack_finals(
                shared.storage,
                [
                    (held[fenced.uuid], fenced_done),
                    (held[accepted.uuid], accepted_done),
                    (held[ended.uuid], ended_done),
                ],
            )
            assert results == [False, True, False]
            assert await shared.storage.get(fenced.uuid) == owner
            assert await shared.storage.get(accepted.uuid) == accepted_done
            stored = await shared.storage.get(ended.uuid)
            assert stored is not None
            assert stored.status is TaskStatus.CANCEL
            assert await held[accepted.uuid].ack() is False, "the accepted one was not acked"
            assert await held[ended.uuid].ack() is False, "the ended one was not acked"
            assert await held[fenced.uuid].ack() is True, "the fenced-off one was acked"
            assert await consumer.none_within(contract_config.lease + 0.3) is None


class SettleBeginContract(_SharedFixtures):
    """The guarantees of :class:`qtasks.components.SettleBegin`, as tests.

    Wired as :class:`SharedServerContract`. Every test is skipped when the broker is not both
    a ``SharedServer`` and a ``SettleBegin``."""

    capabilities = (SharedServer, SettleBegin)
    worker = "contract-worker"

    def claim(self, rec: TaskRecord, token: str) -> TaskRecord:
        """``rec`` as the worker asks to begin it for the delivery holding ``token``."""
        claim = rec.copy()
        claim.status, claim.attempt, claim.token, claim.worker = (
            TaskStatus.PROCESS,
            1,
            token,
            self.worker,
        )
        return claim

    @staticmethod
    def folding(shared: Shared) -> SettleBegin:
        return cast(SettleBegin, shared.broker)

    @pytest.mark.anyio
    async def test_ack_finals_begin_settles_then_begins(
        self, shared: Shared, contract_config: QueueConfig
    ) -> None:
        """One task settled and the next begun in one call; the settle comes first, so a
        begin of the task it settled finds it final and leaves it."""
        (sent_a, a), (sent_b, b) = shared.new(), shared.new()
        for sent, rec in ((sent_a, a), (sent_b, b)):
            await shared.server.publish_new(sent, shared.storage, rec)
        async with consuming(shared.broker) as consumer:
            held = await SharedServerContract.deliveries(consumer, 2)
            done = finished(await shared.begun(a, held[a.uuid].token), returning="a")
            saved, begun = await self.folding(shared).ack_finals_begin(
                shared.storage,
                [(held[a.uuid], done)],
                [self.claim(b, held[b.uuid].token), self.claim(a, "a-copy")],
            )
            assert saved == [True]
            assert await shared.storage.get(a.uuid) == done
            assert await held[a.uuid].ack() is False, "the settled task was not acked"
            assert len(begun) == 2
            next_, again = begun
            assert next_ is not None
            assert (next_.status, next_.token, next_.worker, next_.attempt) == (
                TaskStatus.PROCESS,
                held[b.uuid].token,
                self.worker,
                1,
            )
            assert (next_.args, next_.kwargs) == (b.args, b.kwargs)
            assert await shared.storage.get(b.uuid) == next_, "begun is what is stored"
            assert again == done, "the begin of a final record changed it"
            assert await held[b.uuid].ack() is True
            assert await consumer.none_within(contract_config.lease + 0.3) is None

    @pytest.mark.anyio
    async def test_ack_finals_begin_leaves_a_claim_another_delivery_took_over(
        self, shared: Shared, contract_config: QueueConfig
    ) -> None:
        """A claim whose delivery's lease ran out, its message delivered again meanwhile (its
        worker stalled), is not begun: the record stays the new delivery's, so that its
        result is not refused."""
        sent, rec = shared.new()
        await shared.server.publish_new(sent, shared.storage, rec)
        async with consuming(shared.broker) as first:
            stale = await first.next(timeout=2)
            async with consuming(shared.broker) as second:
                fresh = await second.next(timeout=contract_config.lease + 5)
                assert fresh.token != stale.token
                current = await shared.begun(rec, fresh.token)
                _, [got] = await self.folding(shared).ack_finals_begin(
                    shared.storage, [], [self.claim(rec, stale.token)]
                )
                assert got is not None and got.token == fresh.token, got
                assert await shared.storage.get(rec.uuid) == current
                assert await fresh.ack() is True

    @pytest.mark.anyio
    async def test_ack_finals_begin_with_one_list_empty(self, shared: Shared) -> None:
        folding = self.folding(shared)
        assert await folding.ack_finals_begin(shared.storage, [], []) == ([], [])
        sent, rec = shared.new()
        await shared.server.publish_new(sent, shared.storage, rec)
        async with consuming(shared.broker) as consumer:
            delivery = await consumer.next(timeout=2)
            saved, begun = await folding.ack_finals_begin(
                shared.storage, [], [self.claim(rec, delivery.token)]
            )
            assert saved == []
            [only] = begun
            assert only is not None
            assert (only.status, only.token) == (TaskStatus.PROCESS, delivery.token)
            done = finished(only, returning=2)
            assert await folding.ack_finals_begin(shared.storage, [(delivery, done)], []) == (
                [True],
                [],
            )
            assert await shared.storage.get(rec.uuid) == done
            assert await delivery.ack() is False, "the settled task was not acked"

    @pytest.mark.anyio
    async def test_ack_finals_begin_without_a_stored_record(self, shared: Shared) -> None:
        """No record stored: the call returns ``None`` (the caller begins it alone) or the
        record begun from the claim, as ``begin`` would."""
        rec = record()
        [begun] = (
            await self.folding(shared).ack_finals_begin(
                shared.storage, [], [self.claim(rec, "token-1")]
            )
        )[1]
        if begun is None:
            begun = await shared.storage.begin(self.claim(rec, "token-1"))
        assert (begun.uuid, begun.status, begun.token) == (rec.uuid, TaskStatus.PROCESS, "token-1")
        assert await shared.storage.get(rec.uuid) == begun


class BeginOnClaimContract(_SharedFixtures):
    """The guarantees of :class:`qtasks.components.BeginOnClaim`, as tests.

    Wired as :class:`SharedServerContract` (the capability is used only with a storage the
    broker shares a server with). Every test is skipped when the broker is not both a
    ``SharedServer`` and a ``BeginOnClaim``."""

    capabilities = (SharedServer, BeginOnClaim)
    worker = "contract-worker"

    def consuming_begun(
        self, shared: Shared, starts: Callable[[], int] = lambda: 10
    ) -> AbstractAsyncContextManager[Consumer]:
        return consuming_from(
            cast(BeginOnClaim, shared.broker).consume_begun(
                prefetch=10, storage=shared.storage, worker=self.worker, starts=starts
            )
        )

    @pytest.mark.anyio
    async def test_consume_begun_begins_the_record_of_each_delivery(self, shared: Shared) -> None:
        rec = record(attempt=5)
        sent = Envelope(id=rec.uuid, body=json.dumps({"attempt": 2, "x": "ü"}).encode())
        await shared.server.publish_new(sent, shared.storage, rec)
        async with self.consuming_begun(shared) as consumer:
            delivery = await consumer.next(timeout=2)
            begun: object = getattr(delivery, "begun", "missing")
            assert isinstance(begun, TaskRecord), f"delivery.begun is {begun!r}"
            assert (begun.status, begun.token, begun.worker) == (
                TaskStatus.PROCESS,
                delivery.token,
                self.worker,
            )
            assert begun.attempt == 3, "the body's attempt + 1"
            assert (begun.args, begun.kwargs, begun.task_name) == (
                rec.args,
                rec.kwargs,
                rec.task_name,
            )
            assert await shared.storage.get(rec.uuid) == begun, "begun is what is stored"
            # The claim's token fences the record from then on, as begin's does.
            stale = finished(begun, token="stale")
            assert await shared.storage.save(stale, fence="stale") is False
            done = finished(begun, returning=1)
            assert await shared.server.ack_final(delivery, shared.storage, done) is True

    @pytest.mark.anyio
    async def test_consume_begun_keeps_the_attempt_of_a_body_that_is_not_json(
        self, shared: Shared
    ) -> None:
        rec = record(attempt=4)
        sent = Envelope(id=rec.uuid, body=b"\x00not json\xff")
        await shared.server.publish_new(sent, shared.storage, rec)
        async with self.consuming_begun(shared) as consumer:
            delivery = await consumer.next(timeout=2)
            begun = getattr(delivery, "begun", None)
            assert begun is not None
            assert (begun.status, begun.token, begun.attempt) == (
                TaskStatus.PROCESS,
                delivery.token,
                4,
            )
            assert await delivery.ack() is True

    @pytest.mark.anyio
    async def test_consume_begun_leaves_a_final_record_alone(self, shared: Shared) -> None:
        sent, rec = shared.new()
        await shared.server.publish_new(sent, shared.storage, rec)
        cancelled = await shared.storage.cancel(rec.uuid, "not wanted")
        assert cancelled is not None
        async with self.consuming_begun(shared) as consumer:
            delivery = await consumer.next(timeout=2)
            begun = getattr(delivery, "begun", None)
            assert begun is not None
            assert (begun.status, begun.cancel_reason) == (TaskStatus.CANCEL, "not wanted")
            assert begun.token != delivery.token
            assert await shared.storage.get(rec.uuid) == cancelled, "a final record was written"
            assert await delivery.ack() is True

    @pytest.mark.anyio
    async def test_consume_begun_begins_only_what_starts_at_once(self, shared: Shared) -> None:
        """``starts()`` is 1 at the first claim, 0 after: of three messages, the first
        claimed is begun, the other two keep their queued record (so that a cancel made
        while they wait in a worker is seen when they start)."""
        sent = [shared.new() for _ in range(3)]
        for envelope_, rec in sent:
            await shared.server.publish_new(envelope_, shared.storage, rec)
        answers = iter([1])

        def starts() -> int:
            return next(answers, 0)

        async with self.consuming_begun(shared, starts) as consumer:
            deliveries = [await consumer.next(timeout=2) for _ in sent]
            first, *rest = deliveries
            begun = getattr(first, "begun", None)
            assert begun is not None, "the first message claimed starts at once: begun"
            assert (begun.status, begun.token) == (TaskStatus.PROCESS, first.token)
            for delivery in rest:
                assert getattr(delivery, "begun", "missing") is None, "begun though it waits"
                stored = await shared.storage.get(delivery.id)
                assert stored is not None
                assert (stored.status, stored.token) == (TaskStatus.NEW, None), (
                    "the record of a message that waits was touched by its claim"
                )
            for delivery in deliveries:
                assert await delivery.ack() is True

    @pytest.mark.anyio
    async def test_consume_begun_without_a_record_gives_none(self, shared: Shared) -> None:
        sent = envelope()
        await shared.broker.publish(sent)
        async with self.consuming_begun(shared) as consumer:
            delivery = await consumer.next(timeout=2)
            assert delivery.id == sent.id
            assert getattr(delivery, "begun", "missing") is None
            assert await shared.storage.get(sent.id) is None, "a record was made up"
            assert await delivery.ack() is True

    @pytest.mark.anyio
    async def test_a_message_the_claim_dead_letters_ends_its_record(
        self, shared: Shared, contract_config: QueueConfig
    ) -> None:
        """Every delivery of the message is lost (its worker killed each time: here the
        lease just runs out); the claim that finds it past ``max_deliveries`` dead-letters it
        and its record ends ``error`` (before, it stayed ``process`` for ever on the
        in-memory backend: ``wait`` waited for a task that would never end). The ended record
        keeps when its last run began (``started_at``) and on which worker: that run is a
        run of the task too (before, it had no ``started_at``, and the dashboard's history
        left the last lost run out)."""
        limit, lease = contract_config.max_deliveries, contract_config.lease
        sent, rec = shared.new()
        await shared.server.publish_new(sent, shared.storage, rec)
        async with self.consuming_begun(shared) as consumer:
            for attempt in range(1, limit + 1):
                delivery = await consumer.next(timeout=lease * 2 + 1)
                assert delivery.attempt == attempt  # never settled: the lease runs out
            last: TaskRecord | None = getattr(delivery, "begun", None)
            assert last is not None and last.status is TaskStatus.PROCESS
            try:
                ended = await shared.storage.wait(rec.uuid, timeout=lease * 2 + 1)
            except TaskTimeoutError:
                pytest.fail("the record of the message the claim dead-lettered never ended")
        assert (ended.status, ended.token) == (TaskStatus.ERROR, "dead-letter")
        assert ended.error is not None and ended.error.startswith("dead-lettered: ")
        [letter] = [d for d in await shared.broker.dead_letters() if d.id == rec.uuid]
        assert ended.error == f"dead-lettered: {letter.reason}"
        assert (ended.started_at, ended.worker) == (last.updated_at, last.worker)
        assert ended.updated_at >= last.updated_at

    @pytest.mark.anyio
    async def test_each_record_a_claim_ends_is_told_once_as_stored(
        self, shared: Shared, contract_config: QueueConfig
    ) -> None:
        """Every delivery of two messages is lost; the claim that dead-letters them awaits
        ``ended`` with the record it ended, as stored, once (the worker fires
        ``qtasks_task_dead_lettered`` with it). A record that was final already (cancelled
        here; or ended by its last worker, which fired the hook) is not told: the claim
        ended nothing."""
        limit, lease = contract_config.max_deliveries, contract_config.lease
        (sent, rec), (kept_sent, kept) = shared.new(), shared.new()
        for envelope_, record_ in ((sent, rec), (kept_sent, kept)):
            await shared.server.publish_new(envelope_, shared.storage, record_)
        told: list[TaskRecord] = []

        async def ended(record: TaskRecord) -> None:
            told.append(record)

        opened = cast(BeginOnClaim, shared.broker).consume_begun(
            prefetch=10, storage=shared.storage, worker=self.worker, starts=lambda: 10, ended=ended
        )
        async with consuming_from(opened) as consumer:
            for _ in range(limit * 2):  # never settled: the leases run out
                await consumer.next(timeout=lease * 2 + self.timing_slack)
            cancelled = await shared.storage.cancel(kept.uuid, "not wanted")
            assert cancelled is not None and cancelled.status is TaskStatus.CANCEL

            async def both_dead() -> bool:
                dead = {d.id for d in await shared.broker.dead_letters()}
                return {rec.uuid, kept.uuid} <= dead

            await wait_until(
                both_dead, timeout=lease * 2 + self.timing_slack, what="both dead letters"
            )

            async def told_of_it() -> list[TaskRecord]:
                return told

            await wait_until(told_of_it, timeout=self.timing_slack, what="the record told")
            # One more claim after those: anything it would tell twice is told by now.
            later = envelope()
            await shared.broker.publish(later)
            delivery = await consumer.next(timeout=2, what="a message after the dead ones")
            assert delivery.id == later.id and await delivery.ack() is True
        stored = await shared.storage.get(rec.uuid)
        assert stored is not None and (stored.status, stored.token) == (
            TaskStatus.ERROR,
            "dead-letter",
        )
        assert told == [stored], "told other than once, or not as stored, or the final one"
        assert await shared.storage.get(kept.uuid) == cancelled, "a final record was ended"

    @pytest.mark.anyio
    async def test_a_message_published_again_replaces_even_a_delivered_one(
        self, shared: Shared
    ) -> None:
        """A claim does not check publish generations: the broker replaces a message
        published again under its id, so the copy it claims is the one published last (the
        held delivery of the older copy is fenced; its worker's begin refuses it)."""
        sent, rec = shared.new()
        await shared.server.publish_new(sent, shared.storage, rec)
        async with self.consuming_begun(shared, lambda: 0) as consumer:
            older = await consumer.next(timeout=2)
            await shared.broker.publish(replace(sent, body=b"published again"))
            newer = await consumer.next(timeout=2, what="the message published again")
            assert (newer.id, newer.body) == (sent.id, b"published again")
            assert await consumer.none_within(0.3) is None, "the older copy is still queued"
            assert await older.ack() is False, "the older delivery was not fenced"
            assert await newer.ack() is True


class _ForeignStorage:
    """A storage of no backend: no broker shares a server with it (never started)."""

    def __repr__(self) -> str:
        return "_ForeignStorage()"


class _BrokerCapability(ContractSuite):
    """A suite of an optional broker capability: its ``broker`` fixture skips every test when
    the broker is not a ``capability``."""

    capability: type

    @pytest.fixture
    async def broker(
        self, broker_factory: BrokerFactory, contract_config: QueueConfig
    ) -> AsyncIterator[Broker]:
        broker = broker_factory(contract_config)
        if not isinstance(broker, self.capability):
            pytest.skip(lacks(broker, self.capability))
        async with AsyncExitStack() as stack:
            await broker.start(stack, contract_config)
            yield broker


class ConsumeHealthContract(_BrokerCapability):
    """The guarantees of :class:`qtasks.components.ConsumeHealth`, as tests: a broker whose
    consumers hear from the server is not stalled, and one whose consumers are gone says so
    at once (a stall left behind by a closed consumer would fail a worker's ``/livez`` for
    ever). Stalling a consumer takes a network fault, which each backend's own tests make
    (a fault proxy in front of the real server).

    Provide a ``broker_factory`` fixture, as for :class:`~qtasks_testing.contract.BrokerContract`.
    Every test is skipped when the broker is not a ``ConsumeHealth``."""

    capability = ConsumeHealth

    STALL_BOUND = 0.5
    """Seconds a healthy consumer may count as trying: not its own bounded wait for messages
    (a polling broker's block), which is not a stall, so little beyond 0."""

    IDLE_SPAN = 2.5
    """Seconds an idle consumer is watched: over two of a polling broker's blocks at the
    suite's 1 s lease (Redis blocks for the lease when it is under 5 s)."""

    @pytest.mark.anyio
    async def test_a_broker_nobody_consumes_from_is_not_stalled(self, broker: Broker) -> None:
        stalled = cast(ConsumeHealth, broker).consume_stalled()
        assert type(stalled) is float and stalled == 0.0

    @pytest.mark.anyio
    async def test_an_idle_consumer_waiting_for_messages_is_not_stalled(
        self, broker: Broker
    ) -> None:
        """Its wait for messages is one it asked the server for: a probe's stall limit under
        that wait must not fail an idle, healthy worker."""
        health = cast(ConsumeHealth, broker)
        most = 0.0
        async with consuming(broker) as consumer:
            end = time.monotonic() + self.IDLE_SPAN
            while time.monotonic() < end:
                assert await consumer.none_within(0.05) is None
                most = max(most, health.consume_stalled())
        assert 0.0 <= most < self.STALL_BOUND, f"an idle consumer reported {most} s stalled"

    @pytest.mark.anyio
    async def test_a_consumer_answered_is_not_stalled_and_leaves_no_stall_behind(
        self, broker: Broker
    ) -> None:
        health = cast(ConsumeHealth, broker)
        await broker.publish(envelope())
        async with consuming(broker) as consumer:
            delivery = await consumer.next(timeout=5)
            assert 0.0 <= health.consume_stalled() < self.STALL_BOUND
            assert await delivery.ack() is True
            assert await consumer.none_within(0.2) is None  # trying again, answered or waiting
            assert 0.0 <= health.consume_stalled() < self.STALL_BOUND
        assert health.consume_stalled() == 0.0


class LeaseDeadlineContract(ContractSuite):
    """The guarantees of :class:`qtasks.components.LeaseDeadline` (a capability of the broker's
    deliveries), as tests: ``held_until`` is the lease counted from the sending of the call
    that took or last renewed the delivery, never from its reply, so the worker may begin a
    task before it without asking the broker.

    Provide a ``broker_factory`` fixture, as for :class:`~qtasks_testing.contract.BrokerContract`.
    Every test is skipped when the broker's deliveries are not ``LeaseDeadline``."""

    EPSILON = 0.005
    """Seconds of clock rounding tolerated."""

    @pytest.fixture
    async def broker(
        self, broker_factory: BrokerFactory, contract_config: QueueConfig
    ) -> AsyncIterator[Broker]:
        broker = broker_factory(contract_config)
        async with AsyncExitStack() as stack:
            await broker.start(stack, contract_config)
            yield broker

    async def _sent_between(
        self, broker: Broker, config: QueueConfig, call: Callable[[], Any]
    ) -> tuple[float, float, float]:
        """``(before, after, lease)`` around ``await call()``."""
        before = time.monotonic()
        await call()
        return before, time.monotonic(), delivery_lease(broker, config)

    def _check(self, until: float, before: float, after: float, lease: float) -> None:
        assert before - self.EPSILON <= until - lease <= after + self.EPSILON, (
            f"held_until is {until - before:.4f} s after the call was made and "
            f"{until - after:.4f} s after it returned, for a lease of {lease} s"
        )

    @pytest.mark.anyio
    async def test_held_until_is_a_lease_from_the_claim(
        self, broker: Broker, contract_config: QueueConfig
    ) -> None:
        async with consuming(broker) as consumer:
            got: list[Delivery] = []

            async def claim() -> None:
                await broker.publish(envelope())  # the waiting consumer claims it now
                got.append(await consumer.next(timeout=5))

            before, after, lease = await self._sent_between(broker, contract_config, claim)
            (delivery,) = got
            if not isinstance(delivery, LeaseDeadline):
                pytest.skip(lacks(delivery, LeaseDeadline))
            self._check(delivery.held_until, before, after, lease)
            assert await delivery.ack() is True

    @pytest.mark.anyio
    async def test_a_renewal_moves_it_to_a_lease_from_the_renewal(
        self, broker: Broker, contract_config: QueueConfig
    ) -> None:
        await broker.publish(envelope())
        async with consuming(broker) as consumer:
            delivery = await consumer.next(timeout=5)
            if not isinstance(delivery, LeaseDeadline):
                pytest.skip(lacks(delivery, LeaseDeadline))
            renewals: list[Callable[[], Any]] = [delivery.extend]
            if isinstance(broker, LeaseBatch):
                renewals.append(partial(broker.extend_many, [delivery]))
            for renew in renewals:
                await anyio.sleep(0.05)  # so that a held_until left unmoved shows
                before, after, lease = await self._sent_between(broker, contract_config, renew)
                self._check(delivery.held_until, before, after, lease)
            assert await delivery.ack() is True


class LeaseBatchContract(_BrokerCapability):
    """The guarantees of :class:`qtasks.components.LeaseBatch`, as tests.

    Provide a ``broker_factory`` fixture, as for :class:`~qtasks_testing.contract.BrokerContract`.
    Every test is skipped when the broker is not a ``LeaseBatch``."""

    capability = LeaseBatch

    @pytest.mark.anyio
    async def test_extend_many_keeps_the_leases(
        self, broker: Broker, contract_config: QueueConfig
    ) -> None:
        """Deliveries renewed past their original lease are not delivered again."""
        lease = contract_config.lease
        for _ in range(3):
            await broker.publish(envelope())
        async with consuming(broker) as holder:
            held = [await holder.next(timeout=2) for _ in range(3)]
            # Opened once the holder has every message: anything it gets is a redelivery.
            async with consuming(broker) as other:
                deadline = time.monotonic() + lease * 2.5
                while time.monotonic() < deadline:
                    assert await cast(LeaseBatch, broker).extend_many(held) == [True] * 3
                    assert await other.none_within(lease / 3) is None
                    assert await holder.none_within(0.01) is None
                for delivery in held:
                    assert await delivery.ack() is True

    @pytest.mark.anyio
    async def test_extend_many_is_false_for_settled_and_stale_in_order(
        self, broker: Broker, contract_config: QueueConfig
    ) -> None:
        lease = contract_config.lease
        for _ in range(3):
            await broker.publish(envelope())
        async with consuming(broker) as consumer:
            lost, acked, kept = [await consumer.next(timeout=2) for _ in range(3)]
            assert await acked.ack() is True
            async with anyio.create_task_group() as tg:

                async def keep() -> None:
                    while True:
                        assert await kept.extend() is True
                        await anyio.sleep(lease / 4)

                tg.start_soon(keep)
                # ``lost`` is not renewed: its lease runs out and it is delivered again.
                again = await consumer.next(timeout=lease * 2 + self.timing_slack)
                tg.cancel_scope.cancel()
            assert again.id == lost.id
            renewed = await cast(LeaseBatch, broker).extend_many([lost, acked, kept, again])
            assert renewed == [False, False, True, True]
            assert await kept.ack() is True
            assert await again.ack() is True

    @pytest.mark.anyio
    async def test_extend_many_of_nothing(self, broker: Broker) -> None:
        assert await cast(LeaseBatch, broker).extend_many([]) == []


class BuryNoticeContract(_BrokerCapability):
    """The guarantees of :class:`qtasks.components.BuryNotice`, as tests.

    Provide a ``broker_factory`` fixture, as for :class:`~qtasks_testing.contract.BrokerContract`.
    Every test is skipped when the broker is not a ``BuryNotice``."""

    capability = BuryNotice

    @staticmethod
    def noticing(
        broker: Broker, told: list[tuple[str, str]]
    ) -> AbstractAsyncContextManager[Consumer]:
        async def buried(id: str, reason: str) -> None:
            told.append((id, reason))

        return consuming_from(cast(BuryNotice, broker).consume_noticing(prefetch=10, buried=buried))

    @pytest.mark.anyio
    async def test_a_message_dead_lettered_past_its_limit_is_told_with_its_reason(
        self, broker: Broker, contract_config: QueueConfig
    ) -> None:
        """Every delivery of the message is lost (its worker killed each time: here the
        lease just runs out); the consumer that dead-letters it says so, once."""
        limit, lease = contract_config.max_deliveries, contract_config.lease
        sent, other = envelope(), envelope()
        told: list[tuple[str, str]] = []
        await broker.publish(sent)
        async with self.noticing(broker, told) as consumer:
            for attempt in range(1, limit + 1):
                delivery = await consumer.next(timeout=lease * 2 + self.timing_slack)
                assert (delivery.id, delivery.attempt) == (sent.id, attempt)
            await broker.publish(other)  # taken by the consumer once it passed the dead one
            later = await consumer.next(timeout=lease * 2 + self.timing_slack)
            assert later.id == other.id
            assert await later.ack() is True

            async def told_of_it() -> list[tuple[str, str]]:
                return [pair for pair in told if pair[0] == sent.id]

            [(_, reason)] = await wait_until(
                told_of_it, timeout=lease * 2 + self.timing_slack, what="the notice"
            )
        [letter] = [d for d in await broker.dead_letters() if d.id == sent.id]
        assert reason == letter.reason
        assert told == [(sent.id, reason)], "told more than once, or of another message"

    @pytest.mark.anyio
    async def test_a_notice_whose_record_was_not_written_is_told_again(
        self, broker: Broker, contract_config: QueueConfig
    ) -> None:
        """``buried`` returns False at the first notice of a dead letter (its record could
        not be written: the storage was down): the consumer keeps the notice and tells it
        again later, on its own, while it goes on delivering. Told True, it is not told again,
        not even as the consumer closes."""
        limit, lease = contract_config.max_deliveries, contract_config.lease
        sent, other = envelope(), envelope()
        told: list[tuple[str, str]] = []
        again = anyio.Event()

        async def buried(id: str, reason: str) -> bool:
            told.append((id, reason))
            if id == sent.id and len(told) > 1:
                again.set()
            return len(told) > 1

        await broker.publish(sent)
        noticing = cast(BuryNotice, broker).consume_noticing(prefetch=10, buried=buried)
        async with consuming_from(noticing) as consumer:
            for attempt in range(1, limit + 1):
                delivery = await consumer.next(timeout=lease * 2 + self.timing_slack)
                assert (delivery.id, delivery.attempt) == (sent.id, attempt)
            await broker.publish(other)
            later = await consumer.next(timeout=lease * 2 + self.timing_slack)
            assert later.id == other.id
            assert await later.ack() is True
            # A polling broker may keep the notice for a lease, then tell it at an idle claim.
            with anyio.fail_after(lease * 4 + self.timing_slack):
                await again.wait()
        [letter] = [d for d in await broker.dead_letters() if d.id == sent.id]
        assert told == [(sent.id, letter.reason)] * 2, "not told again, or told once more"

    @pytest.mark.anyio
    async def test_a_nack_is_not_told(self, broker: Broker) -> None:
        """A delivery the worker gives up on (:meth:`Delivery.nack`) is the worker's own
        doing: the notice is only for what the broker dead-letters by itself."""
        sent = envelope()
        told: list[tuple[str, str]] = []
        await broker.publish(sent)
        async with self.noticing(broker, told) as consumer:
            delivery = await consumer.next(timeout=2)
            assert await delivery.nack("given up by the test") is True

            async def dead() -> list[DeadLetter]:
                return [d for d in await broker.dead_letters() if d.id == sent.id]

            await wait_until(dead, timeout=5, what="the dead letter")
            assert await consumer.none_within(0.2) is None
        assert told == []


class _StorageCapability(ContractSuite):
    capability: type

    @pytest.fixture
    async def storage(
        self, storage_factory: StorageFactory, contract_config: QueueConfig
    ) -> AsyncIterator[Storage]:
        storage = storage_factory(contract_config)
        if not isinstance(storage, self.capability):
            pytest.skip(lacks(storage, self.capability))
        async with AsyncExitStack() as stack:
            await storage.start(stack, contract_config)
            yield storage


async def running(storage: Storage, token: str = "t1") -> TaskRecord:
    """A stored record begun by a delivery (status ``process``)."""
    rec = record()
    await storage.add(rec)
    claim = record(uuid=rec.uuid, status=TaskStatus.PROCESS, attempt=1, token=token)
    return await storage.begin(claim)


class BeginManyContract(_StorageCapability):
    """The guarantees of :class:`qtasks.components.BeginMany`, as tests.

    Provide a ``storage_factory`` fixture, as for
    :class:`~qtasks_testing.contract.StorageContract`. Every test is skipped when the storage
    is not a ``BeginMany``."""

    capability = BeginMany

    @pytest.mark.anyio
    async def test_begin_many_is_begin_of_each_in_order(self, storage: Storage) -> None:
        queued, retried, gone = record(parent_uuid="p-1"), record(attempt=1), record()
        for rec in (queued, retried, gone):
            await storage.add(rec)
        await storage.cancel(gone.uuid, "not wanted")
        unknown = record()  # no stored record: begun as begin would, stored from the claim
        claims = []
        for i, rec in enumerate((queued, retried, gone, unknown)):
            claim = rec.copy()
            claim.status, claim.attempt, claim.token, claim.worker = (
                TaskStatus.PROCESS,
                rec.attempt + 1,
                f"tok-{i}",
                "worker-a",
            )
            claims.append(claim)
        begun = await cast(BeginMany, storage).begin_many(claims)
        assert [r.uuid for r in begun] == [c.uuid for c in claims]
        for claim, got in zip(claims[:2] + claims[3:], begun[:2] + begun[3:], strict=True):
            assert (got.status, got.attempt, got.token, got.worker) == (
                TaskStatus.PROCESS,
                claim.attempt,
                claim.token,
                "worker-a",
            )
            assert await storage.get(claim.uuid) == got, "begun is what is stored"
        assert begun[0].parent_uuid == "p-1", "other fields kept from the stored record"
        assert (begun[2].status, begun[2].cancel_reason) == (TaskStatus.CANCEL, "not wanted")
        # Each begun attempt's token fences writes from then on, as begin's does.
        assert await storage.save(finished(begun[0], token="stale"), fence="stale") is False
        assert await storage.save(finished(begun[0]), fence="tok-0") is True

    @pytest.mark.anyio
    async def test_begin_many_of_nothing(self, storage: Storage) -> None:
        assert await cast(BeginMany, storage).begin_many([]) == []


class AttemptLogContract(_StorageCapability):
    """The guarantees of :class:`qtasks.components.AttemptLog`, as tests.

    Provide a ``storage_factory`` fixture, as for
    :class:`~qtasks_testing.contract.StorageContract`. Every test is skipped when the storage
    is not an ``AttemptLog``."""

    capability = AttemptLog

    @staticmethod
    def claim(rec: TaskRecord, attempt: int, token: str, worker: str) -> TaskRecord:
        out = rec.copy()
        out.status, out.attempt, out.token, out.worker = TaskStatus.PROCESS, attempt, token, worker
        return out

    @pytest.mark.anyio
    async def test_a_retried_then_lost_attempt_is_kept_as_it_ended(self, storage: Storage) -> None:
        log = cast(AttemptLog, storage)
        rec = record()
        await storage.add(rec)
        first = await storage.begin(self.claim(rec, 1, "t1", "worker-a"))
        assert await log.attempts(rec.uuid) == []
        retry = finished(first, TaskStatus.RETRY, error="ValueError: boom", token=None)
        assert await storage.save(retry, fence="t1") is True
        await storage.begin(self.claim(rec, 2, "t2", "worker-b"))
        await storage.begin(self.claim(rec, 2, "t2", "worker-b"))  # the same delivery again
        [kept] = await log.attempts(rec.uuid)
        assert (kept.status, kept.attempt, kept.error, kept.worker) == (
            TaskStatus.RETRY,
            1,
            "ValueError: boom",
            "worker-a",
        )
        # worker-b is lost: a third delivery begins over its 'process' record.
        third = await storage.begin(self.claim(rec, 3, "t3", "worker-c"))
        assert await storage.save(finished(third), fence="t3") is True
        both = await log.attempts(rec.uuid)
        assert [(r.status, r.attempt, r.worker, r.token) for r in both] == [
            (TaskStatus.RETRY, 1, "worker-a", None),
            (TaskStatus.PROCESS, 2, "worker-b", "t2"),
        ]
        assert (await storage.get(rec.uuid)).status is TaskStatus.SUCCESS  # type: ignore[union-attr]

    @pytest.mark.anyio
    async def test_a_first_attempt_keeps_nothing(self, storage: Storage) -> None:
        log = cast(AttemptLog, storage)
        rec = record()
        await storage.add(rec)
        begun = await storage.begin(self.claim(rec, 1, "t1", "worker-a"))
        await storage.save(finished(begun), fence="t1")
        assert await log.attempts(rec.uuid) == []
        assert await log.attempts("no-such-task") == []

    @pytest.mark.anyio
    @pytest.mark.parametrize("status", [TaskStatus.ERROR, TaskStatus.PROCESS])
    async def test_a_record_replaced_by_add_starts_with_no_attempts(
        self, storage: Storage, status: TaskStatus
    ) -> None:
        """:meth:`Storage.add` replaces a record whole (a deliberate reset: a dead letter
        requeued, a task published again under its uuid), final or not: the attempts of the
        record it replaced are not the new one's; the new one's own are kept from then on."""
        log = cast(AttemptLog, storage)
        rec = record()
        await storage.add(rec)
        await storage.begin(self.claim(rec, 1, "t1", "worker-a"))
        second = await storage.begin(self.claim(rec, 2, "t2", "worker-b"))
        if status.final:
            ended = finished(second, status, error="dead-lettered: delivery limit reached")
            assert await storage.save(ended, fence="t2") is True
        assert len(await log.attempts(rec.uuid)) == 1
        reset = record(uuid=rec.uuid)
        await storage.add(reset)
        assert await storage.get(rec.uuid) == reset
        assert await log.attempts(rec.uuid) == [], "the replaced record's attempts were kept"
        await storage.begin(self.claim(reset, 1, "t3", "worker-c"))
        third = await storage.begin(self.claim(reset, 2, "t4", "worker-d"))
        assert await storage.save(finished(third), fence="t4") is True
        kept = await log.attempts(rec.uuid)
        assert [(r.attempt, r.worker, r.token) for r in kept] == [(1, "worker-c", "t3")]

    @pytest.mark.anyio
    async def test_kept_attempts_expire_with_the_record(
        self, storage_factory: StorageFactory, contract_config: QueueConfig
    ) -> None:
        config = contract_config.merged(result_ttl=0.3)
        storage = storage_factory(config)
        assert isinstance(storage, AttemptLog)
        async with AsyncExitStack() as stack:
            await storage.start(stack, config)
            rec = record()
            await storage.add(rec)
            await storage.begin(self.claim(rec, 1, "t1", "worker-a"))
            second = await storage.begin(self.claim(rec, 2, "t2", "worker-b"))
            await storage.save(finished(second), fence="t2")
            assert len(await storage.attempts(rec.uuid)) == 1

            async def gone() -> bool:
                return (
                    await storage.get(rec.uuid) is None and await storage.attempts(rec.uuid) == []
                )

            await wait_until(gone, timeout=3.0, what="the record and its attempts to expire")


class FreshWaitContract(_StorageCapability):
    """The guarantees of :class:`qtasks.components.FreshWait`, as tests.

    Provide a ``storage_factory`` fixture, as for
    :class:`~qtasks_testing.contract.StorageContract`. Every test is skipped when the storage
    is not a ``FreshWait``."""

    capability = FreshWait

    @pytest.mark.anyio
    async def test_wait_fresh_returns_the_final_record_as_wait_does(self, storage: Storage) -> None:
        fresh = cast(FreshWait, storage)
        rec = record()
        await storage.add(rec)
        got: list[TaskRecord] = []

        async def waiter() -> None:
            got.append(await fresh.wait_fresh(rec.uuid, 5))

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()  # the waiter blocks before it turns final
            assert got == []
            claim = record(uuid=rec.uuid, status=TaskStatus.PROCESS, attempt=1, token="t1")
            begun = await storage.begin(claim)
            await storage.save(finished(begun, returning=7), fence="t1")
        assert (got[0].status, got[0].returning) == (TaskStatus.SUCCESS, 7)
        # Final a moment ago: the wait returns at once.
        with anyio.fail_after(1):
            again = await fresh.wait_fresh(rec.uuid, 5)
        assert again == got[0]

    @pytest.mark.anyio
    async def test_wait_fresh_times_out_like_wait(self, storage: Storage) -> None:
        rec = record()
        await storage.add(rec)
        with pytest.raises(TaskTimeoutError):
            await cast(FreshWait, storage).wait_fresh(rec.uuid, 0.2)


class CancelCheckContract(_StorageCapability):
    """The guarantees of :class:`qtasks.components.CancelCheck`, as tests.

    Provide a ``storage_factory`` fixture, as for
    :class:`~qtasks_testing.contract.StorageContract`. Every test is skipped when the storage
    is not a ``CancelCheck``."""

    capability = CancelCheck

    @pytest.mark.anyio
    async def test_cancelled_returns_the_reasons_of_cancelled_records_only(
        self, storage: Storage
    ) -> None:
        queued, busy, saved = record(), await running(storage), await running(storage, "t2")
        await storage.add(queued)
        pending, waiting, done = record(), await running(storage, "t3"), record()
        await storage.add(pending)
        await storage.add(done)
        assert await storage.save(finished(done, returning=1)) is True
        await storage.cancel(queued.uuid, "not wanted")
        await storage.cancel(busy.uuid, "stop it")
        # A cancel the worker stores itself (the task was cancelled where it ran).
        by_save = finished(saved, TaskStatus.CANCEL, cancel_reason="shutting down")
        assert await storage.save(by_save, fence="t2") is True
        uuids = [r.uuid for r in (pending, queued, waiting, busy, done, saved)]
        found = await cast(CancelCheck, storage).cancelled([*uuids, uuid.uuid4().hex])
        assert found == {
            queued.uuid: "not wanted",
            busy.uuid: "stop it",
            saved.uuid: "shutting down",
        }
        for uid, reason in found.items():  # the same reason the stored record has
            stored = await storage.get(uid)
            assert stored is not None
            assert stored.cancel_reason == reason

    @pytest.mark.anyio
    async def test_cancelled_of_nothing(self, storage: Storage) -> None:
        assert await cast(CancelCheck, storage).cancelled([]) == {}
        assert await cast(CancelCheck, storage).cancelled([uuid.uuid4().hex]) == {}


class _Ears:
    """A follower's ``on_cancel``: what it heard, and an event for the test to wait on."""

    def __init__(self) -> None:
        self.heard: list[tuple[str, str]] = []
        self._news = anyio.Event()

    def __call__(self, uuid: str, reason: str) -> None:
        self.heard.append((uuid, reason))
        self._news.set()

    async def hear(self, count: int, timeout: float, what: str) -> None:
        """Until ``count`` notices were heard; fails after ``timeout`` seconds."""
        with anyio.move_on_after(timeout):
            while True:
                # A fresh event before the count is read: a notice after the read sets it.
                news = self._news = anyio.Event()
                if len(self.heard) >= count:
                    return
                await news.wait()
        pytest.fail(f"{what} was not heard within {timeout} s (heard {self.heard})")


class CancelFeedContract(_StorageCapability):
    """The guarantees of :class:`qtasks.components.CancelFeed`, as tests (in one process).

    Provide a ``storage_factory`` fixture, as for
    :class:`~qtasks_testing.contract.StorageContract`. Every test is skipped when the storage
    is not a ``CancelFeed``. A cancel is pushed to the followers, not polled for: the tests
    compare the median time to hear one with ``wake_latency``."""

    capability = CancelFeed

    @pytest.mark.anyio
    async def test_follow_cancels_reports_cancels_of_running_records(
        self, storage: Storage
    ) -> None:
        """Only cancels of running records are heard, each once, woken not polled: over
        several rounds the median time from ``cancel`` to the notice is under
        ``wake_latency`` (no round over ``timing_slack``); an ended feed reports nothing."""
        ears = _Ears()
        live: list[bool] = []
        feed = cast(CancelFeed, storage)
        expected: list[tuple[str, str]] = []
        latencies = []
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                await tg.start(partial(feed.follow_cancels, ears, on_live=live.append))
                assert live == [True], "on_live(True) was not called by the time it started"
                queued, done = record(), record()
                await storage.add(queued)
                await storage.add(done)
                await storage.save(finished(done))
                await storage.cancel(queued.uuid, "queued one")
                await storage.cancel(done.uuid, "finished one")
                for i, idle in enumerate(spread(0.02, 0.2)):
                    await anyio.sleep(idle)  # at another point of any poll cycle
                    busy = await running(storage, f"t{i}")
                    cancelled = time.monotonic()
                    await storage.cancel(busy.uuid, f"running one {i}")
                    await ears.hear(i + 1, self.timing_slack, f"the cancel of round {i}")
                    latencies.append(time.monotonic() - cancelled)
                    expected.append((busy.uuid, f"running one {i}"))
                    assert ears.heard == expected
                await anyio.sleep(0.1)  # room for a wrong notice to arrive too
                assert ears.heard == expected
                tg.cancel_scope.cancel()  # ends the feed
        # Ended: it reports nothing more.
        late = await running(storage, "t9")
        await storage.cancel(late.uuid, "after the end")
        await anyio.sleep(0.2)
        assert ears.heard == expected
        assert_woken(latencies, self.wake_latency, "a cancel feed follower, after a cancel")

    @pytest.mark.anyio
    async def test_every_follower_hears_a_cancel(self, storage: Storage) -> None:
        """Each cancel reaches every follower, woken not polled (the median time until the
        last of them heard it is under ``wake_latency``, no round over ``timing_slack``)."""
        feed = cast(CancelFeed, storage)
        ears = [_Ears(), _Ears()]
        expected: list[tuple[str, str]] = []
        latencies = []
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for one in ears:
                    await tg.start(partial(feed.follow_cancels, one))
                for i, idle in enumerate(spread(0.02, 0.2)):
                    await anyio.sleep(idle)
                    busy = await running(storage, f"t{i}")
                    cancelled = time.monotonic()
                    await storage.cancel(busy.uuid, f"everyone {i}")
                    for n, one in enumerate(ears):
                        await one.hear(i + 1, self.timing_slack, f"round {i}, follower {n}")
                    latencies.append(time.monotonic() - cancelled)
                    expected.append((busy.uuid, f"everyone {i}"))
                tg.cancel_scope.cancel()
        assert [one.heard for one in ears] == [expected] * 2
        assert_woken(latencies, self.wake_latency, "every cancel feed follower, after a cancel")

    @pytest.mark.anyio
    async def test_cancelling_the_follower_ends_it_promptly(self, storage: Storage) -> None:
        feed = cast(CancelFeed, storage)
        with anyio.fail_after(2):
            async with anyio.create_task_group() as tg:
                await tg.start(partial(feed.follow_cancels, lambda uid, reason: None))
                tg.cancel_scope.cancel()


__all__ = [
    "BeginOnClaimContract",
    "CancelCheckContract",
    "CancelFeedContract",
    "ConsumeHealthContract",
    "LeaseBatchContract",
    "LeaseDeadlineContract",
    "SharedServerContract",
]
