"""A worker given SIGTERM while the network to RabbitMQ is partitioned (a black hole: bytes
accepted, nothing answered) exits within its shutdown grace plus a bounded margin (review
r17 #4). Before, its consumer's ``basic.cancel`` waited for an answer until the AMQP heartbeat
gave up (about 100 s with the default 30 s heartbeat), for ever without a heartbeat. Nothing it
held is lost: once its connection ends, RabbitMQ requeues every message it had not acked, and
a fresh worker runs them all."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import anyio
import pytest
from faultproxy import FaultProxy
from yarl import URL as ParsedURL

from .conftest import URL, BrokerFactory
from .test_end_to_end import Workers, lines, producer, wait_for_lines, workers

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq, pytest.mark.slow]

__all__ = ["workers"]  # the fixture, used by name

GRACE = 2.0
MARGIN = 8.0
"""What the test allows past the grace: the stop's own margin (``qtasks.stopping``, 1 s), the
broker's close of its link on the way out (its publish channel's close waits up to 5 s for an
answer: ``Link.close``, not bound by the stop's deadline), the process's exit. It took about
8.1 s in all here, with a grace of 2 s."""


async def test_sigterm_during_a_partition_stops_within_the_grace(
    workers: Workers, queue_name: str, tmp_path: Path, make_broker: BrokerFactory
) -> None:
    await make_broker()  # declares the queue; the fixture deletes it afterwards
    tags = [f"p{i}" for i in range(6)]  # 4 running, 2 received and waiting
    parsed = ParsedURL(URL)
    with FaultProxy((parsed.host or "127.0.0.1", parsed.port or 5672)) as proxy:
        url = str(parsed.with_host("127.0.0.1").with_port(proxy.port))
        first = workers.start(
            QTASKS_TEST_RABBITMQ_URL=url, WORKER_HEARTBEAT="0", WORKER_SHUTDOWN_GRACE=str(GRACE)
        )
        app = producer(queue_name)
        try:
            for tag in tags:
                await app.add_task("cancellable", tag, 600.0)
            await wait_for_lines(tmp_path / "started", 4, 30)
            proxy.blackhole()
            first.send_signal(signal.SIGTERM)
            started = time.monotonic()
            try:
                await anyio.to_thread.run_sync(first.wait, GRACE + MARGIN)
            except subprocess.TimeoutExpired:
                pytest.fail(f"worker still running {GRACE + MARGIN:g} s after SIGTERM")
            took = time.monotonic() - started
            assert first.returncode == 0
            assert took >= GRACE - 0.5, "the running tasks got their grace"
            proxy.passthrough()  # the dead worker's connection ends now
            fresh = workers.start(WORKER_MAX_SECONDS="0")
            done = await wait_for_lines(tmp_path / "done", len(tags), 60)
        finally:
            await app.aclose()
    # At least once: a hand-back cut by the deadline after its copy was written (delivered
    # when the partition heals) runs that task twice.
    assert {line.split()[0] for line in done} == set(tags)
    assert {line.split()[1] for line in done} == {str(fresh.pid)}
    cancelled = lines(tmp_path / "cancelled")
    assert {line.split()[1] for line in cancelled} == {str(first.pid)}, "cut at the grace's end"
