"""Contract suites of the bulk and workflow capabilities of :mod:`qtasks.components`.

:class:`BulkPublishContract` (a ``broker_factory``), :class:`BulkPublishNewContract` (a
``broker_factory`` and a ``storage_factory`` whose storage the broker shares a server with),
:class:`BulkAddContract`, :class:`WorkflowStoreContract` and :class:`FailedMemberContract` (a
``storage_factory``), and :class:`WorkflowSettleContract` (a shared server's settle of workflow
members) check :class:`~qtasks.components.BulkPublish`, :class:`~qtasks.components.BulkPublishNew`,
:class:`~qtasks.components.BulkAdd`, :class:`~qtasks.components.WorkflowStore` and
:class:`~qtasks.components.FailedMember`. As in
:mod:`qtasks_testing.contract.capabilities`, a component without the capability has every test
of the suite skipped with a reason naming it.

Over ~500 lines: six small suites, a test per guarantee, kept together because the workflow
suites share their fixtures and helpers.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import Any

import anyio
import pytest

from qtasks.components import (
    BeginMany,
    Broker,
    BulkAdd,
    BulkPublish,
    BulkPublishNew,
    FailedMember,
    GateMessage,
    RecordQuery,
    SettleBegin,
    Storage,
    StorageQuery,
    WorkflowStore,
)
from qtasks.config import QueueConfig
from qtasks.record import TaskRecord, TaskStatus
from qtasks_testing.contract._base import ContractSuite, wait_until
from qtasks_testing.contract.broker import BrokerFactory, consuming, envelope
from qtasks_testing.contract.capabilities import Shared, _SharedFixtures, _StorageCapability, lacks
from qtasks_testing.contract.query import everything
from qtasks_testing.contract.storage import StorageFactory, finished, record

Flow = tuple[TaskRecord, dict[str, TaskRecord], GateMessage]
"""The ``flow`` fixture of :class:`WorkflowStoreContract`: the workflow's own record, its
members by name, and the message its gate ``g`` opens with."""


class BulkPublishContract(ContractSuite):
    """The guarantees of :class:`qtasks.components.BulkPublish`, as tests (provide a
    ``broker_factory`` as for :class:`~qtasks_testing.contract.BrokerContract`)."""

    @pytest.fixture
    async def broker(
        self, broker_factory: BrokerFactory, contract_config: QueueConfig
    ) -> AsyncIterator[Broker]:
        broker = broker_factory(contract_config)
        if not isinstance(broker, BulkPublish):
            pytest.skip(lacks(broker, BulkPublish))
        async with AsyncExitStack() as stack:
            await broker.start(stack, contract_config)
            yield broker

    @pytest.mark.anyio
    async def test_publish_many_delivers_every_message_once_in_order(self, broker: Broker) -> None:
        assert isinstance(broker, BulkPublish)
        sent = [envelope() for _ in range(1500)]  # more than one batch of the backends here
        await broker.publish_many(sent)
        await broker.publish_many([])  # nothing to do, no error
        got = []
        async with consuming(broker, prefetch=100) as consumer:
            for _ in sent:
                delivery = await consumer.next(timeout=5)
                got.append((delivery.id, delivery.body))
                assert await delivery.ack() is True
            assert await consumer.none_within(0.3) is None
        assert got == [(e.id, e.body) for e in sent]

    @pytest.mark.anyio
    async def test_publish_many_keeps_priorities_and_delays(self, broker: Broker) -> None:
        assert isinstance(broker, BulkPublish)
        later = envelope(eta=time.time() + 0.6)
        low, high = envelope(priority=5), envelope(priority=-5)
        await broker.publish_many([later, low, high])
        async with consuming(broker) as consumer:
            order = []
            for _ in range(3):
                delivery = await consumer.next(timeout=3)
                order.append(delivery.id)
                await delivery.ack()
        assert order == [high.id, low.id, later.id]


async def _acked(broker: Broker, count: int, prefetch: int = 10) -> list[str]:
    """The ids of the next ``count`` deliveries, each acked, in delivery order; none must
    follow them."""
    ids = []
    async with consuming(broker, prefetch=prefetch) as consumer:
        for _ in range(count):
            delivery = await consumer.next(timeout=5)
            ids.append(delivery.id)
            await delivery.ack()
        assert await consumer.none_within(0.3) is None
    return ids


class BulkPublishNewContract(_SharedFixtures):
    """The guarantees of :class:`qtasks.components.BulkPublishNew`, wired as
    :class:`~qtasks_testing.contract.SharedServerContract`."""

    capabilities = (BulkPublishNew,)

    @pytest.mark.anyio
    async def test_publish_new_many_stores_records_then_publishes(self, shared: Shared) -> None:
        assert isinstance(shared.broker, BulkPublishNew)
        tasks = [shared.new(priority=i % 3) for i in range(1200)]
        await shared.broker.publish_new_many(shared.storage, [(rec, sent) for sent, rec in tasks])
        for _, rec in tasks[::97]:
            assert await shared.storage.get(rec.uuid) == rec
        seen = await _acked(shared.broker, len(tasks), prefetch=100)
        assert sorted(seen) == sorted(sent.id for sent, _ in tasks)

    @pytest.mark.anyio
    async def test_publish_new_many_keeps_priorities_order_and_delays(self, shared: Shared) -> None:
        assert isinstance(shared.broker, BulkPublishNew)
        plan = [(5, None), (-5, None), (0, time.time() + 0.6), (5, None), (0, None)]
        tasks = []
        for priority, eta in plan:
            sent, rec = shared.new(priority=priority)
            tasks.append((rec, replace(sent, priority=priority, eta=eta)))
        await shared.broker.publish_new_many(shared.storage, tasks)
        ids = [sent.id for _, sent in tasks]
        assert await _acked(shared.broker, len(tasks)) == [ids[1], ids[4], ids[0], ids[3], ids[2]]

    @pytest.mark.anyio
    async def test_publish_new_many_replaces_a_stored_record(self, shared: Shared) -> None:
        """A batch meeting a stored record (a uuid used again) replaces it, as add_task's
        publish_new does; the rest of the batch is stored and published alike."""
        assert isinstance(shared.broker, BulkPublishNew)
        old_sent, old = shared.new()
        await shared.storage.add(old)
        assert await shared.storage.save(finished(old, returning="old")) is True
        again = record(uuid=old.uuid)
        tasks = [shared.new(), (old_sent, again), shared.new()]
        await shared.broker.publish_new_many(shared.storage, [(rec, sent) for sent, rec in tasks])
        for _, rec in tasks:
            assert await shared.storage.get(rec.uuid) == rec
        seen = await _acked(shared.broker, len(tasks))
        assert sorted(seen) == sorted(sent.id for sent, _ in tasks)

    @pytest.mark.anyio
    async def test_publish_new_many_awaits_after_once_before_it_writes(
        self, shared: Shared
    ) -> None:
        """``after`` is awaited once (with more tasks than one call of the backends here
        takes, and with none), before any record is stored; then every task is."""
        assert isinstance(shared.broker, BulkPublishNew)
        tasks = [shared.new() for _ in range(1200)]
        looked = [rec for _, rec in tasks[::97]] + [tasks[-1][1]]
        stored_then: list[TaskRecord | None] = []

        async def after() -> None:
            stored_then.extend([await shared.storage.get(rec.uuid) for rec in looked])

        pairs = [(rec, sent) for sent, rec in tasks]
        await shared.broker.publish_new_many(shared.storage, pairs, after=after)
        assert stored_then == [None] * len(looked), "written before after() returned"
        for rec in looked:
            assert await shared.storage.get(rec.uuid) == rec
        seen = await _acked(shared.broker, len(tasks), prefetch=100)
        assert sorted(seen) == sorted(sent.id for sent, _ in tasks)
        await shared.broker.publish_new_many(shared.storage, [], after=after)
        assert len(stored_then) == 2 * len(looked)

    @pytest.mark.anyio
    async def test_publish_new_many_writes_nothing_when_after_raises(self, shared: Shared) -> None:
        assert isinstance(shared.broker, BulkPublishNew)
        tasks = [shared.new() for _ in range(3)]

        class Refused(Exception):
            pass

        async def after() -> None:
            raise Refused

        with pytest.raises(Refused):
            await shared.broker.publish_new_many(
                shared.storage, [(rec, sent) for sent, rec in tasks], after=after
            )
        for _, rec in tasks:
            assert await shared.storage.get(rec.uuid) is None
        assert await _acked(shared.broker, 0) == []


class BulkAddContract(_StorageCapability):
    """The guarantees of :class:`qtasks.components.BulkAdd` (provide a ``storage_factory``)."""

    capability = BulkAdd

    @pytest.mark.anyio
    async def test_add_many_stores_every_record_replacing(self, storage: Storage) -> None:
        assert isinstance(storage, BulkAdd)
        old = record()
        await storage.add(old)
        assert await storage.save(finished(old, returning="old")) is True
        fresh = [record(uuid=old.uuid), *(record() for _ in range(1100))]
        await storage.add_many(fresh)
        for rec in fresh[::101]:
            assert await storage.get(rec.uuid) == rec


def _workflow(created_at: float) -> TaskRecord:
    """A new workflow's own record."""
    wid = uuid.uuid4().hex
    return record(
        uuid=wid,
        task_name="qtasks.workflow",
        workflow=wid,
        args=[],
        kwargs={},
        created_at=created_at,
    )


