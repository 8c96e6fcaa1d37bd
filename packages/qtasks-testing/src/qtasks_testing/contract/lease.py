"""Contract suites of :class:`~qtasks.components.LeaseLength` and
:class:`~qtasks.components.DeliveryLimit`: a broker's own lease is the one its deliveries are
held by, and the one the worker renews them by; a broker's own delivery limit is the one it
dead-letters by, and the one the worker gives up by."""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any

import anyio
import pytest

from qtasks.app import AsyncQueueTasks
from qtasks.components import Broker, DeadLetter, DeliveryLimit, LeaseLength
from qtasks.config import QueueConfig
from qtasks.errors import ConfigError
from qtasks.memory import MemoryGlobalConfig
from qtasks.record import TaskStatus
from qtasks_testing.contract._base import ContractSuite, wait_until
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

    @pytest.mark.parametrize("bad", [0, -1.0, "5", math.inf, math.nan, True])
    def test_a_bad_own_lease_is_refused(
        self, leased_broker_factory: LeasedBrokerFactory, bad: Any
    ) -> None:
        """``lease=`` is checked as ``config.lease`` is, when the broker is built: a
        :class:`~qtasks.errors.ConfigError` naming it, not a lease of a millisecond or a
        failure at start."""
        self._leased(leased_broker_factory, self.own_lease)
        with pytest.raises(ConfigError, match="'lease'"):
            leased_broker_factory(bad)

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


LimitedBrokerFactory = Callable[[int], Broker]
"""Builds a broker whose own option (``max_deliveries=``) sets its delivery limit."""


class DeliveryLimitContract(ContractSuite):
    """The guarantees of :class:`qtasks.components.DeliveryLimit`, as tests.

    Provide ``broker_factory`` and ``storage_factory`` fixtures, as for the basic suites, and
    ``limited_broker_factory`` (a :data:`LimitedBrokerFactory`) for a broker with a
    ``max_deliveries`` option of its own (a broker without one names the tests that use it in
    ``not_applicable``). Every test is skipped when the broker is not a ``DeliveryLimit``."""

    own_limit = 2
    """The limit set on the broker alone; ``config.max_deliveries`` is another."""

    def _limited(self, factory: LimitedBrokerFactory, limit: int) -> Broker:
        broker = factory(limit)
        if not isinstance(broker, DeliveryLimit):
            pytest.skip(lacks(broker, DeliveryLimit))
        return broker

    @pytest.mark.parametrize("bad", [0, -1, "5", 2.5, math.inf, math.nan, True])
    def test_a_bad_own_limit_is_refused(
        self, limited_broker_factory: LimitedBrokerFactory, bad: Any
    ) -> None:
        """``max_deliveries=`` is checked as ``config.max_deliveries`` is, when the broker is
        built: a :class:`~qtasks.errors.ConfigError` naming it."""
        self._limited(limited_broker_factory, self.own_limit)
        with pytest.raises(ConfigError, match="'max_deliveries'"):
            limited_broker_factory(bad)

    @pytest.mark.anyio
    async def test_without_an_option_the_limit_is_the_configs(
        self, broker_factory: BrokerFactory, contract_config: QueueConfig
    ) -> None:
        broker = broker_factory(contract_config)
        if not isinstance(broker, DeliveryLimit):
            pytest.skip(lacks(broker, DeliveryLimit))
        async with AsyncExitStack() as stack:
            await broker.start(stack, contract_config)
            assert broker.max_deliveries == contract_config.max_deliveries

    @pytest.mark.anyio
    async def test_the_own_limit_is_told_and_dead_letters(
        self, limited_broker_factory: LimitedBrokerFactory, contract_config: QueueConfig
    ) -> None:
        """The option wins over ``config.max_deliveries``: ``max_deliveries`` says so, and the
        message is dead-lettered after that many deliveries whose lease ran out."""
        limit, lease = self.own_limit, contract_config.lease
        config = replace(contract_config, max_deliveries=limit + 3)
        broker = self._limited(limited_broker_factory, limit)
        async with AsyncExitStack() as stack:
            await broker.start(stack, config)
            assert isinstance(broker, DeliveryLimit) and broker.max_deliveries == limit
            sent = envelope()
            await broker.publish(sent)
            async with consuming(broker) as consumer:
                for attempt in range(1, limit + 1):
                    delivery = await consumer.next(timeout=lease * 2 + self.timing_slack)
                    assert delivery.attempt == attempt  # never settled: the lease runs out

                async def dead() -> list[DeadLetter]:
                    return [d for d in await broker.dead_letters() if d.id == sent.id]

                await wait_until(dead, timeout=lease * 2 + self.timing_slack, what="dead letter")
                assert await consumer.none_within(0.2) is None

    @pytest.mark.anyio
    async def test_the_worker_gives_up_at_the_brokers_limit(
        self,
        limited_broker_factory: LimitedBrokerFactory,
        storage_factory: StorageFactory,
        contract_config: QueueConfig,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Only the broker's ``max_deliveries=`` is set (``config.max_deliveries`` keeps its
        default): a component that fails on every delivery (the global config, here) has the
        message dead-lettered at the broker's limit, and its record says so (before, the
        worker counted to the config's)."""
        limit = self.own_limit
        config = replace(
            contract_config,
            max_deliveries=QueueConfig().max_deliveries,
            retry_backoff=0.02,
            retry_backoff_max=0.05,
        )
        broker = self._limited(limited_broker_factory, limit)

        class Failing(MemoryGlobalConfig):
            async def acquire_slot(self, *args: Any, **kwargs: Any) -> float:
                raise RuntimeError("global config bug")

        app = AsyncQueueTasks(
            f"contract-limit-{uuid.uuid4().hex[:8]}",
            broker=broker,
            storage=storage_factory(config),
            global_config=Failing(),
            config=config,
        )

        @app.task(max_concurrency=1, concurrency_key=lambda: "all")
        async def never() -> None:
            pytest.fail("ran although its admission failed")

        with caplog.at_level(logging.WARNING, logger="qtasks"):
            async with app:
                sent = await app.add_task("never")
                done = await app.wait(sent.uuid, timeout=10)

                async def dead() -> list[DeadLetter]:  # made after the record says so
                    return [d for d in await broker.dead_letters() if d.id == sent.uuid]

                letters = await wait_until(dead, timeout=5, what="the dead letter")
        assert done.status is TaskStatus.ERROR
        assert done.error is not None
        assert done.error.startswith(f"worker failed {limit} times: "), done.error
        assert [d.reason for d in letters] == [done.error]
        warned = [r.getMessage() for r in caplog.records if "delivery limit" in r.getMessage()]
        assert warned == []
