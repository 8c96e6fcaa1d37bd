"""The RabbitMQ broker against the core's broker contract suites."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from qtasks.components import LeaseBatch, SharedServer
from qtasks.config import QueueConfig
from qtasks_rabbitmq import RabbitMQBroker, Topology
from qtasks_testing.contract import (
    BrokerContract,
    BrokerFactory,
    BulkPublishContract,
    BuryNoticeContract,
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