async def _one_member_workflow(
    storage: Storage, created_at: float, *, then: GateMessage | None = None, **own: Any
) -> tuple[TaskRecord, TaskRecord]:
    """A workflow of one member, stored: its own record (``own`` replaces fields of it) and
    the member, which feeds gate ``g`` publishing ``then`` when given, else ``final``."""
    workflow = replace(_workflow(created_at), **own)
    member = record(workflow=workflow.uuid)
    gates: dict[str, tuple[int, list[GateMessage]]] = {"final": (1, []), "error": (1, [])}
    if then is not None:
        gates["g"] = (1, [then])
    assert isinstance(storage, WorkflowStore)
    feeds = {member.uuid: "final" if then is None else "g"}
    await storage.add_workflow(workflow, [member], gates, feeds)
    return workflow, member


def _gate(name: str) -> GateMessage:
    return GateMessage(uuid.uuid4().hex, f"body of {name}".encode(), 1, 0.0)


def _claim(rec: TaskRecord, token: str, attempt: int = 1) -> TaskRecord:
    """``rec`` as a delivery holding ``token`` begins it."""
    return replace(
        rec, status=TaskStatus.PROCESS, attempt=attempt, token=token, worker="contract-worker"
    )


async def _three_members(storage: Storage) -> Flow:
    """The workflow of :class:`WorkflowStoreContract`'s ``flow`` fixture, stored."""
    assert isinstance(storage, WorkflowStore)
    own = _workflow(time.time())
    wid = own.uuid
    members = {name: record(workflow=wid) for name in "abc"}
    opened = _gate("g")
    gates = {"g": (2, [opened]), "final": (1, []), "error": (1, [_gate("error")])}
    feeds = {members["a"].uuid: "g", members["b"].uuid: "g", members["c"].uuid: "final"}
    await storage.add_workflow(own, list(members.values()), gates, feeds)
    return own, members, opened


