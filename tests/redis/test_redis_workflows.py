"""Workflows on Redis (broker and storage on one server) with real worker processes: the
continuation is done in the settle script. The producer that starts a workflow is closed
before the workflow ends: the workers carry it on."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio
from late_chord import add_late, chord_ending_late
from lost_member import check_a_lost_member_reads_none
from step_inputs import check_step_inputs
from workflow_app import Workers, build, kill_while_running

from qtasks import AsyncQueueTasks, QueueConfig, chain, chord, group, hookimpl
from qtasks.components import RecordQuery, StorageQuery, WorkflowStore
from qtasks.record import TaskRecord, TaskStatus
from qtasks.workflows import Node, Workflow
from qtasks_redis import RedisBroker, RedisStorage

pytestmark = pytest.mark.anyio


@pytest.fixture
def workers(tmp_path: Path, redis_url: str, prefix: str) -> Iterator[Workers]:
    made = Workers(
        tmp_path,
        {"QT_BACKEND": "redis", "QT_REDIS": redis_url, "QT_PREFIX": prefix, "QT_LEASE": "2"},
    )
    yield made
    made.stop()


def producer(redis_url: str, prefix: str) -> AsyncQueueTasks:
    return build("redis", redis_url, prefix)


async def test_chain_chord_and_nesting_go_on_without_the_producer(
    workers: Workers, redis_url: str, prefix: str
) -> None:
    workers.start(2)
    app = producer(redis_url, prefix)
    add, double, total = (app.tasks[n] for n in ("add", "double", "total"))
    flows: list[Node] = [
        chain(add.s(1, 2), double.s(), double.s()),
        chord(double.map(range(200)), total.s()),
        chain(group(chain(add.s(1, 1), double.s()), add.s(5, 5)), total.s(), double.s()),
    ]
    ids = [(await app.run_workflow(flow)).id for flow in flows]
    await app.aclose()  # every client is gone: the workers carry the workflows on
    app = producer(redis_url, prefix)
    try:
        done = [await app.wait_workflow(id, timeout=30) for id in ids]
    finally:
        await app.aclose()
    assert [(d.status, d.result) for d in done] == [
        ("success", 12),
        ("success", sum(2 * i for i in range(200))),
        ("success", 28),
    ]
    assert sorted(workers.ran("total")) == ["2", "200"]
    assert workers.tracebacks() == []


async def test_failures_fail_the_workflow_and_run_the_error_callback_once(
    workers: Workers, redis_url: str, prefix: str
) -> None:
    workers.start(2)
    app = producer(redis_url, prefix)
    add, fail, double, total = (app.tasks[n] for n in ("add", "fail", "double", "total"))
    try:
        failing_chain = await app.run_workflow(
            chain(add.s(1, 2), fail.s(), double.s()), on_error=app.signature("on_error")
        )
        failing_chord = await app.run_workflow(
            chord([double.s(i) for i in range(20)] + [fail.s(99)], total.s())
        )
        first = await app.wait_workflow(failing_chain.id, 30)
        second = await app.wait_workflow(failing_chord.id, 30)
        assert first.on_error is not None
        callback = await app.wait(first.on_error, 30)
        later = await app.get(first.members[2])
        # Records ended by the workflow's gates are in the indexes a dashboard lists by.
        storage = app.storage
        assert isinstance(storage, StorageQuery)
        cancelled = await storage.query(
            RecordQuery(task_name="double", status=TaskStatus.CANCEL, limit=500)
        )
        assert first.members[2] in {r.uuid for r in cancelled.records}
    finally:
        await app.aclose()
    assert first.status == "error" and first.error is not None
    assert first.members[1] in first.error and "bad 3" in first.error
    assert later is not None and later.status.value == "cancel"
    assert callback.returning == first.id
    assert workers.ran("on_error") == [first.id]
    assert second.status == "error" and second.error is not None
    assert second.members[-2] in second.error  # the failing member, named
    assert (first.failed_member, second.failed_member) == (first.members[1], second.members[-2])
    assert workers.ran("total") == []


async def test_immutable_signatures_get_no_input(
    workers: Workers, redis_url: str, prefix: str
) -> None:
    # Celery's task.si(...): a chain step, a chord callback or an error callback called with
    # its own arguments only (no predecessor's result, no workflow id).
    workers.start(1)
    app = producer(redis_url, prefix)
    add, double, fail = app.tasks["add"], app.tasks["double"], app.tasks["fail"]
    try:
        flows: list[Node] = [
            chain(add.s(1, 2), add.si(10, 20), double.s()),
            chord([double.s(1), double.s(2)], double.si(7)),
            chain(double.s(1), app.signature("add", (3, 4), immutable=True)),
        ]
        ids = [(await app.run_workflow(flow)).id for flow in flows]
        failing = await app.run_workflow(fail.s(1), on_error=app.tasks["on_error"].si("alert"))
        done = [await app.wait_workflow(id, timeout=30) for id in ids]
        failed = await app.wait_workflow(failing.id, timeout=30)
        assert failed.on_error is not None
        callback = await app.wait(failed.on_error, 30)
    finally:
        await app.aclose()
    assert [(d.status, d.result) for d in done] == [
        ("success", 60),
        ("success", 14),
        ("success", 7),
    ]
    assert failed.status == "error"
    assert (callback.status.value, callback.returning) == ("success", "alert")


async def test_cancel_workflow_stops_running_and_pending_members(
    workers: Workers, redis_url: str, prefix: str
) -> None:
    workers.start(1)
    app = producer(redis_url, prefix)
    slow, double = app.tasks["slow"], app.tasks["double"]
    try:
        wf = await app.run_workflow(chain(slow.s(1, 60), double.s()))
        with anyio.fail_after(20):
            while workers.ran("slow") == []:  # noqa: ASYNC110 - another process's ledger
                await anyio.sleep(0.05)
        cancelled = await app.cancel_workflow(wf.id, "stop")
        assert cancelled is not None and cancelled.status == "cancel"
        running = await app.wait(wf.members[0], 10)
        pending = await app.get(wf.members[1])
    finally:
        await app.aclose()
    assert running.status.value == "cancel"
    assert pending is not None and pending.status.value == "cancel"
    assert workers.ran("double") == []


async def test_members_enqueued_by_the_settle_script_fire_qtasks_task_enqueued(
    workers: Workers, redis_url: str, prefix: str
) -> None:
    """The client fires the hook for the first steps; the worker that settles a step fires
    it for what the settle script enqueued (the ledger notes each, with the process)."""
    workers.start(2)
    app = producer(redis_url, prefix)
    seen: list[str] = []

    class Seen:
        @hookimpl
        def qtasks_task_enqueued(self, record: TaskRecord) -> None:
            seen.append(record.uuid)

    app.add_plugin(Seen())
    add, double, total = (app.tasks[n] for n in ("add", "double", "total"))
    try:
        flows = [
            await app.run_workflow(chain(add.s(1, 2), double.s(), double.s())),
            await app.run_workflow(chord(double.map(range(30)), total.s())),
        ]
        done = [await app.wait_workflow(wf.id, timeout=30) for wf in flows]
    finally:
        await app.aclose()
    assert [d.result for d in done] == [12, sum(2 * i for i in range(30))]
    first, fan = flows
    assert seen == [first.members[0], *fan.members[:30]]
    later = [first.members[1], first.members[2], fan.members[30]]
    with anyio.fail_after(10):  # noted once each settle returned, maybe after the end
        while len(workers.ran("enqueued")) < len(later):  # noqa: ASYNC110 - a file
            await anyio.sleep(0.05)
    assert sorted(workers.ran("enqueued")) == sorted(later)


def workflow_keys(redis_url: str, workflow: str) -> dict[str, int]:
    """Every key naming ``workflow``, with its TTL in seconds (-1: none)."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = sorted(k.decode() for k in client.scan_iter(match=f"*{workflow}*", count=1000))
        return {key: int(client.ttl(key)) for key in keys}
    finally:
        client.close()


