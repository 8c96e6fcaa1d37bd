"""A producer that adds tasks through RabbitMQ and just ends says nothing on the way out.

The end of its event loop is not a lost link: no "lost ... reconnecting", no aio-pika callback
left pending ("Task was destroyed but it is pending!", "Event loop is closed"), no unclosed
socket. Each script runs in a subprocess with ``-W default`` (ResourceWarnings shown) and must
leave stderr empty.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from qtasks_rabbitmq import Topology

from .conftest import URL, delete_topology

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis]

ADDS = 300
"""Enough adds for the noise of longer runs (pending aio-pika callbacks) to show."""

ASYNC_PRODUCER = """
import asyncio

from qtasks import AsyncQueueTasks
from qtasks_rabbitmq import RabbitMQBroker
from qtasks_redis import RedisStorage

app = AsyncQueueTasks(
    broker=RabbitMQBroker({amqp!r}, queue={name!r}),
    storage=RedisStorage({redis!r}, prefix={name!r}),
)


@app.task
async def add(a: int, b: int) -> int:
    return a + b


async def main() -> None:
    for i in range({adds}):
        await add.add_task(i, 1)


asyncio.run(main())  # no aclose(): the loop's end closes the app
print("added")
"""

SYNC_PRODUCER = """
from qtasks import QueueTasks
from qtasks_rabbitmq import RabbitMQBroker
from qtasks_redis import RedisStorage

app = QueueTasks(
    broker=RabbitMQBroker({amqp!r}, queue={name!r}),
    storage=RedisStorage({redis!r}, prefix={name!r}),
)


@app.task
def add(a: int, b: int) -> int:
    return a + b


for i in range({adds}):
    add.add_task(i, 1)
print("added")  # no close(), no `with`: the interpreter's exit closes the app
"""


@pytest.fixture
def name(redis_url: str) -> Iterator[str]:
    """A queue name and Redis prefix of this test; both are deleted afterwards."""
    name = f"qtasks-test-{uuid.uuid4().hex[:10]}"
    yield name
    asyncio.run(asyncio.wait_for(delete_topology(Topology(name)), 30))
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{{{name}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def run_producer(tmp_path: Path, template: str, name: str, redis_url: str) -> None:
    script = tmp_path / "producer.py"
    script.write_text(
        textwrap.dedent(template).format(amqp=URL, redis=redis_url, name=name, adds=ADDS)
    )
    done = subprocess.run(
        [sys.executable, "-W", "default", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "added"
    assert done.stderr == "", "a producer must end quietly"


def test_async_producer_ends_quietly(tmp_path: Path, name: str, redis_url: str) -> None:
    run_producer(tmp_path, ASYNC_PRODUCER, name, redis_url)


def test_sync_producer_ends_quietly(tmp_path: Path, name: str, redis_url: str) -> None:
    run_producer(tmp_path, SYNC_PRODUCER, name, redis_url)
