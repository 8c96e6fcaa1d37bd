"""The broker's own ``max_deliveries=`` is the delivery limit the worker decides by (whether a
delivery whose lease ran out was the last, how many failures dead-letter a message);
``config.max_deliveries`` set to another value is overruled with one warning. The broker's
own ``lease=`` and ``max_deliveries=`` are checked as those settings are."""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import pytest

from qtasks import AsyncQueueTasks, MemoryBroker, QueueConfig, TaskStatus
from qtasks.components import DeliveryLimit, delivery_limit
from qtasks.errors import ConfigError

pytestmark = pytest.mark.anyio


def test_the_delivery_limit_is_the_brokers_else_the_configs() -> None:
    class Plain:  # a broker without the capability
        pass

    config = QueueConfig(max_deliveries=7)
    assert isinstance(MemoryBroker(max_deliveries=2), DeliveryLimit)
    assert delivery_limit(MemoryBroker(max_deliveries=2), config) == 2
    assert delivery_limit(Plain(), config) == 7


async def _hogged_once(broker_limit: int, config_limit: int | None) -> tuple[Any, list[str]]:
    """Run a task whose first delivery blocks the loop past its lease, with the broker's
    ``max_deliveries=broker_limit`` and ``config.max_deliveries=config_limit`` (None: the
    default); the record it ends with, and the ids of the broker's dead letters."""
    lease = 0.3
    broker = MemoryBroker(lease=lease, max_deliveries=broker_limit)
    config = QueueConfig(max_tasks_process=1)
    if config_limit is not None:
        config.max_deliveries = config_limit
    app = AsyncQueueTasks(broker=broker, config=config)

    @app.task
    async def hog() -> str:
        time.sleep(lease * 2)  # noqa: ASYNC251 - blocks the loop: the lease runs out
        return "late"

    async with app:
        task = await app.add_task("hog")
        done = await app.wait(task.uuid, timeout=10)
        if done.status is TaskStatus.ERROR:
            with anyio.fail_after(5):  # the broker's next claim dead-letters it
                while task.uuid not in {d.id for d in await broker.dead_letters()}:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
        dead = [d.id for d in await broker.dead_letters()]
    return done, dead


async def test_the_last_delivery_is_the_last_of_the_brokers_limit() -> None:
    """Only ``MemoryBroker(max_deliveries=1)`` is set: the one delivery lost its lease, so the
    broker dead-letters the message and the record says so (before, the worker counted to
    the config's 5, stored the late result, and the record said ``success``)."""
    done, dead = await _hogged_once(broker_limit=1, config_limit=None)
    assert (done.status, done.returning) == (TaskStatus.ERROR, None)
    assert done.error == (
        "dead-lettered: delivery limit reached: the lease of its last allowed delivery ran "
        "out (max_deliveries=1)"
    )
    assert dead == [done.uuid]


async def test_a_lower_config_limit_does_not_dead_letter_the_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker allows 3 deliveries, ``config.max_deliveries`` says 1: the first delivery
    is not the last, its result stands, and the overruled setting is told once (before,
    the record said ``dead-lettered`` while the broker kept the message and dead-lettered
    nothing)."""
    with caplog.at_level(logging.WARNING, logger="qtasks"):
        done, dead = await _hogged_once(broker_limit=3, config_limit=1)
    assert (done.status, done.returning, done.error) == (TaskStatus.SUCCESS, "late", None)
    assert dead == []
    told = [r.getMessage() for r in caplog.records if "delivery limit" in r.getMessage()]
    assert told == [
        "the delivery limit of the broker (MemoryBroker, max_deliveries=3) is used, not "
        "config.max_deliveries (1): messages are dead-lettered after 3 deliveries or "
        "failures; set only one of the two"
    ]


def test_the_brokers_own_options_are_checked_as_the_settings_are() -> None:
    """Every bad value, for memory and Redis: ``LeaseLengthContract`` and
    ``DeliveryLimitContract``. Before, ``MemoryBroker(lease=0)`` lost every delivery at once
    and ``max_deliveries="5"`` failed at the first claim with a bare TypeError."""
    with pytest.raises(ConfigError) as info:
        MemoryBroker(lease=0)
    assert str(info.value) == "MemoryBroker: 'lease' must be a positive, finite number, got 0"
    with pytest.raises(ConfigError) as info:
        MemoryBroker(max_deliveries="5")  # type: ignore[arg-type] # the refused value
    assert str(info.value) == "MemoryBroker: 'max_deliveries' expects int, got str '5'"
    assert type(MemoryBroker(lease=2).lease) is float  # as QueueConfig(lease=2) gives
    assert MemoryBroker(max_deliveries=1).max_deliveries == 1
