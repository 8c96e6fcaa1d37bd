"""Reliability plan F3 on RabbitMQ: a second SIGTERM or SIGINT during a graceful stop's grace
ends the worker process at once, and nothing is lost: the tasks it was running are cancelled,
handed back, and run to ``success`` on a fresh worker.

The plan's bound is under 1 s from the second signal to the exit. The test allows
:data:`MARGIN` (5 s): the machine that runs the suite is busy, and the process's exit includes
closing its RabbitMQ and Redis connections; the time taken is in the assertion's message."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import anyio
import pytest

from qtasks import AsyncQueueTasks
from qtasks.record import TaskStatus
from qtasks_rabbitmq import RabbitMQBroker
from qtasks_redis import RedisStorage

from .conftest import URL, BrokerFactory, drained, poll, problems
from .test_end_to_end import Workers, lines, wait_for_lines, workers

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq, pytest.mark.slow, pytest.mark.reliability]

__all__ = ["workers"]  # the fixture, used by name

GRACE = 120.0
"""The first signal's grace: far longer than the test, so only the second signal can end it."""

MARGIN = 5.0
"""The most the test allows from the second signal to the exit (the plan says under 1 s)."""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_second_signal_ends_the_worker_at_once_and_loses_nothing(
    workers: Workers,
    queue_name: str,
    tmp_path: Path,
    make_broker: BrokerFactory,
    redis_url: str,
    prefix: str,
    signum: signal.Signals,
) -> None:
    """A worker (concurrency 4, prefetch 4, grace 120 s, Redis storage) holds 6 tasks of
    600 s: 4 running, 2 waiting. The first signal starts the graceful stop (the waiting two are
    handed back); the second, once the first is answered, ends the process, with exit code 0,
    within :data:`MARGIN`. Its 4 running tasks were cancelled there; a fresh worker (whose
    tasks end at once) runs all 6, each record ends ``success``, and the queue ends empty."""
    broker = await make_broker()  # declares the queue; the fixture deletes it afterwards
    name = signum.name
    workers.log = first_log = tmp_path / "first.log"
    first = workers.start(redis_url, prefix, WORKER_SHUTDOWN_GRACE=str(GRACE))
    app = AsyncQueueTasks(
        broker=RabbitMQBroker(URL, queue=queue_name), storage=RedisStorage(redis_url, prefix=prefix)
    )
    try:
        tasks = [await app.add_task("cancellable", f"s{i}", 600.0) for i in range(6)]
        await wait_for_lines(tmp_path / "started", 4, 30)
        first.send_signal(signum)

        async def answered() -> bool:
            return f"received {name}, stopping" in first_log.read_text()

        await poll(answered, 10)
        first.send_signal(signum)
        sent = time.monotonic()
        try:
            await anyio.to_thread.run_sync(first.wait, MARGIN)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker still running {MARGIN:g} s after the second {name}")
        took = time.monotonic() - sent
        log = first_log.read_text()
        assert first.returncode == 0, log
        assert f"received {name} again, stopping now" in log, log
        assert not problems(log), log
        print(f"exited {took:.2f} s after the second {name}")
        cancelled = lines(tmp_path / "cancelled")
        assert len(cancelled) == 4, cancelled
        assert {line.split()[1] for line in cancelled} == {str(first.pid)}
        assert not lines(tmp_path / "done"), "nothing ran to its end on the stopped worker"

        workers.log = tmp_path / "fresh.log"
        fresh = workers.start(redis_url, prefix, WORKER_MAX_SECONDS="0")
        with anyio.fail_after(60):
            ended = [await app.wait(task.uuid, timeout=None) for task in tasks]
        assert [t.status for t in ended] == [TaskStatus.SUCCESS] * len(tasks)
        assert [t.worker for t in ended] == [ended[0].worker] * len(tasks)
        done = lines(tmp_path / "done")
        assert sorted(line.split()[0] for line in done) == sorted(f"s{i}" for i in range(6))
        assert {line.split()[1] for line in done} == {str(fresh.pid)}
    finally:
        await app.aclose()

    assert (await drained(broker, 30)).dead_letters == 0