@asynccontextmanager
async def _short_ttl_flow(
    storage_factory: StorageFactory, contract_config: QueueConfig, *needs: type
) -> AsyncIterator[tuple[Storage, float, Flow]]:
    """For the tests of how long records live: a storage of ``storage_factory`` started
    (for the block) with a short ``result_ttl``, that TTL, and the workflow of
    :func:`_three_members` stored on it. The test is skipped unless the storage is a
    :class:`~qtasks.components.WorkflowStore` and implements every capability of ``needs``."""
    ttl = 0.5
    config = contract_config.merged(result_ttl=ttl)
    async with AsyncExitStack() as stack:
        storage = storage_factory(config)
        for capability in (WorkflowStore, *needs):
            if not isinstance(storage, capability):
                pytest.skip(lacks(storage, capability))
        await storage.start(stack, config)
        yield storage, ttl, await _three_members(storage)


class WorkflowStoreContract(_StorageCapability):
    """The guarantees of :class:`qtasks.components.WorkflowStore` (a ``storage_factory``).

    Each test stores a workflow of three members ``a``, ``b`` (both feeding gate ``g``, counter
    2, which publishes one message) and ``c`` (feeding ``final``), plus an error gate. The
    tests of ``republish`` check the publish generations and the check :meth:`Storage.begin`
    makes with them: of the copies of a step's message, only the one published last begins."""

    capability = WorkflowStore

    @pytest.fixture
    async def flow(self, storage: Storage) -> Flow:
        return await _three_members(storage)

    @pytest.mark.anyio
    async def test_records_are_stored(self, storage: Storage, flow: Flow) -> None:
        own, members, _ = flow
        assert await storage.get(own.uuid) == own
        assert isinstance(storage, WorkflowStore)
        got = await storage.get_many([members["b"].uuid, "missing", own.uuid])
        assert got == [members["b"], None, own]

    @pytest.mark.anyio
    async def test_a_gate_opens_once_when_its_counter_reaches_zero(
        self, storage: Storage, flow: Flow
    ) -> None:
        assert isinstance(storage, WorkflowStore)
        _, members, opened = flow
        a, b = (finished(members[n], returning=n) for n in "ab")
        for rec in (a, b):
            assert await storage.save(rec) is True
        assert await storage.member_done(a) == []
        assert await storage.member_done(a) == [], "a repeated member was counted twice"
        assert await storage.member_done(b) == [opened]
        # The member that opened the gate gets its messages again (redelivery before the
        # publish); any other member gets nothing.
        assert await storage.member_done(b) == [opened]
        assert await storage.member_done(a) == []

    @pytest.mark.anyio
    async def test_the_final_gate_ends_the_workflow_with_success(
        self, storage: Storage, flow: Flow
    ) -> None:
        assert isinstance(storage, WorkflowStore)
        own, members, _ = flow
        c = finished(members["c"], returning=3)
        await storage.save(c)
        assert await storage.member_done(c) == []
        done = await storage.wait(own.uuid, 2)
        assert done.status is TaskStatus.SUCCESS

    @pytest.mark.anyio
    async def test_a_workflow_that_succeeds_cancels_its_error_callback(
        self, storage: Storage
    ) -> None:
        """The error callback's record, stored with the workflow, ends ``cancel`` when the
        workflow succeeded (not left ``new`` for ever)."""
        assert isinstance(storage, WorkflowStore)
        own = _workflow(time.time())
        member, callback = record(workflow=own.uuid), record(workflow=own.uuid)
        own = replace(own, kwargs={"on_error": callback.uuid})
        error = GateMessage(callback.uuid, b"body of the callback", 1, 0.0)
        gates = {"final": (1, []), "error": (1, [error])}
        await storage.add_workflow(own, [member, callback], gates, {member.uuid: "final"})
        done = finished(member, returning=1)
        await storage.save(done)
        assert await storage.member_done(done) == []
        assert (await storage.wait(own.uuid, 2)).status is TaskStatus.SUCCESS
        left = await storage.get(callback.uuid)
        assert left is not None and left.status is TaskStatus.CANCEL
        assert left.cancel_reason is not None and own.uuid in left.cancel_reason

    @pytest.mark.anyio
    async def test_a_failing_member_fails_the_workflow_and_cancels_the_rest(
        self, storage: Storage, flow: Flow
    ) -> None:
        assert isinstance(storage, WorkflowStore)
        own, members, _ = flow
        a = finished(members["a"], TaskStatus.ERROR, error="ValueError: no")
        await storage.save(a)
        opened = await storage.member_done(a)
        assert [m.body for m in opened] == [b"body of error"]
        failed = await storage.wait(own.uuid, 2)
        assert failed.status is TaskStatus.ERROR
        assert (
            failed.error is not None and a.uuid in failed.error and "ValueError: no" in failed.error
        )
        for name in "bc":
            rest = await storage.get(members[name].uuid)
            assert rest is not None and rest.status is TaskStatus.CANCEL
        # The workflow is over: a late success opens nothing.
        b = finished(members["b"], returning="late")
        await storage.save(b, fence=None)
        assert await storage.member_done(b) == []

    @pytest.mark.anyio
    async def test_the_member_that_failed_the_workflow_gets_the_error_gate_again(
        self, storage: Storage, flow: Flow
    ) -> None:
        """Its settle asks again when publishing the error callback failed (or it was
        redelivered before): the workflow is over, yet it gets the message again; another
        failing member gets nothing."""
        assert isinstance(storage, WorkflowStore)
        _, members, _ = flow
        a, b = (finished(members[n], TaskStatus.ERROR, error="ValueError: no") for n in "ab")
        await storage.save(a)
        first = await storage.member_done(a)
        assert [m.body for m in first] == [b"body of error"]
        assert await storage.member_done(a) == first
        await storage.save(b, fence=None)
        assert await storage.member_done(b) == []
        assert await storage.member_done(a) == first

    @pytest.mark.anyio
    async def test_a_cancelled_workflow_is_continued_by_no_member(
        self, storage: Storage, flow: Flow
    ) -> None:
        assert isinstance(storage, WorkflowStore)
        own, members, _ = flow
        a, b = (finished(members[n], returning=n) for n in "ab")
        await storage.save(a)
        assert await storage.member_done(a) == []
        cancelled = await storage.cancel_workflow(own.uuid, "stop")
        assert cancelled is not None and cancelled.status is TaskStatus.CANCEL
        assert cancelled.cancel_reason == "stop"
        # b would open gate g; a failing c would open the error gate: neither does now.
        await storage.save(b)
        assert await storage.member_done(b) == []
        assert await storage.member_done(b) == []
        c = finished(members["c"], TaskStatus.ERROR, error="ValueError: late")
        await storage.save(c)
        assert await storage.member_done(c) == []
        stored = await storage.get(own.uuid)
        assert stored is not None and stored.status is TaskStatus.CANCEL
        assert await storage.cancel_workflow("no-such-workflow", "stop") is None

    @pytest.mark.anyio
    @pytest.mark.parametrize("end", ["success", "error", "cancel"])
    async def test_members_records_expire_once_their_workflow_ended(
        self, storage_factory: StorageFactory, contract_config: QueueConfig, end: str
    ) -> None:
        """A member's final record is read after it ended (by a later step, and for the
        workflow's result): it is kept while its workflow runs, however long past
        ``result_ttl`` after the member ended, and expires ``result_ttl`` after the workflow
        ended (by success, a failure, or ``cancel_workflow``). Before, a chord whose members
        ended further apart than the TTL failed for want of the first one's result."""
        async with _short_ttl_flow(storage_factory, contract_config) as started:
            storage, ttl, (own, members, _) = started
            assert isinstance(storage, WorkflowStore)
            a = finished(members["a"], returning="a")
            await storage.save(a)
            assert await storage.member_done(a) == []
            await anyio.sleep(ttl + 0.3)  # a ended longer than result_ttl ago
            kept = await storage.get(a.uuid)
            assert kept is not None, "a member's record expired while its workflow ran"
            assert kept.returning == "a"
            finals = [a.uuid]
            if end == "cancel":
                assert await storage.cancel_workflow(own.uuid, "stop") is not None
            else:
                b = finished(members["b"], returning="b")
                c = finished(members["c"], returning="c")
                if end == "error":
                    c = finished(members["c"], TaskStatus.ERROR, error="ValueError: no")
                for rec in (b, c):
                    await storage.save(rec)
                    await storage.member_done(rec)
                    finals.append(rec.uuid)
            ended = time.monotonic()
            stored = await storage.get(own.uuid)
            assert stored is not None and stored.status.value == end
            assert await storage.get(a.uuid) == kept, "expired as soon as its workflow ended"

            async def gone() -> bool:
                return all(m is None for m in await storage.get_many(finals))

            await wait_until(gone, timeout=ttl + 1.5, what="the members' records to expire")
            assert time.monotonic() - ended >= ttl - 0.1

    @pytest.mark.anyio
    async def test_a_kept_members_record_is_listed_while_it_lives(
        self, storage_factory: StorageFactory, contract_config: QueueConfig
    ) -> None:
        """A member's record kept past ``result_ttl`` (see the test above) is listed while it
        exists as any record is (by status, task name, time and uuid) and counted by
        ``stats`` and ``count``, both while its workflow runs and after it ended; then it
        leaves them with its record. Before, Redis dropped it from its indexes once it had
        ended ``result_ttl`` ago, while ``get`` still returned it."""
        async with _short_ttl_flow(storage_factory, contract_config, StorageQuery) as started:
            storage, ttl, (own, members, _) = started
            assert isinstance(storage, WorkflowStore) and isinstance(storage, StorageQuery)
            since = time.time() - 1
            a = finished(members["a"], returning="a")
            plain = finished(record(task_name=a.task_name), returning="no workflow")
            for rec in (a, plain):
                await storage.save(rec)
            assert await storage.member_done(a) == []

            async def plain_gone() -> bool:
                return await storage.get(plain.uuid) is None

            # a ended before plain did: longer than result_ttl ago once plain expired.
            await wait_until(plain_gone, timeout=ttl + 1.5, what="the plain record to expire")
            name = a.task_name
            ours = {plain.uuid, own.uuid, *(m.uuid for m in members.values())}

            async def succeeded() -> dict[str, object]:
                """Our successes as stats and count count them and each query lists them."""
                stats = await storage.stats()  # first: it may remove index entries
                out: dict[str, object] = {
                    "stats": stats.get("success", 0),
                    "count": await storage.count(TaskStatus.SUCCESS),
                }
                for query in (
                    RecordQuery(),
                    RecordQuery(status=TaskStatus.SUCCESS),
                    RecordQuery(task_name=name),
                    RecordQuery(task_name=name, status=TaskStatus.SUCCESS),
                    RecordQuery(uuid_prefix=a.uuid, since=since),
                ):
                    listed = await everything(storage, query)
                    out[repr(query)] = {
                        r.uuid for r in listed if r.uuid in ours and r.status is TaskStatus.SUCCESS
                    }
                return out

            def expected(*uuids: str) -> dict[str, object]:
                return {
                    "stats": len(uuids),
                    "count": len(uuids),
                    repr(RecordQuery()): set(uuids),
                    repr(RecordQuery(status=TaskStatus.SUCCESS)): set(uuids),
                    repr(RecordQuery(task_name=name)): set(uuids) - {own.uuid},
                    repr(RecordQuery(task_name=name, status=TaskStatus.SUCCESS)): (
                        set(uuids) - {own.uuid}
                    ),
                    repr(RecordQuery(uuid_prefix=a.uuid, since=since)): set(uuids) & {a.uuid},
                }

            assert await succeeded() == expected(a.uuid), "unlisted while its workflow runs"
            b, c = (finished(members[n], returning=n) for n in "bc")
            for rec in (b, c):
                await storage.save(rec)
                await storage.member_done(rec)
            done = await storage.get(own.uuid)
            assert done is not None and done.status is TaskStatus.SUCCESS
            assert await succeeded() == expected(a.uuid, b.uuid, c.uuid, own.uuid), (
                "unlisted once its workflow ended, before its record expired"
            )

            async def none_left() -> bool:
                return await succeeded() == expected()

            await wait_until(none_left, timeout=ttl + 1.5, what="the records to leave the lists")
            assert await storage.get_many([a.uuid, own.uuid]) == [None, None]

    @pytest.mark.anyio
    async def test_workflows_made_in_one_millisecond_are_listed_newest_first(
        self, storage: Storage
    ) -> None:
        """Sequential workflows can be made within one millisecond; the list keeps their
        order (whatever their ids: here the newest has the smallest)."""
        assert isinstance(storage, WorkflowStore)
        base = math.floor(time.time() * 1000) / 1000 + 0.0001
        ids = sorted((uuid.uuid4().hex for _ in range(3)), reverse=True)
        made = []
        for i, wid in enumerate(ids):
            own, _ = await _one_member_workflow(storage, base + i * 0.0002, uuid=wid, workflow=wid)
            made.append(own.uuid)
        assert [r.uuid for r in await storage.workflows(3)] == made[::-1]

    @pytest.mark.anyio
    async def test_workflows_lists_the_newest_first(self, storage: Storage, flow: Flow) -> None:
        assert isinstance(storage, WorkflowStore)
        first, _, _ = flow
        later = []
        for i in (1, 2):
            own, _ = await _one_member_workflow(storage, first.created_at + i)
            later.append(own)
        assert [r.uuid for r in await storage.workflows(2)] == [later[1].uuid, later[0].uuid]
        listed = await storage.workflows()
        assert [r.uuid for r in listed] == [later[1].uuid, later[0].uuid, first.uuid]
        assert listed[2] == first
        assert await storage.cancel_workflow(later[0].uuid, "stop") is not None
        assert [r.status for r in await storage.workflows(3)] == [
            TaskStatus.NEW,
            TaskStatus.CANCEL,
            TaskStatus.NEW,
        ]

    @pytest.mark.anyio
    async def test_republish_raises_the_generation_of_the_records_still_new_only(
        self, storage: Storage, flow: Flow
    ) -> None:
        assert isinstance(storage, WorkflowStore)
        _, members, _ = flow
        a, b, c = (members[n] for n in "abc")
        begun = await storage.begin(_claim(b, "tok-b"))
        assert begun.status is TaskStatus.PROCESS
        assert await storage.save(finished(c, returning=3)) is True
        uuids = [a.uuid, b.uuid, c.uuid, "no-such-record"]
        assert await storage.republish(uuids) == [1, 0, 0, 0]
        assert await storage.republish(uuids) == [2, 0, 0, 0]
        # Nothing else of the records changed.
        assert await storage.get(a.uuid) == a
        assert await storage.get(b.uuid) == begun

    @pytest.mark.anyio
    async def test_begin_refuses_a_copy_older_than_the_last_published(
        self, storage: Storage, flow: Flow
    ) -> None:
        assert isinstance(storage, WorkflowStore)
        _, members, _ = flow
        a = members["a"]
        assert await storage.republish([a.uuid]) == [1]
        # The first copy (no generation) comes after the second was published: refused,
        # the record unchanged, its token not the claim's.
        stale = await storage.begin(_claim(a, "tok-first"))
        assert stale == a, "a stale copy wrote to the record"
        assert stale.token != "tok-first"
        assert await storage.get(a.uuid) == a
        # The copy published last begins.
        begun = await storage.begin(_claim(a, "tok-second"), generation=1)
        assert (begun.status, begun.token) == (TaskStatus.PROCESS, "tok-second")
        # A stale copy arriving while the step runs is refused too, and the step is not
        # published again (it began).
        assert await storage.begin(_claim(a, "tok-first", 2)) == begun
        assert await storage.republish([a.uuid]) == [0]
        # The generation stays with the record through the worker's writes (a retry here).
        retrying = finished(begun, TaskStatus.RETRY)
        assert await storage.save(retrying, fence="tok-second") is True
        assert await storage.begin(_claim(a, "tok-first", 2)) == retrying
        again = await storage.begin(_claim(a, "tok-retry", 2), generation=1)
        assert (again.status, again.token, again.attempt) == (TaskStatus.PROCESS, "tok-retry", 2)

    @pytest.mark.anyio
    async def test_begin_takes_a_copy_as_new_as_the_record_or_newer(
        self, storage: Storage, flow: Flow
    ) -> None:
        assert isinstance(storage, WorkflowStore)
        _, members, _ = flow
        a, b = members["a"], members["b"]
        # Never published again: generation 0 begins, as any task.
        first = await storage.begin(_claim(a, "tok-a"))
        assert (first.status, first.token) == (TaskStatus.PROCESS, "tok-a")
        assert await storage.republish([b.uuid, b.uuid]) == [1, 2]
        newer = await storage.begin(_claim(b, "tok-b"), generation=3)
        assert (newer.status, newer.token) == (TaskStatus.PROCESS, "tok-b")

    @pytest.mark.anyio
    async def test_begin_many_refuses_a_stale_copy(self, storage: Storage, flow: Flow) -> None:
        if not isinstance(storage, BeginMany):
            pytest.skip(lacks(storage, BeginMany))
        assert isinstance(storage, WorkflowStore)
        _, members, _ = flow
        a, b = members["a"], members["b"]
        assert await storage.republish([a.uuid]) == [1]
        got = await storage.begin_many([_claim(a, "tok-a"), _claim(b, "tok-b")])
        assert got[0] == a, "begin_many began a stale copy"
        assert (got[1].status, got[1].token) == (TaskStatus.PROCESS, "tok-b")
        assert await storage.get(a.uuid) == a


