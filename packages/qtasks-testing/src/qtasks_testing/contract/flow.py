"""The contract suites of flow control: :class:`FlowControlContract` (the optional
global-config capability :class:`~qtasks.components.FlowControl`, with
:class:`~qtasks.components.RateRelease` and :class:`~qtasks.components.SlotWake`) and
:class:`BringForwardContract` (the broker capability :class:`~qtasks.components.BringForward`)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import cast

import anyio
import pytest

from qtasks.components import (
    BringForward,
    Broker,
    FlowControl,
    RateRelease,
    SlotRenewal,
    SlotWake,
)
from qtasks.config import QueueConfig
from qtasks_testing.contract._base import ContractSuite
from qtasks_testing.contract.broker import consuming, envelope
from qtasks_testing.contract.capabilities import _BrokerCapability, lacks
from qtasks_testing.contract.global_config import GlobalConfigFactory


class FlowControlContract(ContractSuite):
    """The guarantees of :class:`~qtasks.components.FlowControl`, as tests.

    Provide a ``global_config_factory`` fixture, as for
    :class:`~qtasks_testing.contract.GlobalConfigContract`. A global config without the
    capability has every test skipped with the reason. Each test uses keys of its own.
    """

    @pytest.fixture
    async def flow(
        self, global_config_factory: GlobalConfigFactory, contract_config: QueueConfig
    ) -> AsyncIterator[FlowControl]:
        component = global_config_factory(contract_config)
        if not isinstance(component, FlowControl):
            pytest.skip(lacks(component, FlowControl))
        async with AsyncExitStack() as stack:
            await component.start(stack, contract_config)
            yield component

    @pytest.fixture
    def key(self) -> str:
        return uuid.uuid4().hex

    @pytest.mark.anyio
    async def test_rate_allows_the_burst_then_reserves_one_interval_apart(
        self, flow: FlowControl, key: str
    ) -> None:
        rate = f"rate:{key}"
        assert [await flow.reserve_rate(rate, 10.0, 3, None) for _ in range(3)] == [0, 0, 0]
        assert await flow.reserve_rate(rate, 10.0, 3, None) == pytest.approx(10, abs=0.5)
        assert await flow.reserve_rate(rate, 10.0, 3, None) == pytest.approx(20, abs=0.5)
        state = (await flow.flow_state())[rate]
        assert (state["tokens"], state["burst"], state["waiting"]) == (0, 3, 2)
        assert state["per_second"] == pytest.approx(0.1)
        # Another key has a rate of its own.
        assert await flow.reserve_rate(f"rate:{key}:other", 10.0, 1, None) == 0

    @pytest.mark.anyio
    async def test_rate_past_max_wait_reserves_nothing(self, flow: FlowControl, key: str) -> None:
        rate = f"rate:{key}"
        assert await flow.reserve_rate(rate, 10.0, 1, 1.0) == 0
        assert await flow.reserve_rate(rate, 10.0, 1, 1.0) is None
        assert await flow.reserve_rate(rate, 10.0, 1, 60.0) == pytest.approx(10, abs=0.5)

    @pytest.mark.anyio
    async def test_a_changed_interval_rescales_the_reserved_backlog(
        self, flow: FlowControl, key: str
    ) -> None:
        # A redeploy with a higher rate: the 40 s reserved at one call per 10 s are 4 s at one
        # call per second (not 40 s of waiting before the new rate applies), and so back.
        rate = f"rate:{key}"
        waits = [await flow.reserve_rate(rate, 10.0, 1, None) for _ in range(4)]
        assert waits == [0, pytest.approx(10, abs=0.5), pytest.approx(20, abs=0.5),
                         pytest.approx(30, abs=0.5)]  # fmt: skip
        assert await flow.reserve_rate(rate, 1.0, 1, None) == pytest.approx(4, abs=0.5)
        assert await flow.reserve_rate(rate, 1.0, 1, None) == pytest.approx(5, abs=0.5)
        assert await flow.reserve_rate(rate, 10.0, 1, None) == pytest.approx(60, abs=1)

    @pytest.mark.anyio
    async def test_a_reservation_given_back_moves_the_next_one_earlier(
        self, flow: FlowControl, key: str
    ) -> None:
        if not isinstance(flow, RateRelease):
            pytest.skip(lacks(flow, RateRelease))
        rate = f"rate:{key}"
        assert await flow.release_rate(rate) is False  # nothing reserved
        assert await flow.reserve_rate(rate, 10.0, 1, None) == 0
        assert await flow.reserve_rate(rate, 10.0, 1, None) == pytest.approx(10, abs=0.5)
        assert await flow.reserve_rate(rate, 10.0, 1, None) == pytest.approx(20, abs=0.5)
        assert await flow.release_rate(rate) is True
        assert await flow.reserve_rate(rate, 10.0, 1, None) == pytest.approx(20, abs=0.5)
        assert [await flow.release_rate(rate) for _ in range(4)] == [True, True, True, False]
        assert await flow.reserve_rate(rate, 10.0, 1, None) == 0  # never earlier than now

    @pytest.mark.anyio
    async def test_slots_up_to_the_limit_then_a_bounded_wait(
        self, flow: FlowControl, key: str
    ) -> None:
        slots = f"slots:t:{key}"
        assert await flow.acquire_slot(slots, 2, "a", 5) == 0
        assert await flow.acquire_slot(slots, 2, "b", 5) == 0
        assert await flow.acquire_slot(slots, 2, "a", 5) == 0  # held already: renewed
        wait = await flow.acquire_slot(slots, 2, "c", 5)
        assert 0 < wait <= 5
        assert (await flow.flow_state())[slots] == {"held": 2, "limit": 2, "waiting": 1}
        await flow.release_slot(slots, "a")
        await flow.release_slot(slots, "nobody")
        assert await flow.acquire_slot(slots, 2, "c", 5) == 0
        assert (await flow.flow_state())[slots] == {"held": 2, "limit": 2, "waiting": 0}

    @pytest.mark.anyio
    async def test_holders_are_deliveries_and_a_waiter_counts_once(
        self, flow: FlowControl, key: str
    ) -> None:
        # The core's holder is one delivery (uuid/token), its waiter the task (uuid).
        slots = f"slots:t:{key}"
        assert await flow.acquire_slot(slots, 1, "a/1", 5, waiter="a") == 0
        # A second delivery of the same task is another holder: it waits, not re-enters.
        assert await flow.acquire_slot(slots, 1, "a/2", 5, waiter="a") > 0
        # One task waiting through two deliveries is one waiter, not one ahead of itself.
        first = await flow.acquire_slot(slots, 1, "b/1", 5, waiter="b")
        again = await flow.acquire_slot(slots, 1, "b/2", 5, waiter="b")
        assert again == pytest.approx(first, abs=0.05)
        assert (await flow.flow_state())[slots] == {"held": 1, "limit": 1, "waiting": 2}
        # A stale delivery's release or renewal never touches another delivery's slot.
        await flow.release_slot(slots, "a/2")
        assert await flow.extend_slots([(slots, "a/2"), (slots, "a/1")], 5) == [False, True]
        assert (await flow.flow_state())[slots]["held"] == 1
        await flow.release_slot(slots, "a/1")
        assert await flow.acquire_slot(slots, 1, "b/3", 5, waiter="b") == 0  # b waits no more
        assert (await flow.flow_state())[slots] == {"held": 1, "limit": 1, "waiting": 1}

    @pytest.mark.anyio
    async def test_waiters_come_back_one_round_after_another_not_as_a_herd(
        self, flow: FlowControl, key: str
    ) -> None:
        slots = f"slots:t:{key}"
        assert await flow.acquire_slot(slots, 2, "a", 30) == 0
        assert await flow.acquire_slot(slots, 2, "b", 30) == 0
        waits = [await flow.acquire_slot(slots, 2, f"w{i}", 30) for i in range(6)]
        # Two waiters a round, each round one mean hold time later.
        assert waits[0] == pytest.approx(waits[1], abs=0.02)
        assert waits[2] == pytest.approx(2 * waits[0], abs=0.02)
        assert waits[4] == pytest.approx(3 * waits[0], abs=0.02)
        # The first waiter back, still without a slot, is first again: only the waiters due
        # before it are ahead of it, not every waiter (which sent them all back together).
        assert await flow.acquire_slot(slots, 2, "w0", 30) == pytest.approx(waits[0], abs=0.02)
        assert await flow.acquire_slot(slots, 2, "w5", 30) == pytest.approx(waits[5], abs=0.02)
        # A newcomer queues behind every waiter.
        assert await flow.acquire_slot(slots, 2, "new", 30) == pytest.approx(4 * waits[0], abs=0.02)

    @pytest.mark.anyio
    async def test_a_released_slot_wakes_the_next_waiter_once(
        self, flow: FlowControl, key: str
    ) -> None:
        if not isinstance(flow, SlotWake):
            pytest.skip(lacks(flow, SlotWake))
        slots = f"slots:t:{key}"
        assert await flow.acquire_slot(slots, 1, "a", 30) == 0
        assert await flow.acquire_slot(slots, 1, "w1/1", 30, waiter="w1") > 0
        assert await flow.acquire_slot(slots, 1, "w2/1", 30, waiter="w2") > 0
        assert await flow.release_slot_waking(slots, "nobody") is None  # held nothing
        assert await flow.release_slot_waking(slots, "a") == "w1"
        # A newcomer took the slot before w1 came back: the next release wakes w2, as w1 was
        # woken already (two releases, two waiters brought forward).
        assert await flow.acquire_slot(slots, 1, "b", 30) == 0
        assert await flow.release_slot_waking(slots, "b") == "w2"
        assert await flow.acquire_slot(slots, 1, "w1/2", 30, waiter="w1") == 0
        assert await flow.release_slot_waking(slots, "w1/2") is None  # w2 is due already
        assert (await flow.flow_state())[slots] == {"held": 0, "limit": 1, "waiting": 1}

    @pytest.mark.anyio
    async def test_a_slot_frees_when_its_lease_runs_out_unless_extended(
        self, flow: FlowControl, key: str
    ) -> None:
        slots = f"slots:t:{key}"
        assert await flow.acquire_slot(slots, 2, "kept", 0.3) == 0
        assert await flow.acquire_slot(slots, 2, "dropped", 0.3) == 0
        assert 0 < await flow.acquire_slot(slots, 2, "waiter", 0.3) <= 0.3
        await anyio.sleep(0.2)
        assert await flow.extend_slots([(slots, "kept"), (slots, "nobody")], 5) == [True, False]
        await anyio.sleep(0.2)  # past the first lease: "dropped" was not renewed
        assert await flow.extend_slots([(slots, "dropped")], 5) == [False]
        assert await flow.acquire_slot(slots, 2, "waiter", 5) == 0
        assert 0 < await flow.acquire_slot(slots, 2, "late", 5) <= 5
        assert await flow.extend_slots([], 5) == []

    @pytest.mark.anyio
    async def test_a_slot_no_longer_held_is_taken_back_under_its_holder(
        self, flow: FlowControl, key: str
    ) -> None:
        # The global config lost the slot (a restart, a failover: here released) while its
        # run goes on; renewed with its limit, it is taken back, past the limit if another
        # holder took it meanwhile, and no newcomer enters until the key is below its limit.
        slots = f"slots:t:{key}"
        assert await flow.acquire_slot(slots, 1, "a/1", 30, waiter="a") == 0
        await flow.release_slot(slots, "a/1")
        assert await flow.extend_slots([(slots, "a/1")], 30, limits=[1]) == [SlotRenewal.TAKEN_BACK]
        assert await flow.extend_slots([(slots, "a/1")], 30, limits=[1]) == [SlotRenewal.RENEWED]
        await flow.release_slot(slots, "a/1")
        assert await flow.extend_slots([(slots, "a/1")], 30) == [SlotRenewal.LOST]  # no limit
        assert await flow.acquire_slot(slots, 1, "b/1", 30, waiter="b") == 0
        assert await flow.extend_slots([(slots, "a/1"), (slots, "b/1")], 30, limits=[1, 1]) == [
            SlotRenewal.OVER_LIMIT,
            SlotRenewal.OVER_LIMIT,
        ]
        assert (await flow.flow_state())[slots]["held"] == 2
        await flow.release_slot(slots, "b/1")
        assert await flow.acquire_slot(slots, 1, "c/1", 30, waiter="c") > 0  # a still runs
        assert await flow.extend_slots([(slots, "a/1")], 30, limits=[1]) == [SlotRenewal.RENEWED]
        await flow.release_slot(slots, "a/1")
        assert await flow.acquire_slot(slots, 1, "c/2", 30, waiter="c") == 0

    @pytest.mark.anyio
    async def test_a_slot_whose_lease_ran_out_is_taken_back(
        self, flow: FlowControl, key: str
    ) -> None:
        slots = f"slots:t:{key}"
        assert await flow.acquire_slot(slots, 2, "a", 0.2) == 0
        assert await flow.acquire_slot(slots, 2, "b", 0.2) == 0
        await anyio.sleep(0.3)  # past both leases: the global config did not hear from them
        assert await flow.extend_slots([(slots, "a")], 5, limits=[2]) == [SlotRenewal.TAKEN_BACK]
        assert (await flow.flow_state())[slots]["held"] == 1  # "b" ran out and stays out
        assert await flow.acquire_slot(slots, 2, "c", 5) == 0
        assert await flow.acquire_slot(slots, 2, "d", 5) > 0

    @pytest.mark.anyio
    async def test_unique_keys_compare_and_set(self, flow: FlowControl, key: str) -> None:
        unique = f"unique:{key}"
        assert await flow.claim_unique(unique, "h1", None) is None
        assert await flow.claim_unique(unique, "h2", None) == "h1"
        assert await flow.claim_unique(unique, "h2", None, replace="other") == "h1"
        assert await flow.claim_unique(unique, "h2", None, replace="h1") is None
        assert await flow.release_unique(unique, "h1") is False
        assert await flow.release_unique(unique, "h2") is True
        assert await flow.claim_unique(unique, "h3", 0.2) is None
        assert await flow.claim_unique(unique, "h4", None) == "h3"
        await anyio.sleep(0.3)  # the key's TTL
        assert await flow.claim_unique(unique, "h4", None) is None


class BringForwardContract(_BrokerCapability):
    """The guarantees of :class:`qtasks.components.BringForward`, as tests.

    Provide a ``broker_factory`` fixture, as for :class:`~qtasks_testing.contract.BrokerContract`.
    Every test is skipped when the broker is not a ``BringForward``."""

    capability = BringForward

    @pytest.mark.anyio
    async def test_a_delayed_message_brought_forward_is_delivered_now_and_once(
        self, broker: Broker
    ) -> None:
        bring = cast(BringForward, broker).bring_forward
        held = envelope(eta=time.time() + 60)
        ready = envelope()
        await broker.publish(held)
        await broker.publish(ready)
        assert await bring("never-published") is False
        assert await bring(ready.id) is False  # not delayed
        async with consuming(broker) as consumer:
            first = await consumer.next(timeout=2)
            assert first.id == ready.id
            assert await bring(held.id) is True
            woken = await consumer.next(timeout=2, what="the message brought forward")
            assert (woken.id, woken.body, woken.attempt) == (held.id, held.body, 1)
            assert await bring(held.id) is False  # in flight
            assert await woken.ack() is True
            assert await first.ack() is True
            assert await consumer.none_within(0.5) is None  # delivered once