async def test_cancel_workflow_leaves_no_gate_keys_once_no_member_runs(
    workers: Workers, redis_url: str, prefix: str
) -> None:
    workers.start(1)
    app = producer(redis_url, prefix)
    slow, total = app.tasks["slow"], app.tasks["total"]
    try:
        wf = await app.run_workflow(chord([slow.s(1, 60), slow.s(2, 60)], total.s()))
        assert any(":f:" in key for key in workflow_keys(redis_url, wf.id))
        with anyio.fail_after(20):
            while len(workers.ran("slow")) < 2:  # noqa: ASYNC110 - another process's ledger
                await anyio.sleep(0.05)
        await app.cancel_workflow(wf.id, "stop")
        with anyio.fail_after(20):  # the running members settle (cancelled) and are acked
            while (await app.broker.stats()).in_flight:  # noqa: ASYNC110 - another process
                await anyio.sleep(0.05)
        left = workflow_keys(redis_url, wf.id)
        tag = app.storage.key_tag  # type: ignore[attr-defined]  # a RedisStorage here
    finally:
        await app.aclose()
    assert workers.ran("total") == [] and workers.ran("double") == []
    # The record (and the wake-up list of its waiters) only, both expiring.
    assert set(left) <= {f"{tag}:r:{wf.id}", f"{tag}:w:{wf.id}"}, left
    assert f"{tag}:r:{wf.id}" in left
    assert all(ttl > 0 for ttl in left.values()), left


