"""A worker app for the flow-control tests, run as ``python flow_app.py`` (until SIGTERM or
SIGKILL) or built in process.

Settings come from the environment: ``QT_URL`` (Redis: storage, global config, and broker
unless ``QT_RABBITMQ`` is set to an AMQP URL), ``QT_PREFIX``, ``QT_QUEUE``, ``QT_LEASE``,
``QT_MAX_DELIVERIES``. ``max_deliveries`` is 1 unless set: a flow-control requeue counted as a
delivery would dead-letter the message at once, so the tests see it. Each execution of a task pushes
``"<event> <i> <key> <unix time> <pid>"`` onto the Redis list ``<prefix>:ledger`` (the server
keeps it when a worker is killed).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import anyio
import redis.asyncio

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

RATE = "50/s"
BURST = 5
PER_KEY = 3


def build(
    url: str,
    prefix: str,
    *,
    queue: str = "flow",
    rabbitmq: str | None = None,
    lease: float = 30.0,
    concurrency: int = 10,
    max_deliveries: int = 1,
) -> AsyncQueueTasks:
    """An app with Redis storage and global config under ``prefix``; its broker is Redis, or
    RabbitMQ on ``queue`` when ``rabbitmq`` is an AMQP URL."""
    broker: Any
    if rabbitmq:
        from qtasks_rabbitmq import RabbitMQBroker

        broker = RabbitMQBroker(rabbitmq, queue=queue)
    else:
        broker = RedisBroker(url, prefix=prefix, queue=queue)
    app = AsyncQueueTasks(
        "flow-tests",
        broker=broker,
        storage=RedisStorage(url, prefix=prefix),
        global_config=RedisGlobalConfig(url, prefix=prefix),
        config=QueueConfig(
            lease=lease,
            max_tasks_process=concurrency,
            prefetch=concurrency,
            heartbeat_interval=0.5,
            shutdown_grace=1.0,
            max_deliveries=max_deliveries,
        ),
    )
    ledger_client = redis.asyncio.Redis.from_url(url)
    ledger = f"{prefix}:ledger"

    async def note(event: str, i: int, key: str = "-") -> None:
        await ledger_client.rpush(ledger, f"{event} {i} {key} {time.time():.6f} {os.getpid()}")

    @app.task(rate_limit=RATE, rate_burst=BURST)
    async def limited(i: int) -> int:
        await note("start", i)
        return i

    @app.task(concurrency_key="customer", max_concurrency=PER_KEY)
    async def per_customer(i: int, customer: str, seconds: float) -> int:
        await note("start", i, customer)
        await anyio.sleep(seconds)
        await note("end", i, customer)
        return i

    @app.task(concurrency_key="customer", max_concurrency=1)
    async def exclusive(i: int, customer: str, seconds: float) -> int:
        await note("start", i, customer)
        await anyio.sleep(seconds)
        await note("end", i, customer)
        return i

    return app


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app = build(
        os.environ["QT_URL"],
        os.environ["QT_PREFIX"],
        queue=os.environ.get("QT_QUEUE", "flow"),
        rabbitmq=os.environ.get("QT_RABBITMQ") or None,
        lease=float(os.environ.get("QT_LEASE", "30")),
        max_deliveries=int(os.environ.get("QT_MAX_DELIVERIES", "1")),
    )
    print("serving", flush=True)
    app.run_forever()
    sys.exit(0)


if __name__ == "__main__":
    main()
