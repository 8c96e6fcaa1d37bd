"""The RabbitMQ broker against the core's broker contract suite."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from qtasks.config import QueueConfig
from qtasks_rabbitmq import RabbitMQBroker, Topology
from qtasks_testing.contract import BrokerContract, BrokerFactory

from .conftest import URL, delete_topology


class TestRabbitMQBroker(BrokerContract):
    priority_stats_unsupported = (
        "AMQP reports a queue's ready count, not its count by priority: all ready messages are "
        "reported under priority 0"
    )

    @pytest.fixture
    def broker_factory(self) -> Iterator[BrokerFactory]:
        made: list[Topology] = []

        def make(config: QueueConfig) -> RabbitMQBroker:
            broker = RabbitMQBroker(URL, queue=f"qtasks-contract-{uuid.uuid4().hex[:10]}")
            made.append(broker.topology)
            return broker

        yield make
        for topology in made:
            asyncio.run(delete_topology(topology))