async def test_cancelling_a_queued_member_fails_the_workflow_and_its_gates_expire(
    workers: Workers, redis_url: str, prefix: str
) -> None:
    """``app.cancel`` drops a queued member's message: the cancel itself fails the workflow,
    its error callback runs (on a worker started after the cancel) and no key is left
    without a TTL."""
    app = producer(redis_url, prefix)
    double, total = app.tasks["double"], app.tasks["total"]
    try:
        wf = await app.run_workflow(
            chord([double.s(1), double.s(2)], total.s()), on_error=app.signature("on_error")
        )
        cancelled = await app.cancel(wf.members[1], "not needed")
        assert cancelled is not None and cancelled.status is TaskStatus.CANCEL
        state = await app.get_workflow(wf.id)
        workers.start(1)
        assert state is not None and state.on_error is not None
        callback = await app.wait(state.on_error, 20)
        left = workflow_keys(redis_url, wf.id)
    finally:
        await app.aclose()
    assert state.status == "error" and state.error is not None
    assert wf.members[1] in state.error
    assert callback.status is TaskStatus.SUCCESS and workers.ran("on_error") == [wf.id]
    assert workers.ran("total") == []
    assert any(":f:" in key for key in left) and all(ttl > 0 for ttl in left.values()), left


async def test_a_member_settled_after_the_cancel_does_not_continue(
    redis_url: str, prefix: str
) -> None:
    """The member's success is stored between the workflow's cancel and its members' (the
    race cancel_workflow cannot close): the settle script stores it, enqueues no next step
    and creates none of the workflow's keys again."""
    app = producer(redis_url, prefix)
    double = app.tasks["double"]
    try:
        wf = await app.run_workflow(chain(double.s(1), double.s(), double.s()))
        storage, broker = app.storage, app.broker
        assert isinstance(storage, WorkflowStore) and isinstance(broker, RedisBroker)
        async with broker.consume(prefetch=1) as deliveries:
            delivery = await anext(aiter(deliveries))
            assert delivery.id == wf.members[0]
            stored = await storage.get(delivery.id)
            assert stored is not None
            claim = stored.copy()
            claim.status, claim.attempt, claim.token = TaskStatus.PROCESS, 1, delivery.token
            begun = await storage.begin(claim)
            assert (await storage.cancel_workflow(wf.id, "stop")) is not None
            done = begun.copy()
            done.status, done.returning = TaskStatus.SUCCESS, 2
            assert await broker.ack_final(delivery, storage, done) is True
        stats = await broker.stats()
        left = workflow_keys(redis_url, wf.id)
        second = await app.get(wf.members[1])
    finally:
        await app.aclose()
    assert stats.ready_by_priority == {} or sum(stats.ready_by_priority.values()) == 0
    assert stats.delayed == 0 and stats.in_flight == 0
    assert second is not None and second.status is TaskStatus.NEW  # never enqueued
    assert not any(":f:" in key for key in left), left


