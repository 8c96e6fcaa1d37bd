"""Long tasks and prefetch on RabbitMQ, the records in Redis (tests/prefetch_scenarios.py)."""

from __future__ import annotations

from typing import Any

import pytest
from prefetch_scenarios import (
    default_prefetch_leaves_waiting_tasks_to_a_new_worker,
    next_task_goes_to_an_idle_worker,
)

from qtasks_rabbitmq import RabbitMQBroker
from qtasks_rabbitmq.topology import QueueType
from qtasks_redis import RedisStorage

from .conftest import URL, BrokerFactory

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_with_prefetch_0_the_next_task_goes_to_an_idle_worker(
    make_broker: BrokerFactory, queue_name: str, redis_url: str, prefix: str, queue_type: QueueType
) -> None:
    await make_broker(queue_type=queue_type)  # declares the queue; the fixture deletes it

    def components() -> dict[str, Any]:
        return {
            "broker": RabbitMQBroker(URL, queue=queue_name, queue_type=queue_type),
            "storage": RedisStorage(redis_url, prefix=prefix),
        }

    await next_task_goes_to_an_idle_worker(components)


async def test_with_the_default_prefetch_busy_workers_leave_waiting_tasks_to_a_new_one(
    make_broker: BrokerFactory, queue_name: str, redis_url: str, prefix: str
) -> None:
    """A classic queue: the qos follows the worker's hold (``wanted``), nothing pushed
    beyond the free slot. (A quorum queue's qos is fixed when it consumes.)"""
    await make_broker(queue_type="classic")

    def components() -> dict[str, Any]:
        return {
            "broker": RabbitMQBroker(URL, queue=queue_name, queue_type="classic"),
            "storage": RedisStorage(redis_url, prefix=prefix),
        }

    await default_prefetch_leaves_waiting_tasks_to_a_new_worker(components)
