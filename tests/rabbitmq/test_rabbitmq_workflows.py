"""Workflows on RabbitMQ with a Redis storage and real worker processes: the worker that
settles a member publishes the next step (confirmed) before it acks."""

from __future__ import annotations

import signal

import anyio
import pytest
from workflow_app import Workers, build, kill_while_running, ledger_lines

from qtasks import AsyncQueueTasks, chain, chord, group
from qtasks.workflows import Node

from .conftest import URL

pytestmark = pytest.mark.anyio


def producer(redis_url: str, prefix: str, queue: str) -> AsyncQueueTasks:
    return build("rabbitmq", redis_url, prefix, rabbitmq_url=URL, queue=queue)


async def test_chain_chord_nesting_and_failure(
    workers: Workers, redis_url: str, prefix: str, queue_name: str
) -> None:
    workers.start(2)
    app = producer(redis_url, prefix, queue_name)
    add, double, total, fail = (app.tasks[n] for n in ("add", "double", "total", "fail"))
    flows: list[Node] = [
        chain(add.s(1, 2), double.s(), double.s()),
        chord(double.map(range(200)), total.s()),
        chain(group(chain(add.s(1, 1), double.s()), add.s(5, 5)), total.s(), double.s()),
    ]
    try:
        ids = [(await app.run_workflow(flow)).id for flow in flows]
        failing = await app.run_workflow(
            chain(add.s(1, 2), fail.s(), double.s()), on_error=app.signature("on_error")
        )
        done = [await app.wait_workflow(id, timeout=30) for id in ids]
        failed = await app.wait_workflow(failing.id, timeout=30)
        assert failed.on_error is not None
        callback = await app.wait(failed.on_error, 30)
        later = await app.get(failed.members[2])
    finally:
        await app.aclose()
    assert [(d.status, d.result) for d in done] == [
        ("success", 12),
        ("success", sum(2 * i for i in range(200))),
        ("success", 28),
    ]
    assert sorted(workers.ran("total")) == ["2", "200"]
    assert failed.status == "error" and failed.error is not None
    assert failed.members[1] in failed.error
    assert later is not None and later.status.value == "cancel"
    assert callback.returning == failed.id
    assert workers.ran("on_error") == [failed.id]
    assert workers.tracebacks() == []


@pytest.mark.reliability
async def test_kill_9_during_a_chord_runs_the_callback_exactly_once(
    workers: Workers, redis_url: str, prefix: str, queue_name: str
) -> None:
    """As the Redis test of the same name, through RabbitMQ: a killed worker's deliveries
    come back (its connection is gone) and are settled by another; the chord's callback
    runs once and gets every member's result."""
    workers.start(3)
    app = producer(redis_url, prefix, queue_name)
    slow, total = app.tasks["slow"], app.tasks["total"]
    # Long enough for four kills on a fast machine too (1,000 members and pauses of
    # 0.2-0.8 s ended after three kills there): about 2 s of work for 48 runners.
    members = 2000
    try:
        wf = await app.run_workflow(chord([slow.s(i, 0.05) for i in range(members)], total.s()))
        kills = await kill_while_running(app, wf.id, workers, 8, (0.1, 0.5))
        done = await app.wait_workflow(wf.id, timeout=60)
    finally:
        await app.aclose()
    assert kills >= 4, f"the chord ended after {kills} kills: too soon to test anything"
    assert (done.status, done.result) == ("success", sum(range(members)))
    assert workers.ran("total") == [str(members)], "the callback ran more or less than once"
    assert {int(v) for v in workers.ran("slow")} == set(range(members))


async def test_a_step_published_again_by_a_redelivered_member_runs_once(
    workers: Workers, redis_url: str, prefix: str, queue_name: str
) -> None:
    """The RabbitMQ gap of issue 19, staged by workflow_app's CopyProbe with real processes:
    worker 1 settles ``add``, publishes ``gated`` (confirmed) and SIGKILLs itself before
    acking ``add``. Worker 2 gets ``add`` again, finds it final and publishes ``gated`` a
    second time, while the first copy is held at worker 2 (delivered, not begun). The second
    copy runs and waits until the first reached begin: the first is dropped there (a stale
    copy), and ``gated`` runs once."""
    workers.env["QT_PROBE"] = "1"
    (first,) = workers.start(1)
    app = producer(redis_url, prefix, queue_name)
    add, gated = app.tasks["add"], app.tasks["gated"]
    try:
        wf = await app.run_workflow(chain(add.s(1, 2), gated.s()))
        code = await anyio.to_thread.run_sync(first.proc.wait, 30)
        assert code == -signal.SIGKILL, "worker 1 did not die where it should"
        (second,) = workers.start(1)
        done = await app.wait_workflow(wf.id, timeout=30)
        step = await app.get(wf.members[1])
    finally:
        await app.aclose()
    assert (done.status, done.result) == ("success", 3)
    assert workers.ran("add") == ["3"], "add ran again: its redelivery should find it final"
    assert workers.ran("gated") == ["3"], "the step ran more or less than once"
    # Both copies reached worker 2: the first (generation 0) and the one published again.
    copies = {value for name, value in ledger_lines(workers.ledger) if name == "copy"}
    assert copies >= {f"{wf.members[1]}:0", f"{wf.members[1]}:1"}, copies
    assert f"dropped a stale copy of workflow step {wf.members[1]}" in second.log.read_text()
    assert step is not None and (step.status.value, step.attempt) == ("success", 1)
    assert workers.tracebacks() == []