async def test_a_settle_run_again_does_not_publish_the_opened_step_again(
    redis_url: str, prefix: str
) -> None:
    """The settle script runs twice for one delivery (a call retried after its reply was
    lost): the second run publishes nothing, so the chord callback's delivered copy keeps
    its lease and no second copy is queued."""
    app = producer(redis_url, prefix)
    double, total = app.tasks["double"], app.tasks["total"]
    try:
        wf = await app.run_workflow(chord([double.s(1), double.s(2)], total.s()))
        storage, broker = app.storage, app.broker
        assert isinstance(storage, WorkflowStore) and isinstance(broker, RedisBroker)
        async with broker.consume(prefetch=1) as deliveries:
            stream = aiter(deliveries)
            for value in (1, 2):
                delivery = await anext(stream)
                stored = await storage.get(delivery.id)
                assert stored is not None
                claim = stored.copy()
                claim.status, claim.attempt, claim.token = TaskStatus.PROCESS, 1, delivery.token
                done = (await storage.begin(claim)).copy()
                done.status, done.returning = TaskStatus.SUCCESS, 2 * value
                assert await broker.ack_final(delivery, storage, done) is True
            callback = await anext(stream)
            assert callback.id == wf.members[-1]
            # The last member's settle again, as a retry after a lost reply sends it.
            assert await broker.ack_final(delivery, storage, done) is True
            still_held = await broker.extend_many([callback])
            stats = await broker.stats()
            await callback.ack()
    finally:
        await app.aclose()
    assert still_held == [True]
    assert sum(stats.ready_by_priority.values()) == 0 and stats.in_flight == 1


@pytest.mark.slow
async def test_a_10000_member_chord(workers: Workers, redis_url: str, prefix: str) -> None:
    workers.start(2)
    app = producer(redis_url, prefix)
    noop, total = app.tasks["noop"], app.tasks["total"]
    try:
        wf = await app.run_workflow(chord(noop.map(range(10_000)), total.s()))
        done = await wf.wait_result(timeout=120)
    finally:
        await app.aclose()
    assert (done.status, done.result) == ("success", sum(range(10_000)))
    assert workers.ran("total") == ["10000"]


@pytest.mark.reliability
async def test_kill_9_during_a_chord_runs_the_callback_exactly_once(
    workers: Workers, redis_url: str, prefix: str
) -> None:
    """Three workers; one is SIGKILLed at a random moment, again and again, and replaced,
    while a 2,000-member chord runs (the last kill lands near the end, while the last
    members settle). Every member's result reaches the callback, which runs once."""
    workers.start(3)
    app = producer(redis_url, prefix)
    slow, total = app.tasks["slow"], app.tasks["total"]
    members = 2000
    try:
        wf = await app.run_workflow(chord([slow.s(i, 0.05) for i in range(members)], total.s()))
        kills = await kill_while_running(app, wf.id, workers, 10, (0.1, 0.6))
        done = await app.wait_workflow(wf.id, timeout=60)
    finally:
        await app.aclose()
    assert kills >= 5, f"the chord ended after {kills} kills: too soon to test anything"
    assert (done.status, done.result) == ("success", sum(range(members)))
    assert workers.ran("total") == [str(members)], "the callback ran more or less than once"
    assert {int(v) for v in workers.ran("slow")} == set(range(members))


async def test_a_chord_whose_members_end_further_apart_than_result_ttl_succeeds(
    redis_url: str, prefix: str
) -> None:
    """The settle script keeps a member's result while its workflow runs (it takes off the
    TTL its save gave), and gives every member's record the TTL when the workflow ends: the
    chord callback reads the first member's result, which ended longer than ``result_ttl``
    before the last, and the members' records expire after the workflow ended."""
    ttl = 0.5
    app = producer(redis_url, prefix)
    app.config = app.config.merged(result_ttl=ttl)
    release = add_late(app)
    try:
        async with app:
            assert app.shared_server is not None  # the settle script's path
            wf, done = await chord_ending_late(app, release, ttl)
            assert (done.status, done.result, done.error) == ("success", 7, None)
            with anyio.fail_after(ttl + 2):
                while await app.get(wf.members[0]) is not None:  # noqa: ASYNC110 - Redis expiry
                    await anyio.sleep(0.05)
    finally:
        await app.aclose()


