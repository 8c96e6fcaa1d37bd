"""Contract suite of :class:`~qtasks.components.LeaseLength`: a broker's own lease is the one
its deliveries are held by, and the one the worker renews them by."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import replace

import anyio
import pytest

from qtasks.app import AsyncQueueTasks
from qtasks.components import Broker, LeaseLength
from qtasks.config import QueueConfig
from qtasks.record import TaskStatus
from qtasks_testing.contract._base import ContractSuite
from qtasks_testing.contract.broker import BrokerFactory, consuming, envelope
from qtasks_testing.contract.capabilities import lacks
from qtasks_testing.contract.storage import StorageFactory

LeasedBrokerFactory = Callable[[float], Broker]
"""Builds a broker whose own option (``lease=``) sets its lease to the given seconds."""


class LeaseLengthContract(ContractSuite):
    """The guarantees of :class:`qtasks.components.LeaseLength`, as tests.

    Provide ``broker_factory`` and ``storage_factory`` fixtures, as for the basic suites, and
    ``leased_broker_factory`` (a :data:`LeasedBrokerFactory`) for a broker with a lease option
    of its own (a broker without one names the tests that use it in ``not_applicable``). Every
    test is skipped when the broker is not a ``LeaseLength``."""

    own_lease = 0.5
    """The lease set on the broker alone; the tests take three times as long."""

    def _leased(self, factory: LeasedBrokerFactory, lease: float) -> Broker:
        broker = factory(lease)
        if not isinstance(broker, LeaseLength):
            pytest.skip(lacks(broker, LeaseLength))
        return broker

    @staticmethod
    def _lease_of(broker: Broker) -> float:
        assert isinstance(broker, LeaseLength)
        return broker.lease

    @pytest.mark.anyio
    async def test_without_an_option_the_lease_is_the_configs(
        self, broker_factory: BrokerFactory, contract_config: QueueConfig
    ) -> None:
        broker = broker_factory(contract_config)
        if not isinstance(broker, LeaseLength):
            pytest.skip(lacks(broker, LeaseLength))
        async with AsyncExitStack() as stack:
            await broker.start(stack, contract_config)
            assert broker.lease == pytest.approx(contract_config.lease)

    @pytest.mark.anyio
    async def test_the_own_lease_is_told_and_holds_a_delivery(
        self, leased_broker_factory: LeasedBrokerFactory, contract_config: QueueConfig
    ) -> None:
        """The option wins over ``config.lease``: ``lease`` says so, and a delivery not
        renewed comes back after it, long before ``config.lease``."""
        lease = self.own_lease
        config = replace(contract_config, lease=lease * 20)
        broker = self._leased(leased_broker_factory, lease)
        async with AsyncExitStack() as stack:
            await broker.start(stack, config)
            assert self._lease_of(broker) == pytest.approx(lease)
            sent = envelope()
            await broker.publish(sent)
            async with consuming(broker) as consumer:
                first = await consumer.next(timeout=2)
                again = await consumer.next(timeout=lease * 2 + self.timing_slack)
                assert again.id == first.id == sent.id
                assert await again.ack() is True

    @pytest.mark.anyio
    async def test_a_task_three_leases_long_runs_once(
        self,
        leased_broker_factory: LeasedBrokerFactory,
        storage_factory: StorageFactory,
        contract_config: QueueConfig,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Only the broker's ``lease=`` is set (``config.lease`` keeps its default): the worker
        renews by it, so the task is not delivered again while it runs, and succeeds."""
        lease = self.own_lease
        config = replace(contract_config, lease=QueueConfig().lease)
        broker = self._leased(leased_broker_factory, lease)
        app = AsyncQueueTasks(
            f"contract-lease-{uuid.uuid4().hex[:8]}",
            broker=broker,
            storage=storage_factory(config),
            config=config,
        )
        runs: list[int] = []

        @app.task
        async def long() -> str:
            runs.append(1)
            await anyio.sleep(lease * 3)
            return "done"

        with caplog.at_level(logging.WARNING, logger="qtasks"):
            async with app:
                done = await app.add_task("long", timeout=lease * 3 + 10)
        assert (done.status, done.returning, done.attempt) == (TaskStatus.SUCCESS, "done", 1)
        assert runs == [1]
        warned = [r.getMessage() for r in caplog.records if "lease" in r.getMessage()]
        assert warned == []