class FailedMemberContract(_StorageCapability):
    """The guarantees of :class:`qtasks.components.FailedMember` (a ``storage_factory``;
    skipped unless the storage is also a :class:`~qtasks.components.WorkflowStore`): which
    member failed a workflow, on the workflow of :class:`WorkflowStoreContract`'s ``flow``."""

    capability = FailedMember

    @pytest.fixture
    async def flow(self, storage: Storage) -> Flow:
        if not isinstance(storage, WorkflowStore):
            pytest.skip(lacks(storage, WorkflowStore))
        return await _three_members(storage)

    @pytest.mark.anyio
    async def test_the_member_that_opened_the_error_gate_and_no_other(
        self, storage: Storage, flow: Flow
    ) -> None:
        """``None`` while the workflow runs (a member that succeeded changes nothing); then
        the member whose failure opened the error gate, kept when another member fails after
        it."""
        assert isinstance(storage, FailedMember) and isinstance(storage, WorkflowStore)
        own, members, _ = flow
        assert await storage.failed_member(own.uuid) is None
        a = finished(members["a"], returning="a")
        await storage.save(a)
        await storage.member_done(a)
        assert await storage.failed_member(own.uuid) is None
        b, c = (finished(members[n], TaskStatus.ERROR, error="ValueError: no") for n in "bc")
        await storage.save(b)
        assert await storage.member_done(b) != []
        assert await storage.failed_member(own.uuid) == b.uuid
        await storage.save(c, fence=None)
        assert await storage.member_done(c) == []
        assert await storage.failed_member(own.uuid) == b.uuid
        # Asking again changes nothing; a workflow that ended so is not cancelled over it.
        assert await storage.failed_member(own.uuid) == b.uuid
        await storage.cancel_workflow(own.uuid, "too late")
        assert await storage.failed_member(own.uuid) == b.uuid

    @pytest.mark.anyio
    async def test_a_cancelled_member_fails_its_workflow_too(
        self, storage: Storage, flow: Flow
    ) -> None:
        assert isinstance(storage, FailedMember) and isinstance(storage, WorkflowStore)
        own, members, _ = flow
        cancelled = await storage.cancel(members["c"].uuid, "stop it")
        assert cancelled is not None and cancelled.status is TaskStatus.CANCEL
        await storage.member_done(cancelled)
        ended = await storage.get(own.uuid)
        assert ended is not None and ended.status is TaskStatus.ERROR
        assert await storage.failed_member(own.uuid) == members["c"].uuid

    @pytest.mark.anyio
    @pytest.mark.parametrize("end", ["success", "cancel", "unknown"])
    async def test_none_when_no_member_failed_it(
        self, storage: Storage, flow: Flow, end: str
    ) -> None:
        """A workflow that succeeded, one cancelled (``cancel_workflow``; its members that
        end later open no gate), and an id that is no workflow."""
        assert isinstance(storage, FailedMember) and isinstance(storage, WorkflowStore)
        own, members, _ = flow
        if end == "unknown":
            assert await storage.failed_member(uuid.uuid4().hex) is None
            return
        if end == "cancel":
            await storage.cancel_workflow(own.uuid, "stop")
            late = finished(members["a"], TaskStatus.ERROR, error="ValueError: late")
            await storage.save(late)
            assert await storage.member_done(late) == []
        else:
            for name in "abc":
                done = finished(members[name], returning=name)
                await storage.save(done)
                await storage.member_done(done)
        ended = await storage.get(own.uuid)
        assert ended is not None and ended.status.value == end
        assert await storage.failed_member(own.uuid) is None

    @pytest.mark.anyio
    async def test_forgotten_with_the_workflow_s_record(
        self, storage_factory: StorageFactory, contract_config: QueueConfig
    ) -> None:
        """Kept as long as the workflow's record: read after the failure, and gone (``None``,
        nothing kept for ever) once that record expired, ``result_ttl`` after the end."""
        async with _short_ttl_flow(storage_factory, contract_config, FailedMember) as started:
            storage, ttl, (own, members, _) = started
            assert isinstance(storage, FailedMember) and isinstance(storage, WorkflowStore)
            a = finished(members["a"], TaskStatus.ERROR, error="ValueError: no")
            await storage.save(a)
            await storage.member_done(a)
            assert await storage.failed_member(own.uuid) == a.uuid

            async def expired() -> bool:
                return await storage.get(own.uuid) is None

            await wait_until(expired, timeout=ttl + 1.5, what="the workflow's record to expire")
            assert await storage.failed_member(own.uuid) is None