async def test_get_workflow_records_gives_none_for_a_record_that_is_gone(
    redis_url: str, prefix: str
) -> None:
    """A member's record deleted (evicted, or deleted by hand) under its workflow's record."""
    app = producer(redis_url, prefix)
    storage = app.storage
    assert isinstance(storage, RedisStorage)
    client = redis.asyncio.Redis.from_url(redis_url)

    async def delete(uuid: str) -> None:
        assert await client.delete(storage.record_key(uuid)) == 1

    try:
        await check_a_lost_member_reads_none(app, delete)
    finally:
        await client.aclose()
        await app.aclose()


def one_delivery_app(redis_url: str, prefix: str) -> AsyncQueueTasks:
    """The workflow app whose broker dead-letters a message at its second delivery."""
    app = build("redis", redis_url, prefix)
    app.broker = RedisBroker(redis_url, prefix=prefix, queue="wf", max_deliveries=1)
    return app


async def failing_chain(app: AsyncQueueTasks) -> Workflow:
    """Start the app and a two-step chain with an error callback."""
    await app.start()
    add, double = app.tasks["add"], app.tasks["double"]
    return await app.run_workflow(
        chain(add.s(1, 2), double.s()), on_error=app.signature("on_error")
    )


async def hand_back_once(app: AsyncQueueTasks) -> None:
    """Claim the first ready message and hand it back unsettled (its worker died): with
    :func:`one_delivery_app`, the next claim dead-letters it."""
    assert isinstance(app.broker, RedisBroker)
    gone = app.broker.consume_begun(
        prefetch=1, storage=app.storage, worker="gone", starts=lambda: 1
    )
    async with gone as deliveries:
        with anyio.fail_after(3):
            async for _ in deliveries:
                break


async def test_a_member_dead_lettered_at_claim_fails_the_workflow(
    redis_url: str, prefix: str
) -> None:
    """Delivered more often than max_deliveries (its workers died): the claim that
    dead-letters it fails its workflow in the same script and publishes the error callback."""
    app = one_delivery_app(redis_url, prefix)
    try:
        wf = await failing_chain(app)
        assert isinstance(app.broker, RedisBroker)
        seen: list[str] = []
        published: list[str] = []
        for _ in range(2):  # the first claim is handed back unsettled; the second dead-letters
            opened = app.broker.consume_begun(
                prefetch=1,
                storage=app.storage,
                worker="gone",
                starts=lambda: 1,
                published=published.extend,
            )
            async with opened as deliveries:
                with anyio.move_on_after(1):
                    async for delivery in deliveries:
                        seen.append(delivery.id)
                        break
        state = await app.wait_workflow(wf.id, 5)
        assert state.status == "error" and state.error is not None
        assert wf.members[0] in state.error and "dead-lettered" in state.error
        later = await app.get(wf.members[1])
        assert later is not None and later.status.value == "cancel"
        # The claim that dead-lettered the member published the error callback, and took it.
        assert seen == [wf.members[0], state.on_error]
        assert published == [state.on_error]  # and said so
        letters = await app.dead_letters()
        assert [d.id for d in letters] == [wf.members[0]]
        stats = await app.broker.stats()
        assert sum(stats.ready_by_priority.values()) == 1  # the error callback, published
    finally:
        await app.aclose()


async def test_the_error_callback_a_claim_publishes_is_claimed_at_once(
    redis_url: str, prefix: str
) -> None:
    """A claim that asked for more than the ready set held (prefetch 4, one message) and
    dead-lettered a member publishes its workflow's error callback: it is taken at once, well
    within the lease (30 s). Before, the claim deleted the callback's wake-up as a stale one
    and the callback waited for the next idle claim, min(lease, 5 s) later."""
    app = one_delivery_app(redis_url, prefix)
    try:
        wf = await failing_chain(app)
        assert isinstance(app.broker, RedisBroker)
        await hand_back_once(app)
        second = app.broker.consume_begun(
            prefetch=4, storage=app.storage, worker="w", starts=lambda: 1
        )
        async with second as deliveries:  # its claim dead-letters the member
            with anyio.fail_after(1):
                callback = await deliveries.__anext__()
            state = await app.get_workflow(wf.id)
            assert state is not None and state.status == "error"
            assert callback.id == state.on_error
            assert await callback.ack() is True
    finally:
        await app.aclose()


