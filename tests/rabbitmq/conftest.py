"""Fixtures for tests against the real RabbitMQ at 127.0.0.1:5672 (guest/guest).

Each test gets its own queue name, and every queue and exchange of that name is deleted after the
test. Tests skip when RabbitMQ is not reachable, but fail when ``CI`` is set.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import anyio
import pytest
from amqp_cleanup import URL as URL  # re-exported: the tests here import it from conftest
from amqp_cleanup import delete_topology as delete_topology
from skips import unavailable
from workflow_app import Workers

from qtasks.components import BrokerStats
from qtasks.config import QueueConfig
from qtasks_rabbitmq import RabbitMQBroker, Topology

T = TypeVar("T")


@pytest.fixture(autouse=True)
def _needs_rabbitmq(rabbitmq_url: str) -> None:
    """Every test here needs the server: skip locally, fail under CI (root conftest)."""


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    """Run ``rabbitmqctl`` (skip the test when it is not available here)."""
    if shutil.which("rabbitmqctl") is None:
        unavailable("rabbitmqctl is not installed")  # fails under CI, skips elsewhere
    done = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


@pytest.fixture
def queue_name() -> str:
    return f"qtasks-test-{uuid.uuid4().hex[:10]}"


BrokerFactory = Callable[..., Awaitable[RabbitMQBroker]]


@pytest.fixture
async def make_broker(queue_name: str) -> AsyncIterator[BrokerFactory]:
    """``await make_broker(max_deliveries=3, queue_type="quorum")``: a started broker on this
    test's queue; every broker made is stopped and the queues deleted afterwards."""
    topologies: list[Topology] = []
    async with AsyncExitStack() as stack:

        async def make(**options: Any) -> RabbitMQBroker:
            config_keys = {
                "max_deliveries",
                "prefetch",
                "lease",
                "dead_letter_ttl",
                "max_dead_letters",
            }
            config = QueueConfig(
                broker="rabbitmq",
                broker_url=URL,
                **{k: v for k, v in options.items() if k in config_keys},
            )
            kwargs = {k: v for k, v in options.items() if k not in config_keys}
            kwargs.setdefault("queue", queue_name)
            broker = RabbitMQBroker(config.broker_url or URL, **kwargs)
            await broker.start(stack, config)
            topologies.append(broker.topology)
            return broker

        try:
            yield make
        finally:
            await stack.aclose()
            for topology in {t.queue: t for t in topologies}.values():
                await asyncio.wait_for(delete_topology(topology), 30)


@pytest.fixture
def workers(tmp_path: Path, redis_url: str, prefix: str, queue_name: str) -> Iterator[Workers]:
    """Worker subprocesses of ``tests/workflow_app.py`` on this test's queue, their storage
    Redis under ``prefix``, with a lease of 2 s (a test may set more of their environment in
    ``.env`` before it starts them); stopped, and the queue's topology deleted, afterwards.
    ``test_end_to_end.py`` has a ``workers`` of its own, of ``worker_app.py`` processes."""
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


PROBLEMS = ("Traceback", "never retrieved", "was destroyed but it is pending", "CRITICAL")
"""What must never be in a worker's log: an unhandled exception in any form (as for Redis's
worker processes, ``tests/redis/redis_procs.py``)."""


def problems(log: str) -> list[str]:
    """The lines of a worker's log that show an unhandled exception (:data:`PROBLEMS`)."""
    return [line for line in log.splitlines() if any(p in line for p in PROBLEMS)]


def connection_pids(queue: str) -> list[str]:
    """The server-side pids of the open connections of brokers on ``queue``."""
    lines = rabbitmqctl("list_connections", "-q", "pid", "client_properties").splitlines()
    return [line.split()[0] for line in lines if f"qtasks {queue} " in line]


def close_connections(queue: str, why: str = "closed by a qtasks test") -> int:
    """Close, from the server side, every connection a broker on ``queue`` opened."""
    pids = connection_pids(queue)
    for pid in pids:
        rabbitmqctl("close_connection", pid, why)
    return len(pids)


async def drop_work_queue(broker: RabbitMQBroker) -> None:
    """Delete ``broker``'s work queue behind its back: what is published to it is returned."""
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(broker.topology.queue)


async def poll(check: Callable[[], Awaitable[T | None]], timeout: float, every: float = 0.05) -> T:
    """Call ``check`` until it returns something other than ``None``/``False``; for state that
    offers nothing to wait on (another process's files, server-side queue counts)."""
    with anyio.fail_after(timeout):
        while True:
            value = await check()
            if value is not None and value is not False:
                return value
            await anyio.sleep(every)


async def drained(broker: RabbitMQBroker, timeout: float) -> BrokerStats:
    """Wait until ``broker``'s queue holds nothing ready and nothing unacked; its stats then."""

    async def empty() -> BrokerStats | None:
        stats = await broker.stats()
        return stats if stats.ready_by_priority == {} and stats.in_flight == 0 else None

    return await poll(empty, timeout)
