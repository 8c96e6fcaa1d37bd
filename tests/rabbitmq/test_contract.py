"""The RabbitMQ broker against the core's broker contract suites."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import AsyncExitStack

import pytest

from qtasks.components import DeliveryLimit, LeaseBatch, SharedServer, delivery_limit
from qtasks.config import QueueConfig
from qtasks.memory import MemoryStorage
from qtasks_rabbitmq import RabbitMQBroker, Topology
from qtasks_testing.contract import (
    BadInputContract,
    BrokerContract,
    BrokerFactory,
    BulkPublishContract,
    BuryNoticeContract,
    ConsumeHealthContract,
    RetryContract,
    StorageFactory,
)

from .conftest import URL, delete_topology


@pytest.fixture
def rabbitmq_broker_factory() -> Iterator[BrokerFactory]:
    made: list[Topology] = []

    def make(config: QueueConfig) -> RabbitMQBroker:
        broker = RabbitMQBroker(URL, queue=f"qtasks-contract-{uuid.uuid4().hex[:10]}")
        made.append(broker.topology)
        return broker

    yield make
    for topology in made:
        asyncio.run(delete_topology(topology))


class TestRabbitMQBroker(BrokerContract):
    priority_stats_unsupported = (
        "AMQP reports a queue's ready count, not its count by priority: all ready messages are "
        "reported under priority 0"
    )

    @pytest.fixture
    def broker_factory(self, rabbitmq_broker_factory: BrokerFactory) -> BrokerFactory:
        return rabbitmq_broker_factory


class TestRabbitMQBulkPublish(BulkPublishContract):
    @pytest.fixture
    def broker_factory(self, rabbitmq_broker_factory: BrokerFactory) -> BrokerFactory:
        return rabbitmq_broker_factory


class TestRabbitMQBuryNotice(BuryNoticeContract):
    @pytest.fixture
    def broker_factory(self, rabbitmq_broker_factory: BrokerFactory) -> BrokerFactory:
        return rabbitmq_broker_factory


def test_the_rabbitmq_broker_has_no_lease_batch_nor_shared_server() -> None:
    """Those suites do not apply (and are not run): RabbitMQBroker keeps leases in this
    process (renewing one costs no round trip) and RabbitMQ holds no task records, so it
    shares a server with no storage. Implement either, then wire its suite here."""
    broker = RabbitMQBroker(URL, queue="never-started")
    assert not isinstance(broker, LeaseBatch)
    assert not isinstance(broker, SharedServer)


@pytest.mark.anyio
async def test_the_rabbitmq_broker_s_delivery_limit_is_its_start_s_config(
    rabbitmq_broker_factory: BrokerFactory,
) -> None:
    """RabbitMQ has no ``max_deliveries=`` option of its own (DeliveryLimitContract's tests
    of one do not apply): its limit is the first start's ``config.max_deliveries``, the
    queue's ``x-delivery-limit``, and the core decides by it whatever its own config says."""
    config = QueueConfig(max_deliveries=3)
    broker = rabbitmq_broker_factory(config)
    async with AsyncExitStack() as stack:
        await broker.start(stack, config)
        assert isinstance(broker, DeliveryLimit)
        assert broker.max_deliveries == 3
        assert delivery_limit(broker, QueueConfig(max_deliveries=7)) == 3


class TestRabbitMQConsumeHealth(ConsumeHealthContract):
    @pytest.fixture
    def broker_factory(self, rabbitmq_broker_factory: BrokerFactory) -> BrokerFactory:
        return rabbitmq_broker_factory


class WithMemoryRecords:
    """RabbitMQ holds no task records: the worker's records are kept in memory here."""

    @pytest.fixture
    def broker_factory(self, rabbitmq_broker_factory: BrokerFactory) -> BrokerFactory:
        return rabbitmq_broker_factory

    @pytest.fixture
    def storage_factory(self) -> StorageFactory:
        return MemoryStorage.from_config


class TestRabbitMQBadInput(WithMemoryRecords, BadInputContract):
    """The bad bodies are published straight to the queue."""


class TestRabbitMQRetry(WithMemoryRecords, RetryContract):
    """Each retry waits out its backoff in RabbitMQ."""