async def test_a_member_its_worker_ended_dead_lettered_fails_the_workflow_at_the_next_claim(
    redis_url: str, prefix: str
) -> None:
    """The worker of a member's last allowed delivery lost its lease while the task ran: it
    stored the record as dead-lettered (``Settlement._dead_lettered``) and died before telling
    the workflow. The claim that then dead-letters the message counts the member (before, it
    skipped a record already final: the workflow hung for ever)."""
    app = one_delivery_app(redis_url, prefix)
    try:
        wf = await failing_chain(app)
        assert isinstance(app.broker, RedisBroker)
        seen: list[str] = []
        for claim in range(2):
            opened = app.broker.consume_begun(
                prefetch=1, storage=app.storage, worker="gone", starts=lambda: 1
            )
            async with opened as deliveries:
                with anyio.move_on_after(1):
                    async for delivery in deliveries:
                        seen.append(delivery.id)
                        if claim:
                            break
                        record = getattr(delivery, "begun", None)
                        assert record is not None
                        record.status, record.token = TaskStatus.ERROR, "dead-letter"
                        record.error = "dead-lettered: the lease of its last delivery ran out"
                        assert await app.storage.save(record, fence=delivery.token)
                        break  # and the worker dies: nothing tells the workflow
        state = await app.wait_workflow(wf.id, 5)
        assert state.status == "error" and state.error is not None
        assert wf.members[0] in state.error and "dead-lettered" in state.error
        later = await app.get(wf.members[1])
        assert later is not None and later.status is TaskStatus.CANCEL
        # The second claim dead-lettered the member, published the error callback, took it.
        assert seen == [wf.members[0], state.on_error]
        assert [d.id for d in await app.dead_letters()] == [wf.members[0]]
        stats = await app.broker.stats()
        assert sum(stats.ready_by_priority.values()) == 1  # the error callback, published once
    finally:
        await app.aclose()


