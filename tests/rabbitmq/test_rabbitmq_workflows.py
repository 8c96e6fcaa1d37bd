"""Workflows on RabbitMQ with a Redis storage and real worker processes: the worker that
settles a member publishes the next step (confirmed) before it acks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from workflow_app import Workers, build, kill_while_running

from qtasks import AsyncQueueTasks, chain, chord, group
from qtasks.workflows import Node
from qtasks_rabbitmq import Topology

from .conftest import URL, delete_topology

pytestmark = pytest.mark.anyio


@pytest.fixture
def workers(tmp_path: Path, redis_url: str, prefix: str, queue_name: str) -> Iterator[Workers]:
    made = Workers(
        tmp_path,
        {
            "QT_BACKEND": "rabbitmq",
            "QT_REDIS": redis_url,
            "QT_RABBITMQ": URL,
            "QT_QUEUE": queue_name,
            "QT_PREFIX": prefix,
            "QT_LEASE": "2",
        },
    )
    yield made
    made.stop()
    anyio.run(delete_topology, Topology(queue_name))


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
    members = 1000
    try:
        wf = await app.run_workflow(chord([slow.s(i, 0.05) for i in range(members)], total.s()))
        kills = await kill_while_running(app, wf.id, workers, 8, (0.2, 0.8))
        done = await app.wait_workflow(wf.id, timeout=60)
    finally:
        await app.aclose()
    assert kills >= 4, f"the chord ended after {kills} kills: too soon to test anything"
    assert (done.status, done.result) == ("success", sum(range(members)))
    assert workers.ran("total") == [str(members)], "the callback ran more or less than once"
    assert {int(v) for v in workers.ran("slow")} == set(range(members))
