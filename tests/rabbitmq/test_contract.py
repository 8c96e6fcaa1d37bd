"""The RabbitMQ broker against the core's broker contract suites."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from qtasks.config import QueueConfig
from qtasks.memory import MemoryStorage
from qtasks_rabbitmq import RabbitMQBroker, Topology
from qtasks_testing.contract import (
    BrokerContract,
    BrokerFactory,
    LeaseBatchContract,
    SharedServerContract,
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


class TestRabbitMQLeaseBatch(LeaseBatchContract):
    """Skipped, with the reason shown: RabbitMQBroker has no ``extend_many`` (its consumer
    keeps the leases in this process, so renewing one costs no round trip)."""

    @pytest.fixture
    def broker_factory(self, rabbitmq_broker_factory: BrokerFactory) -> BrokerFactory:
        return rabbitmq_broker_factory


class TestRabbitMQSharedServer(SharedServerContract):
    """Skipped, with the reason shown: RabbitMQ holds no task records, so the broker shares
    a server with no storage."""

    @pytest.fixture
    def broker_factory(self, rabbitmq_broker_factory: BrokerFactory) -> BrokerFactory:
        return rabbitmq_broker_factory

    @pytest.fixture
    def storage_factory(self) -> StorageFactory:
        return MemoryStorage.from_config