async def test_a_late_dead_letter_record_does_not_publish_a_running_error_callback_again(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker of a member's last allowed delivery lost its lease during the run: it stores
    the record as dead-lettered, and before it tells the workflow, another worker's claim
    dead-letters the message, counts the member (ac27834), publishes the error callback and
    starts it. The first worker's own continuation is then a repeat: it must not publish the
    running callback again (a PUBLISH replaces even a delivered message: it ran twice)."""
    from qtasks.executor import TaskRun
    from qtasks.flow import FlowGate
    from qtasks.outage import Outage
    from qtasks.settle import Settlement
    from qtasks.workflows import runtime

    app = one_delivery_app(redis_url, prefix)
    app.config = app.config.merged(max_deliveries=1)  # as the broker's: the settle knows
    try:
        wf = await failing_chain(app)
        broker = app.broker
        assert isinstance(broker, RedisBroker)
        opened = broker.consume_begun(
            prefetch=1, storage=app.storage, worker="w1", starts=lambda: 1
        )
        async with opened as deliveries:
            held = await deliveries.__anext__()  # its last allowed delivery
        # (leaving the consumer handed it back: its lease is gone, as when it runs out)
        record = getattr(held, "begun", None)
        assert record is not None and held.id == wf.members[0]
        running: list[Any] = []
        real = runtime.member_ended

        async def another_claim_first(*args: Any, **kwargs: Any) -> None:
            # Between the first worker's save and its continuation: the second worker claims.
            second = broker.consume_begun(
                prefetch=1, storage=app.storage, worker="w2", starts=lambda: 1
            )
            async with second as other:
                callback = await other.__anext__()
                running.append(callback)
                await real(*args, **kwargs)  # the first worker goes on, the callback running
                assert await callback.ack() is True, "the running callback was replaced"

        monkeypatch.setattr(runtime, "member_ended", another_claim_first)
        task = app.tasks["add"]
        message = app.codec.decode(held.body)
        run = TaskRun(app=app, task=task, message=message, record=record, delivery=held)
        settlement = Settlement(Outage(logging.getLogger("test"), "storage"), FlowGate())
        assert await settlement._dead_lettered(app, run, held) is True
        state = await app.get_workflow(wf.id)
        assert state is not None and [c.id for c in running] == [state.on_error]
        stats = await app.broker.stats()
        assert (sum(stats.ready_by_priority.values()), stats.in_flight) == (0, 0)
    finally:
        await app.aclose()


async def test_a_worker_fires_the_enqueue_hook_for_an_error_callback_its_claim_published(
    redis_url: str, prefix: str
) -> None:
    """The worker's claim dead-letters a member (its earlier delivery was never settled) and
    publishes the workflow's error callback in the same script: the worker fires
    ``qtasks_task_enqueued`` for it, as for what a settle publishes."""
    app = one_delivery_app(redis_url, prefix)
    enqueued: list[str] = []
    second = anyio.Event()

    class Seen:
        @hookimpl
        def qtasks_task_enqueued(self, record: TaskRecord) -> None:
            enqueued.append(record.uuid)
            if len(enqueued) == 2:
                second.set()

    app.add_plugin(Seen())
    try:
        wf = await failing_chain(app)
        assert isinstance(app.broker, RedisBroker)
        assert enqueued == [wf.members[0]]  # the first step, by the client
        await hand_back_once(app)
        async with app:  # this worker's claim dead-letters the member
            state = await app.wait_workflow(wf.id, 10)
            assert state.status == "error" and state.on_error is not None
            with anyio.fail_after(5):
                await second.wait()  # fired by a task of the worker's own
        assert enqueued == [wf.members[0], state.on_error]
    finally:
        await app.aclose()


async def test_the_workflow_list_skips_and_forgets_expired_records(
    redis_url: str, prefix: str
) -> None:
    app = producer(redis_url, prefix)
    double = app.tasks["double"]
    try:
        ids = [(await app.run_workflow(double.s(i))).id for i in range(3)]
        storage = app.storage
        assert isinstance(storage, WorkflowStore)
        assert [r.uuid for r in await storage.workflows(5)] == ids[::-1]
        tag = app.storage.key_tag  # type: ignore[attr-defined]  # a RedisStorage here
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            await client.delete(f"{tag}:r:{ids[1]}")  # as when its result_ttl ran out
            assert [r.uuid for r in await storage.workflows(5)] == [ids[2], ids[0]]
            listed: list[bytes] = await client.zrange(f"{tag}:wf", 0, -1)  # type: ignore[assignment]  # bytes: no decode_responses
            left = [i.decode() for i in listed]
        finally:
            await client.aclose()
        assert sorted(left) == sorted([ids[0], ids[2]])
        assert [r.uuid for r in await storage.workflows(1)] == [ids[2]]
    finally:
        await app.aclose()


def short_lived(
    redis_url: str, prefix: str, result_ttl: float, queue: str = "wf-index"
) -> AsyncQueueTasks:
    """A worker app whose results (workflow records included) expire after ``result_ttl``."""
    app = AsyncQueueTasks(
        "workflow-index",
        broker=RedisBroker(redis_url, prefix=prefix, queue=queue),
        storage=RedisStorage(redis_url, prefix=prefix),
        config=QueueConfig(result_ttl=result_ttl),
    )

    @app.task
    async def double(x: int) -> int:
        return 2 * x

    return app


async def indexed(client: redis.asyncio.Redis, tag: str) -> set[str]:
    listed: list[bytes] = await client.zrange(f"{tag}:wf", 0, -1)  # type: ignore[assignment]  # bytes: no decode_responses
    return {i.decode() for i in listed}


async def test_a_new_workflow_removes_expired_ones_from_the_list_without_listing(
    redis_url: str, prefix: str
) -> None:
    """The index of workflows was pruned only by a listing (the dashboard, ``qtasks
    inspect``): on a cluster never looked at, one entry a workflow for ever. Adding one now
    removes the entries whose records expired; a workflow older than the TTL that still
    runs keeps its entry."""
    app = short_lived(redis_url, prefix, result_ttl=0.3)
    idle = short_lived(redis_url, prefix, result_ttl=0.3, queue="wf-idle")  # no worker
    double = app.tasks["double"]
    client = redis.asyncio.Redis.from_url(redis_url)
    tag = app.storage.key_tag  # type: ignore[attr-defined]  # a RedisStorage here
    try:
        # Runs for as long as the test: listed as made long ago (a long workflow).
        running = (await idle.run_workflow(idle.tasks["double"].s(9))).id
        await client.zadd(f"{tag}:wf", {running: 1}, xx=True)
        async with app:
            ended = [(await app.run_workflow(double.s(i))).id for i in range(3)]
            for id in ended:
                assert (await app.wait_workflow(id, timeout=5)).status == "success"
        with anyio.fail_after(5):
            while await client.exists(*(f"{tag}:r:{id}" for id in ended)):  # noqa: ASYNC110 - a TTL runs out
                await anyio.sleep(0.05)
        assert await indexed(client, tag) == {*ended, running}
        newest = (await app.run_workflow(double.s(10))).id
        assert await indexed(client, tag) == {running, newest}
    finally:
        await client.aclose()
        await app.aclose()
        await idle.aclose()


async def test_long_running_workflows_do_not_keep_expired_ones_in_the_list(
    redis_url: str, prefix: str
) -> None:
    """More running workflows older than the TTL than an add checks, at the head of the
    index, do not stop the adds from reaching the expired entries behind them."""
    app = short_lived(redis_url, prefix, result_ttl=60)
    double = app.tasks["double"]
    client = redis.asyncio.Redis.from_url(redis_url)
    tag = app.storage.key_tag  # type: ignore[attr-defined]  # a RedisStorage here
    try:
        running = [(await app.run_workflow(double.s(i))).id for i in range(20)]
        # Made long ago: the running ones first, then 30 whose records expired.
        await client.zadd(f"{tag}:wf", {id: 1 + n for n, id in enumerate(running)}, xx=True)
        expired = {f"expired-{n}": 100 + n for n in range(30)}
        await client.zadd(f"{tag}:wf", expired)
        added: set[str] = set()
        for _ in range(60):  # each removes up to 8: 10 adds in the median, 37 at most in 200,000
            if (await indexed(client, tag)).isdisjoint(expired):
                break
            added.add((await app.run_workflow(double.s(0))).id)
        assert await indexed(client, tag) == {*running, *added}
    finally:
        await client.aclose()
        await app.aclose()


async def test_a_chord_callback_s_input_fits_in_its_message(redis_url: str, prefix: str) -> None:
    # The callback's message names where its input is read from. One uuid per member (35
    # bytes) made a chord of 30,000 members (here 300, under a 4 KiB message limit) fail
    # run_workflow with MessageTooLargeError; runs of members are named as ranges of the
    # workflow's members instead, evenly spaced ones too (the last steps of a group of chains).
    app = AsyncQueueTasks(
        "big-chords",
        broker=RedisBroker(redis_url, prefix=prefix, queue="wf"),
        storage=RedisStorage(redis_url, prefix=prefix),
        config=QueueConfig(max_message_size=4096, max_tasks_process=32),
    )

    @app.task
    async def double(x: int) -> int:
        return 2 * x

    @app.task
    async def total(xs: list[Any]) -> int:
        return sum(x if isinstance(x, int) else sum(x) for x in xs)

    flows: list[Node] = [
        chord(double.map(range(300)), total.s()),
        chain(group(chain(double.s(i), double.s()) for i in range(300)), total.s()),
        chain(group(double.s(5), double.map(range(300)), *double.map(range(100)).tasks), total.s()),
    ]
    async with app:
        ids = [(await app.run_workflow(flow)).id for flow in flows]
        done = [await app.wait_workflow(id, timeout=30) for id in ids]
    everything = sum(2 * i for i in range(300))
    assert [(d.status, d.result, d.error) for d in done] == [
        ("success", everything, None),
        ("success", 2 * everything, None),
        ("success", 10 + everything + sum(2 * i for i in range(100)), None),
    ]


async def test_a_step_s_record_shows_its_input_once_it_started(redis_url: str, prefix: str) -> None:
    # Its record showed None in its input's place for ever: while it ran, and once it ended.
    app = AsyncQueueTasks(
        "step-input",
        broker=RedisBroker(redis_url, prefix=prefix, queue="wf"),
        storage=RedisStorage(redis_url, prefix=prefix),
    )

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    await check_step_inputs(app)
