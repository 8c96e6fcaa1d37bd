"""QTasks' documented RabbitMQ app, ``QueueTasks(broker=AsyncRabbitMQBroker(url=...))``, kept its
records in Redis by default. In qtasks an app given only a shared broker keeps them in its own
memory: a producer waiting for a task that a worker of another process runs could only time
out. Waiting there raises ``ConfigError`` at once, saying what to write (and nothing is
published); a worker serving that way warns when it starts; serving in-process still works."""

from __future__ import annotations

import logging

import anyio
import pytest

from qtasks import AsyncQueueTasks, QueueTasks
from qtasks.errors import ConfigError
from qtasks_rabbitmq import RabbitMQBroker

from .conftest import URL, BrokerFactory

pytestmark = pytest.mark.anyio


async def test_waiting_on_records_no_worker_here_can_write_says_what_to_write(
    make_broker: BrokerFactory, queue_name: str
) -> None:
    broker = await make_broker()  # declares the queue; the fixture deletes it afterwards
    app = AsyncQueueTasks(broker=RabbitMQBroker(URL, queue=queue_name))

    @app.task(name="rabbitmq_example")
    async def rabbitmq_example(x: int) -> int:
        return x

    try:
        with anyio.fail_after(5), pytest.raises(ConfigError, match=r"storage=.*RedisStorage"):
            await app.add_task("rabbitmq_example", 1, timeout=30)
        assert (await broker.stats()).ready_by_priority == {}  # refused before publishing
        record = await app.add_task("rabbitmq_example", 2)  # fire and forget is fine
        with anyio.fail_after(5), pytest.raises(ConfigError, match="in this process's memory"):
            await record.wait_result(timeout=30)
    finally:
        await app.aclose()


def test_the_sync_app_refuses_too(queue_name: str) -> None:
    """Refused before the app starts: nothing is declared on the server."""
    app = QueueTasks(broker=RabbitMQBroker(URL, queue=queue_name))

    @app.task
    def echo(x: int) -> int:
        return x

    try:
        with pytest.raises(ConfigError, match=r"no storage= was given"):
            echo.add_task(1, timeout=30)
    finally:
        app.close()


async def test_serving_here_works_and_warns_that_others_cannot_read_results(
    make_broker: BrokerFactory, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    await make_broker()
    app = AsyncQueueTasks(broker=RabbitMQBroker(URL, queue=queue_name))

    @app.task
    async def echo(x: int) -> int:
        return x

    with caplog.at_level(logging.WARNING, logger="qtasks"), anyio.fail_after(30):
        async with app:
            assert (await echo.add_task(3, timeout=20)).returning == 3
    warned = [r.getMessage() for r in caplog.records if "other processes cannot see" in r.message]
    assert len(warned) == 1 and "RabbitMQBroker" in warned[0]