class WorkflowSettleContract(_SharedFixtures):
    """:meth:`SharedServer.ack_final` of a workflow member continues its workflow in the same
    step (wired as :class:`~qtasks_testing.contract.SharedServerContract`; skipped unless the
    storage is a :class:`~qtasks.components.WorkflowStore`)."""

    @pytest.mark.anyio
    async def test_ack_final_of_the_last_member_publishes_the_next_step_once(
        self, shared: Shared
    ) -> None:
        storage = shared.storage
        if not isinstance(storage, WorkflowStore):
            pytest.skip(lacks(storage, WorkflowStore))
        own = _workflow(time.time())
        a, b = record(workflow=own.uuid), record(workflow=own.uuid)
        nxt = _gate("next")
        gates = {"g": (2, [nxt]), "final": (1, []), "error": (1, [])}
        await storage.add_workflow(own, [a, b], gates, {a.uuid: "g", b.uuid: "g"})
        for rec in (a, b):
            sent, _ = shared.new(uuid=rec.uuid)
            await shared.broker.publish(sent)
        async with consuming(shared.broker) as consumer:
            first = await consumer.next(timeout=2)
            second = await consumer.next(timeout=2)
            assert await consumer.none_within(0.2) is None
            for delivery in (first, second):
                stored = await storage.get(delivery.id)
                assert stored is not None
                begun = await shared.begun(stored, delivery.token)
                done = finished(begun, returning=delivery.id)
                assert await shared.server.ack_final(delivery, storage, done) is True
            published = await consumer.next(timeout=2, what="the gate's message")
            assert (published.id, published.body) == (nxt.id, nxt.body)
            assert await published.ack() is True
            assert await consumer.none_within(0.3) is None

    @pytest.mark.anyio
    async def test_ack_finals_begin_of_the_last_member_continues_and_begins(
        self, shared: Shared
    ) -> None:
        """:meth:`SettleBegin.ack_finals_begin` settles a workflow member as ``ack_finals``
        does (the opened gate's message published, its id in ``enqueued``) and then begins
        the records it is given (skipped unless the broker is a ``SettleBegin``)."""
        storage, broker = _settle_begin(shared)
        nxt = _gate("next")
        _, member = await _one_member_workflow(storage, time.time(), then=nxt)
        other = record()
        await storage.add(other)
        for rec in (member, other):
            sent, _ = shared.new(uuid=rec.uuid)
            await shared.broker.publish(sent)
        async with consuming(shared.broker) as consumer:
            held = {d.id: d for d in [await consumer.next(timeout=2) for _ in range(2)]}
            begun = await shared.begun(member, held[member.uuid].token)
            claim = _claim(other, held[other.uuid].token)
            enqueued: list[str] = []
            saved, [started] = await broker.ack_finals_begin(
                storage,
                [(held[member.uuid], finished(begun, returning=1))],
                [claim],
                enqueued=enqueued,
            )
            assert saved == [True]
            assert enqueued == [nxt.id]
            assert started is not None
            assert (started.uuid, started.status, started.token) == (
                other.uuid,
                TaskStatus.PROCESS,
                held[other.uuid].token,
            )
            published = await consumer.next(timeout=2, what="the gate's message")
            assert (published.id, published.body) == (nxt.id, nxt.body)
            assert await held[member.uuid].ack() is False, "the member was not acked"
            for delivery in (published, held[other.uuid]):
                assert await delivery.ack() is True

    @pytest.mark.anyio
    async def test_ack_finals_begin_refuses_a_stale_copy(self, shared: Shared) -> None:
        """The begins of ``ack_finals_begin`` are ``Storage.begin`` with generation 0: a copy
        of a step published again since is returned unchanged, nothing written."""
        storage, broker = _settle_begin(shared)
        _, step = await _one_member_workflow(storage, time.time(), then=_gate("next"))
        stored = await storage.get(step.uuid)
        assert isinstance(storage, WorkflowStore)
        assert await storage.republish([step.uuid]) == [1]
        _, [got] = await broker.ack_finals_begin(storage, [], [_claim(step, "tok-old")])
        assert got == stored, "a stale copy was begun"
        assert await storage.get(step.uuid) == stored


def _settle_begin(shared: Shared) -> tuple[Storage, SettleBegin]:
    """The suite's storage and broker, for a test of ``ack_finals_begin`` with workflow
    members: skipped unless they are a ``WorkflowStore`` and a ``SettleBegin``."""
    storage, broker = shared.storage, shared.broker
    if not isinstance(storage, WorkflowStore):
        pytest.skip(lacks(storage, WorkflowStore))
    if not isinstance(broker, SettleBegin):
        pytest.skip(lacks(broker, SettleBegin))
    return storage, broker
