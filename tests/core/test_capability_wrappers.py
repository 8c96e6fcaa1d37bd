"""A component wrapped by a delegating wrapper (a class with ``__getattr__`` forwarding to it,
as instrumentation wrappers are written) keeps the capabilities of what it wraps, on every
Python version (:func:`qtasks.components.provides`). Since Python 3.12 ``isinstance`` against
a runtime-checkable protocol looks members up statically and does not see forwarded ones: the
core then took the plain path for such a wrapper, or refused it. The app tests count the calls
to the wrapped component's capability methods, so the capability path is the one that ran."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import pytest

from qtasks import AsyncQueueTasks, MemoryBroker, MemoryGlobalConfig, MemoryStorage, QueueConfig
from qtasks.app import _cancels_from
from qtasks.bulk import _takes_after
from qtasks.components import (
    BulkPublishNew,
    BuryNotice,
    DeliveryLimit,
    LeaseLength,
    delivery_lease,
    delivery_limit,
    provides,
    takes_keyword,
)
from qtasks.flow import _wakes
from qtasks.record import TaskStatus
from qtasks.workflows import chain

pytestmark = pytest.mark.anyio


class Forwarding:
    """A plain delegating wrapper: its class defines no member of any component, every
    attribute is read from the component it wraps."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def wrapper_class() -> type[Forwarding]:
    """A new wrapper class, so no answer kept for an earlier one (by any test) counts."""

    class Wrapper(Forwarding):
        pass

    return Wrapper


def _counted(calls: Counter[str], name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)  # its signature stays readable (see components.takes_keyword)
    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        return method(*args, **kwargs)

    return counted


def counting(component: object, *names: str) -> Counter[str]:
    """The calls to ``component``'s methods ``names``, counted as they come (each replaced on
    the instance: its class, and so what it provides, is unchanged)."""
    calls: Counter[str] = Counter()
    for name in names:
        setattr(component, name, _counted(calls, name, getattr(component, name)))
    return calls


def app_with(**components: Any) -> AsyncQueueTasks:
    app = AsyncQueueTasks(
        "wrapped", config=QueueConfig(max_tasks_process=2, plugins_disabled=["*"]), **components
    )

    @app.task
    async def double(i: int) -> int:
        return 2 * i

    @app.task(max_concurrency=1, concurrency_key="key")
    async def one_at_a_time(i: int, key: str = "k") -> int:
        return i

    return app


async def test_a_wrapped_broker_shares_its_server_and_begins_records_with_its_claims() -> None:
    """The in-memory broker wrapped: the app enqueues through its shared server (record and
    message in one call, also in bulk), and the worker claims with :class:`BeginOnClaim` and
    settles through the shared server, as with the broker itself."""
    broker = MemoryBroker()
    calls = counting(broker, "publish_new", "publish_new_many", "consume_begun", "ack_finals")
    app = app_with(broker=Forwarding(broker))
    async with app:
        done = await app.add_task("double", 1, timeout=5)
        batch = await app.add_tasks([app.tasks["double"].s(i) for i in range(3)])
        finals = [await t.wait_result(5) for t in batch]
        assert app.enqueue_path == "shared"
    assert done.returning == 2 and [t.returning for t in finals] == [0, 2, 4]
    assert calls["consume_begun"] == 1 and calls["publish_new_many"] == 1
    assert calls["publish_new"] >= 1 and calls["ack_finals"] >= 1


async def test_a_wrapped_broker_keeps_its_own_lease_and_delivery_limit() -> None:
    """What the worker renews by and dead-letters by is the wrapped broker's, not the
    configuration's."""
    config = QueueConfig(lease=30.0, max_deliveries=5)
    wrapped = Forwarding(MemoryBroker(lease=12.0, max_deliveries=7))
    assert (delivery_lease(wrapped, config), delivery_limit(wrapped, config)) == (12.0, 7)


async def test_a_wrapped_storage_cancels_adds_in_bulk_and_keeps_workflows() -> None:
    """The in-memory storage wrapped (the broker then shares no server with it): a cancel
    goes through :class:`CancelFrom`, a bulk add through :class:`BulkAdd`, the worker
    follows cancels (:class:`CancelFeed`), and workflows run (:class:`WorkflowStore`: without
    it ``run_workflow`` refuses the storage)."""
    storage = MemoryStorage()
    calls = counting(storage, "cancel", "cancel_from", "add_many", "follow_cancels", "add_workflow")
    app = app_with(storage=Forwarding(storage))
    queued = await app.add_task("double", 1)  # no worker yet: it stays queued
    cancelled = await app.cancel(queued.uuid)
    assert cancelled is not None and cancelled.status is TaskStatus.CANCEL
    assert (calls["cancel_from"], calls["cancel"]) == (1, 0)  # its cancel calls cancel_from
    await app.aclose()
    async with app:
        batch = await app.add_tasks([app.tasks["double"].s(i) for i in range(3)])
        finals = [await t.wait_result(5) for t in batch]
        assert calls["add_many"] == 1
        flow = await app.run_workflow(
            chain(app.tasks["double"].s(1), app.tasks["double"].s(), app.tasks["double"].s())
        )
        ended = await app.wait_workflow(flow.id, 5)
    assert [t.returning for t in finals] == [0, 2, 4] and ended.result == 8
    assert calls["follow_cancels"] == 1 and calls["add_workflow"] == 1


async def test_a_wrapped_global_config_ends_heartbeats_and_wakes_slot_waiters() -> None:
    """The in-memory global config wrapped: a worker that stops removes its heartbeat
    (:class:`HeartbeatEnd`), and a freed concurrency slot wakes the next waiter
    (:class:`SlotWake`) rather than leaving it to come back at its own time."""
    gc = MemoryGlobalConfig()
    calls = counting(gc, "end_heartbeat", "release_slot_waking", "release_slot")
    app = app_with(global_config=Forwarding(gc))
    async with app:
        done = [await app.add_task("one_at_a_time", i, timeout=5) for i in range(3)]
    assert [t.returning for t in done] == [0, 1, 2]
    assert calls["end_heartbeat"] == 1
    assert calls["release_slot_waking"] == 3 and calls["release_slot"] == 0


class NoLimits:
    """A component with none of the capabilities tested here."""

    async def publish(self, envelope: object) -> None: ...


class NoneMember:
    """A component whose ``consume_noticing`` (a method of :class:`BuryNotice`) is ``None``:
    Python 3.11's ``isinstance`` said it is no BuryNotice."""

    consume_noticing = None


def test_a_wrapper_answers_for_what_each_of_its_instances_wraps() -> None:
    """One wrapper class around a component with the capability and around one without:
    each instance answers for its own (in either order, so no answer is kept per class), and
    a wrapper around a component without a member does not provide it."""
    config = QueueConfig(lease=30.0, max_deliveries=5)
    for has_first in (True, False):
        wrap = wrapper_class()
        with_it, without = wrap(MemoryBroker(lease=12.0, max_deliveries=7)), wrap(NoLimits())
        pairs = [(with_it, True), (without, False)]
        for component, has in pairs if has_first else pairs[::-1]:
            assert provides(component, DeliveryLimit) is has
            assert provides(component, LeaseLength) is has
            assert delivery_limit(component, config) == (7 if has else 5)
            assert delivery_lease(component, config) == (12.0 if has else 30.0)
    assert not provides(wrapper_class()(NoneMember()), BuryNotice)
    assert provides(wrapper_class()(MemoryBroker()), BuryNotice)


def test_a_wrapper_class_keeps_no_answer_of_the_paths_chosen_by_capability() -> None:
    """``app.cancel`` through ``cancel_from`` and a freed slot waking its next waiter are
    decided once per class, but not for a wrapper class: each instance answers for what it
    wraps."""
    broker = MemoryBroker()
    for has_first in (True, False):
        wrap = wrapper_class()
        pairs = [
            (wrap(MemoryStorage()), wrap(MemoryGlobalConfig()), True),
            (wrap(NoLimits()), wrap(NoLimits()), False),
        ]
        for storage, gc, has in pairs if has_first else pairs[::-1]:
            assert _cancels_from(storage) is has
            assert _wakes(gc, broker) is has


class Older:
    """Methods written before ``wanted`` and ``after`` were added to them."""

    def consume(self, *, prefetch: int) -> None: ...

    async def publish_new_many(self, storage: object, tasks: object) -> None: ...


class Newer:
    """The same methods, taking the keywords added since."""

    def consume(self, *, prefetch: int, wanted: object = None) -> None: ...

    async def publish_new_many(
        self, storage: object, tasks: object, *, after: object = None
    ) -> None: ...


def test_a_wrapper_class_keeps_no_answer_of_which_keywords_a_method_takes() -> None:
    """Whether a method takes a keyword added to the protocol since is read once per class,
    but not for a wrapper class: one wrapper class around an older and a newer component
    calls each as it can be called (in either order)."""
    for newer_first in (True, False):
        wrap = wrapper_class()
        pairs = [(wrap(Newer()), True), (wrap(Older()), False)]
        for component, takes in pairs if newer_first else pairs[::-1]:
            assert takes_keyword(component, "consume", "wanted") is takes
            assert _takes_after(cast(BulkPublishNew, component)) is takes


def test_components_without_getattr_answer_as_isinstance() -> None:
    for component in (MemoryBroker(), MemoryStorage(), NoLimits(), NoneMember()):
        for capability in (DeliveryLimit, LeaseLength, BuryNotice):
            assert provides(component, capability) is isinstance(component, capability)
