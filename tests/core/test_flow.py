"""Flow control on the in-memory components (one process): expiry, rate limits, concurrency
keys, unique tasks, and the errors of bad options."""

from __future__ import annotations

import importlib
import itertools
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
from flow_backlog import (
    a_backlog_keeps_every_slot_busy,
    a_burst_is_not_starved_by_steady_traffic,
    a_freed_slot_goes_to_a_waiter_at_once,
)
from flow_windows import max_in_window, max_overlap
from typer.testing import CliRunner

from qtasks import AsyncQueueTasks, MemoryBroker, QueueConfig, QueueTasks, TaskStatus, hookimpl
from qtasks.cli import cli
from qtasks.components import FlowControl
from qtasks.errors import ConfigError, QTasksError, TaskArgumentsError, TaskDeclarationError
from qtasks.flow import Rate, parse_rate
from qtasks.memory import MemoryGlobalConfig
from qtasks.messages import Message
from qtasks.record import TaskRecord

pytestmark = pytest.mark.anyio


class Expired:
    def __init__(self) -> None:
        self.records: list[Any] = []

    @hookimpl
    def qtasks_task_expired(self, record: Any) -> None:
        self.records.append(record)


# --- declaration and bad input ----------------------------------------------------------------


def test_rates_parse() -> None:
    assert parse_rate("100/s") == Rate(100, 1.0)
    assert parse_rate("30/m") == Rate(30, 60.0)
    assert parse_rate(" 500 / h ") == Rate(500, 3600.0)
    assert parse_rate("10/5s").interval == 0.5


@pytest.mark.parametrize("bad", ["100", "100/d", "0/s", "-1/s", "x/s", "100/0s", "", "1/s/s"])
def test_bad_rate_strings_are_refused_at_declaration(bad: str) -> None:
    app = AsyncQueueTasks("t")
    with pytest.raises(TaskDeclarationError, match="rate_limit"):

        @app.task(rate_limit=bad)
        def f() -> None: ...


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("10/.s", "expected '<count>/<unit>'"),  # not "could not convert string to float"
        ("2000000/s", "at most 1,000,000 calls a second"),  # Redis would round it to no limit
        ("1000001/s", "at most 1,000,000 calls a second"),
        # Celery's fractional counts: the whole-count form that means the same is named.
        ("0.5/s", "write '1/2s' instead"),
        ("0.25/m", "write '1/4m' instead"),
        (".2/10s", "write '1/50s' instead"),
    ],
)
def test_rate_strings_refused_with_a_message_that_says_why(bad: str, match: str) -> None:
    app = AsyncQueueTasks("t")
    with pytest.raises(TaskDeclarationError, match=match):

        @app.task(rate_limit=bad)
        def f() -> None: ...

    assert parse_rate("1000000/s").interval == 1e-6  # the most a rate may be


async def test_inspect_reports_the_rest_when_the_flow_figures_fail() -> None:
    class Broken(MemoryGlobalConfig):
        async def flow_state(self) -> dict[str, dict[str, float]]:
            raise RuntimeError("Cannot serialise number")

    app = AsyncQueueTasks("t", global_config=Broken())
    async with app:
        report = await app.inspect()
    assert "flow" not in report
    assert report["flow_error"] == "RuntimeError: Cannot serialise number"
    assert report["records_by_status"] == {}


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"rate_limit": 5}, "rate_limit"),
        ({"rate_burst": 3}, "rate_burst needs rate_limit"),
        ({"rate_limit": "1/s", "rate_burst": 0}, "rate_burst expects an int >= 1"),
        ({"max_concurrency": 2}, "needs concurrency_key"),
        ({"concurrency_key": "x"}, "needs max_concurrency"),
        ({"concurrency_key": 3, "max_concurrency": 1}, "kwarg name or a callable"),
        ({"concurrency_key": "x", "max_concurrency": 0}, "int >= 1"),
        ({"concurrency_key": "nope", "max_concurrency": 1}, "'nope' is not a parameter"),
        ({"expires": -1}, "expires expects seconds > 0"),
        ({"expires": 0}, "expires expects seconds > 0"),
        ({"unique_key": "k"}, "unique_key expects a callable"),
    ],
)
def test_bad_flow_options_are_refused_at_declaration(options: dict[str, Any], match: str) -> None:
    app = AsyncQueueTasks("t")
    with pytest.raises(TaskDeclarationError, match=match):

        @app.task(**options)
        def f(x: Any = None) -> None: ...


def test_a_misspelt_flow_option_warns_at_the_declaration() -> None:
    # An unknown option is kept in the task's extra (QTasks' custom options): one close to a
    # known option is most likely a typo whose limit would silently not apply.
    app = QueueTasks("t")
    with pytest.warns(UserWarning, match="'rate_limt' .* did you mean 'rate_limit'") as caught:

        @app.task(rate_limt="1/s", test=True)
        def f() -> None: ...

    assert [w.filename for w in caught] == [__file__]  # points at the declaration
    assert f.options.extra == {"rate_limt": "1/s", "test": True}
    assert f.flow is None


async def test_bad_add_task_options_are_refused_and_nothing_is_queued() -> None:
    app = AsyncQueueTasks("t")

    @app.task(concurrency_key=lambda items: items, max_concurrency=1)
    def by_items(items: Any) -> None: ...

    @app.task
    def plain() -> None: ...

    async with app:
        with pytest.raises(TaskArgumentsError, match="expires expects seconds > 0"):
            await app.add_task("plain", expires=-5)
        with pytest.raises(TaskArgumentsError, match="unique_for expects seconds > 0"):
            await app.add_task("plain", unique_key="k", unique_for=float("nan"))
        with pytest.raises(TaskArgumentsError, match="unique_for needs a unique_key"):
            await app.add_task("plain", unique_for=10)
        with pytest.raises(TaskArgumentsError, match="unique_key expects a str"):
            await app.add_task("plain", unique_key=["a"])  # type: ignore[arg-type]
        with pytest.raises(TaskArgumentsError, match="not hashable"):
            await by_items.add_task([1, 2])
        with pytest.raises(TaskArgumentsError, match="concurrency_key gave"):
            await by_items.add_task(1.5)
        assert (await app.broker.stats()).ready_by_priority == {}
        assert await app.storage.stats() == {}
    for error in (TaskArgumentsError, TaskDeclarationError):
        assert issubclass(error, QTasksError)


async def test_limits_need_a_global_config_with_flow_control() -> None:
    class Plain:  # a global config without the capability
        def __init__(self) -> None:
            inner = MemoryGlobalConfig()
            for name in (
                "start",
                "get",
                "set",
                "set_if_absent",
                "delete",
                "get_all",
                "clear",
                "increment",
                "heartbeat",
                "workers",
            ):
                setattr(self, name, getattr(inner, name))

    assert isinstance(MemoryGlobalConfig(), FlowControl)
    assert not isinstance(Plain(), FlowControl)
    # Plain has the GlobalConfig methods as instance attributes, which mypy cannot see.
    app = AsyncQueueTasks("t", global_config=Plain())  # type: ignore[arg-type]

    @app.task(rate_limit="1/s")
    def limited() -> None: ...

    with pytest.raises(ConfigError, match="flow control"):
        async with app:
            pass


# --- expiry -------------------------------------------------------------------------------------


async def test_a_message_not_started_by_its_expiry_is_not_run() -> None:
    app = AsyncQueueTasks("t")
    ran: list[int] = []
    expired = Expired()
    app.add_plugin(expired, name="expired")

    @app.task
    def work(i: int) -> int:
        ran.append(i)
        return i

    async with app:
        late = await app.add_task("work", 1, delay=0.3, expires=0.1)
        on_time = await app.add_task("work", 2, expires=30)
        done = await app.wait(late.uuid, timeout=5)
        assert done.status is TaskStatus.EXPIRED
        assert done.error is not None and "expired" in done.error
        assert (await app.wait(on_time.uuid, timeout=5)).status is TaskStatus.SUCCESS
    assert ran == [2]
    assert [r.uuid for r in expired.records] == [late.uuid]
    assert TaskStatus.EXPIRED.final


async def test_task_level_expires_applies_to_every_add() -> None:
    app = AsyncQueueTasks("t")

    @app.task(expires=0.05)
    def work() -> None: ...

    async with app:
        task = await app.add_task("work", delay=0.2)
        assert (await app.wait(task.uuid, timeout=5)).status is TaskStatus.EXPIRED
        quick = await app.add_task("work")
        assert (await app.wait(quick.uuid, timeout=5)).status is TaskStatus.SUCCESS


# --- rate limits -------------------------------------------------------------------------------


async def test_rate_limit_holds_and_requeues_are_not_delivery_attempts() -> None:
    # max_deliveries=1: a single counted redelivery would dead-letter the task.
    app = AsyncQueueTasks(
        "t",
        broker=MemoryBroker(max_deliveries=1),
        config=QueueConfig(max_tasks_process=10, max_deliveries=1),
    )
    starts: list[float] = []

    @app.task(rate_limit="20/s", rate_burst=2)
    async def limited(i: int) -> int:
        starts.append(time.monotonic())
        return i

    async with app:
        tasks = [await app.add_task("limited", i) for i in range(30)]
        records = [await app.wait(t.uuid, timeout=20) for t in tasks]
    assert all(r.status is TaskStatus.SUCCESS for r in records)
    assert {r.attempt for r in records} == {1}
    assert max_in_window(starts) <= 20 + 2
    # 30 starts: 2 at once (the burst), then one every 50 ms.
    span = max(starts) - min(starts)
    assert 28 * 0.05 * 0.95 <= span <= 28 * 0.05 * 1.3


async def test_a_rate_token_later_than_the_expiry_expires_the_task() -> None:
    app = AsyncQueueTasks("t")

    @app.task(rate_limit="1/m")
    def rare(i: int) -> int:
        return i

    async with app:
        first = await app.add_task("rare", 1)
        assert (await app.wait(first.uuid, timeout=5)).status is TaskStatus.SUCCESS
        second = await app.add_task("rare", 2, expires=5)
        # The next token is a minute away: it cannot start in time, it expires at once.
        with anyio.fail_after(2):
            assert (await app.wait(second.uuid, timeout=None)).status is TaskStatus.EXPIRED


# --- concurrency keys ------------------------------------------------------------------------


async def test_max_concurrency_per_key_is_never_exceeded() -> None:
    app = AsyncQueueTasks("t", config=QueueConfig(max_tasks_process=20))
    spans: dict[str, list[tuple[float, float]]] = {"a": [], "b": []}

    @app.task(concurrency_key="customer", max_concurrency=2)
    async def per_customer(i: int, customer: str) -> int:
        start = time.monotonic()
        await anyio.sleep(0.02)
        spans[customer].append((start, time.monotonic()))
        return i

    async with app:
        tasks = [await app.add_task("per_customer", i, customer="ab"[i % 2]) for i in range(40)]
        records = [await app.wait(t.uuid, timeout=30) for t in tasks]
        state = await app.global_config.flow_state()  # type: ignore[attr-defined]
    assert all(r.status is TaskStatus.SUCCESS for r in records)
    assert {r.attempt for r in records} == {1}
    assert [len(spans["a"]), len(spans["b"])] == [20, 20]
    assert max_overlap(spans["a"]) == 2
    assert max_overlap(spans["b"]) == 2
    assert state["slots:per_customer:a"]["held"] == 0


async def test_a_backlog_keeps_every_slot_of_its_key_busy() -> None:
    await a_backlog_keeps_every_slot_busy(AsyncQueueTasks("t"))


async def test_a_burst_of_waiters_is_not_starved_by_steady_traffic() -> None:
    await a_burst_is_not_starved_by_steady_traffic(AsyncQueueTasks("t"))


async def test_a_freed_slot_goes_to_a_waiter_at_once() -> None:
    await a_freed_slot_goes_to_a_waiter_at_once(AsyncQueueTasks("t"))


async def test_a_failing_key_function_rejects_the_message_with_why() -> None:
    app = AsyncQueueTasks("t")

    def key(i: int) -> int:
        if i > 0:
            raise RuntimeError("no key for you")
        return i

    @app.task(concurrency_key=key, max_concurrency=1)
    def keyed(i: int) -> int:
        return i

    async with app:
        with pytest.raises(TaskArgumentsError, match="no key for you"):
            await app.add_task("keyed", 1)


# --- unique tasks -------------------------------------------------------------------------------


async def test_unique_key_returns_the_pending_task_then_frees_at_final() -> None:
    app = AsyncQueueTasks("t")
    gate = anyio.Event()

    @app.task
    async def send(to: str) -> str:
        await gate.wait()
        return to

    async with app:
        results = []

        async def add() -> None:
            results.append(await app.add_task("send", "x@y", unique_key="mail-42"))

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(add)
        assert len({r.uuid for r in results}) == 1
        gate.set()
        first = await app.wait(results[0].uuid, timeout=5)
        assert first.status is TaskStatus.SUCCESS
        again = await app.add_task("send", "x@y", unique_key="mail-42")
        assert again.uuid != first.uuid
        assert (await app.wait(again.uuid, timeout=5)).status is TaskStatus.SUCCESS
        # unique_for keeps the key after the task is over.
        kept = await app.add_task("send", "x@y", unique_key="mail-43", unique_for=60)
        await app.wait(kept.uuid, timeout=5)
        same = await app.add_task("send", "x@y", unique_key="mail-43", unique_for=60)
        assert same.uuid == kept.uuid and same.status is TaskStatus.SUCCESS
        assert (await app.storage.stats())["success"] == 3


async def test_unique_for_caps_the_hold_even_of_a_pending_task() -> None:
    # Documented: unique_for is the hold's length, final or not; a task still pending after
    # it (here delayed) no longer holds its key.
    app = AsyncQueueTasks("t")

    @app.task
    async def send(to: str) -> str:
        return to

    async with app:
        first = await app.add_task("send", "x", unique_key="r-1", unique_for=0.2, delay=5)
        same = await app.add_task("send", "x", unique_key="r-1", unique_for=0.2, delay=5)
        assert same.uuid == first.uuid
        await anyio.sleep(0.3)  # unique_for runs out (a TTL, not a race)
        assert (await app.get(first.uuid)).status is TaskStatus.NEW  # type: ignore[union-attr]
        second = await app.add_task("send", "x", unique_key="r-1", unique_for=0.2, delay=5)
        assert second.uuid != first.uuid


async def test_a_deduplicated_add_fires_its_own_hook_not_the_enqueue_ones() -> None:
    """An add_task whose unique key is held returns the pending task; plugins learn of it
    through qtasks_task_deduplicated (with the task it would have added), not through the
    hooks of a stored and published task."""
    app = AsyncQueueTasks("t")
    gate = anyio.Event()
    calls: list[tuple[str, str, str | None]] = []

    class Seen:
        @hookimpl
        def qtasks_task_enqueue(self, message: Message) -> None:
            calls.append(("enqueue", message.uuid, None))

        @hookimpl
        def qtasks_task_enqueued(self, record: TaskRecord) -> None:
            calls.append(("enqueued", record.uuid, None))

        @hookimpl
        def qtasks_task_deduplicated(self, record: TaskRecord, existing: TaskRecord) -> None:
            calls.append(("deduplicated", record.uuid, existing.uuid))

    app.add_plugin(Seen())

    @app.task
    async def send(to: str) -> str:
        await gate.wait()
        return to

    async with app:
        first = await app.add_task("send", "x@y", unique_key="mail-1")
        again = await app.add_task("send", "x@y", unique_key="mail-1")
        assert again.uuid == first.uuid
        (_, tried, _), dedup = calls[2], calls[3]
        assert calls[:2] == [("enqueue", first.uuid, None), ("enqueued", first.uuid, None)]
        assert calls[2][0] == "enqueue" and tried != first.uuid
        assert dedup == ("deduplicated", tried, first.uuid) and len(calls) == 4
        assert await app.get(tried) is None  # nothing stored for the deduplicated call
        gate.set()
        assert (await app.wait(first.uuid, timeout=5)).status is TaskStatus.SUCCESS


async def test_task_level_unique_key_function() -> None:
    app = AsyncQueueTasks("t")
    gate = anyio.Event()

    @app.task(unique_key=lambda order: f"order-{order}")
    async def ship(order: int) -> int:
        await gate.wait()
        return order

    async with app:
        a = await app.add_task("ship", 1)
        b = await app.add_task("ship", 1)
        c = await app.add_task("ship", 2)
        assert a.uuid == b.uuid != c.uuid
        gate.set()
        await app.wait(c.uuid, timeout=5)


# --- qtasks inspect -----------------------------------------------------------------------------

INSPECTED_APP = """
import threading
from qtasks import QueueConfig, QueueTasks

app = QueueTasks("flow-cli", config=QueueConfig(plugins_disabled=["timer"], shutdown_grace=1.0))
release = threading.Event()

@app.task(rate_limit="2/s")
def limited() -> None: ...

@app.task(concurrency_key="customer", max_concurrency=1)
def exclusive(customer: str) -> None:
    release.wait(10)
"""


def test_inspect_shows_limits_tokens_and_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"flowapp_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(INSPECTED_APP)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    app = module.app
    try:
        with app:
            for _ in range(3):
                app.add_task("limited")
            app.add_task("exclusive", customer="acme")
            app.add_task("exclusive", customer="acme")
            deadline = time.monotonic() + 10
            while True:  # the worker takes the messages in: wait until both limits bite
                result = CliRunner().invoke(cli, ["inspect", "-A", f"{name}:app", "--json"])
                assert result.exit_code == 0, result.output
                flow = json.loads(result.output)["flow"]
                slots = flow.get("slots:exclusive:acme", {})
                if slots.get("waiting") == 1 and flow.get("rate:limited", {}).get("waiting"):
                    break
                assert time.monotonic() < deadline, flow
                time.sleep(0.05)  # between two looks at the live figures
            report = json.loads(result.output)
            assert report["tasks"]["limited"]["flow"]["rate_limit"] == "2/s"
            assert report["tasks"]["exclusive"]["flow"]["max_concurrency"] == 1
            assert slots["held"] == slots["limit"] == 1
            assert flow["rate:limited"]["tokens"] < 1
            text = CliRunner().invoke(cli, ["inspect", "-A", f"{name}:app"]).output
            assert "flow control:" in text
            assert "slots:exclusive:acme" in text and "1/1" in text
            # Each task's own flow options, in the tasks table.
            rows = {line.split()[0]: line for line in text.splitlines() if line.strip()}
            assert rows["limited"].endswith("rate 2/s burst 1")
            assert rows["exclusive"].endswith("key customer max 1")
            module.release.set()
    finally:
        module.release.set()
        sys.modules.pop(name, None)


async def test_a_failed_publish_gives_the_unique_key_back() -> None:
    class Flaky(MemoryBroker):
        fail = True

        async def publish(self, envelope: Any) -> None:
            if self.fail:
                self.fail = False
                raise ConnectionError("broker down")
            await super().publish(envelope)

    app = AsyncQueueTasks("t", broker=Flaky())

    @app.task
    async def send() -> None: ...

    async with app:
        with pytest.raises(ConnectionError):
            await app.add_task("send", unique_key="once")
        task = await app.add_task("send", unique_key="once")  # the key was given back
        assert (await app.wait(task.uuid, timeout=5)).status is TaskStatus.SUCCESS


async def test_a_unique_key_whose_task_left_no_record() -> None:
    app = AsyncQueueTasks("t")

    @app.task
    async def send() -> None: ...

    gc = app.global_config
    assert isinstance(gc, MemoryGlobalConfig)
    async with app:
        # A holder enqueued just now (its record is on its way): its uuid comes back, as new.
        await gc.claim_unique("unique:fresh", f"{'a' * 32}@{time.time():.3f}@", None)
        fresh = await app.add_task("send", unique_key="fresh")
        assert (fresh.uuid, fresh.status) == ("a" * 32, TaskStatus.NEW)
        # A holder long gone (its process died between the claim and the publish, or its
        # record expired): the key is taken over.
        await gc.claim_unique("unique:stale", f"{'b' * 32}@{time.time() - 60:.3f}@", None)
        taken = await app.add_task("send", unique_key="stale")
        assert taken.uuid != "b" * 32
        assert (await app.wait(taken.uuid, timeout=5)).status is TaskStatus.SUCCESS


def test_the_sync_app_takes_every_flow_option() -> None:
    from qtasks import QueueTasks

    app = QueueTasks("sync-flow")

    @app.task(concurrency_key="to", max_concurrency=1, rate_limit="100/s", expires=30)
    def send(to: str) -> str:
        return to

    with app:
        first = send.add_task(to="a", unique_key="s-1", unique_for=60)
        assert first.wait_result(timeout=5).status is TaskStatus.SUCCESS
        again = app.add_task("send", to="a", unique_key="s-1", unique_for=60, timeout=5)
        assert again.uuid == first.uuid  # kept for unique_for, though final
        late = app.enqueue("send", kwargs={"to": "b"}, delay=0.2, expires=0.05, timeout=5)
        assert late.status is TaskStatus.EXPIRED


async def test_a_cancelled_backlog_gives_its_rate_tokens_back() -> None:
    app = AsyncQueueTasks("t", config=QueueConfig(max_tasks_process=8))
    starts: dict[int, float] = {}

    @app.task(rate_limit="20/s")
    async def call_api(i: int) -> int:
        starts[i] = time.monotonic()
        return i

    async with app:
        backlog = [await app.add_task("call_api", i) for i in range(1, 41)]  # 2 s of tokens
        fc = app.global_config
        assert isinstance(fc, FlowControl)
        held: dict[str, float] = {}
        with anyio.fail_after(5):  # until the worker held (nearly) all for their moments
            while held.get("waiting", 0) < 30:
                await anyio.sleep(0.01)
                held = (await fc.flow_state()).get("rate:call_api", {})
        for task in backlog:
            await app.cancel(task.uuid)
        added = time.monotonic()
        fresh = await app.add_task("call_api", 0)
        assert (await app.wait(fresh.uuid, timeout=5)).status is TaskStatus.SUCCESS
    # Behind the cancelled backlog's reservations it would have started ~1.5 s later.
    assert starts[0] - added < 0.5, starts[0] - added
    assert len(starts) < 15  # the backlog was cancelled, not run


async def test_a_retry_takes_a_rate_token_of_its_own() -> None:
    app = AsyncQueueTasks("t")
    starts: list[float] = []

    @app.task(rate_limit="4/s", retry=1, retry_backoff=0)
    async def flaky() -> int:
        starts.append(time.monotonic())
        if len(starts) == 2:  # the second run of the held task fails once
            raise RuntimeError("once")
        return len(starts)

    async with app:
        first = await app.add_task("flaky")
        await app.wait(first.uuid, timeout=5)
        held = await app.add_task("flaky")  # reserved 250 ms ahead, fails, retried at once
        assert (await app.wait(held.uuid, timeout=5)).status is TaskStatus.SUCCESS
    assert len(starts) == 3
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(gap >= 0.25 - 0.01 for gap in gaps), gaps


async def test_a_slot_taken_by_a_message_that_is_not_run_is_freed() -> None:
    app = AsyncQueueTasks("t", config=QueueConfig(lease=60))
    gate = anyio.Event()

    @app.task(concurrency_key="key", max_concurrency=1)
    async def one_at_a_time(key: str, i: int) -> int:
        if i == 0:
            await gate.wait()
        return i

    async with app:
        first = await app.add_task("one_at_a_time", key="k", i=0)
        cancelled = await app.add_task("one_at_a_time", key="k", i=1)
        # Its record is cancelled, its message stays queued (as on a broker that cannot drop a
        # queued message): when it comes back it takes the slot, then is found final.
        await app.storage.cancel(cancelled.uuid, "not needed")
        gate.set()
        assert (await app.wait(first.uuid, timeout=5)).status is TaskStatus.SUCCESS
        with anyio.fail_after(5):  # the cancelled one comes back, takes the slot, is acked
            while True:
                stats = await app.broker.stats()
                if not (stats.delayed or stats.in_flight or stats.ready_by_priority):
                    break
                await anyio.sleep(0.01)
        last = await app.add_task("one_at_a_time", key="k", i=2)
        assert (await app.wait(last.uuid, timeout=5)).status is TaskStatus.SUCCESS
        state = await app.global_config.flow_state()  # type: ignore[attr-defined]
    assert state["slots:one_at_a_time:k"]["held"] == 0


async def slots_once_one_delivery_ended(app: AsyncQueueTasks) -> dict[str, Any]:
    """The flow state once the worker ended (settled and released) one delivery."""
    with anyio.fail_after(5):
        while app.worker.processed < 1:  # noqa: ASYNC110 - a counter, no event
            await anyio.sleep(0.01)
    return await app.global_config.flow_state()  # type: ignore[attr-defined,no-any-return]


async def test_a_retry_s_old_delivery_never_frees_the_slot_of_its_new_one() -> None:
    # retry_backoff=0: the retry is delivered again while the failed delivery still settles
    # (a slow retry hook). The failed delivery's slot is freed before its message is
    # requeued, so the retry starts at once; the failed delivery's release, after the hook,
    # frees its own slot only, not the one the retry runs under.
    app = AsyncQueueTasks("t", config=QueueConfig(max_tasks_process=4, lease=30))
    retry_runs = anyio.Event()
    finish = anyio.Event()
    seen_in_hook: list[bool] = []
    runs: list[str] = []

    class SlowRetryHook:
        @hookimpl
        async def qtasks_worker_task_retry(self, record: Any) -> None:
            with anyio.move_on_after(3):  # the retry needs its slot to start
                await retry_runs.wait()
            seen_in_hook.append(retry_runs.is_set())

    app.add_plugin(SlowRetryHook(), name="slow")

    @app.task(concurrency_key="key", max_concurrency=1, retry=1, retry_backoff=0)
    async def work(key: str) -> str:
        runs.append(key)
        if len(runs) == 1:
            raise RuntimeError("transient")
        retry_runs.set()
        await finish.wait()
        return key

    async with app:
        task = await app.add_task("work", key="k")
        state = await slots_once_one_delivery_ended(app)  # the failed one
        finish.set()
        assert (await app.wait(task.uuid, timeout=5)).status is TaskStatus.SUCCESS
    assert seen_in_hook == [True]  # the retry got its slot before the old delivery ended
    assert state["slots:work:k"]["held"] == 1  # the running retry's slot is still held


async def test_a_delivery_whose_lease_was_lost_never_frees_the_slot_of_the_next() -> None:
    # The first delivery blocks the loop past its lease: the message is delivered again and
    # its new delivery takes the slot; the stale delivery then settles and releases its own
    # (lapsed) slot, not the one the new delivery runs under.
    app = AsyncQueueTasks("t", config=QueueConfig(max_tasks_process=4, lease=0.3))
    again = anyio.Event()
    finish = anyio.Event()
    runs: list[int] = []

    @app.task(concurrency_key="key", max_concurrency=1)
    async def work(key: str) -> int:
        runs.append(len(runs))
        if len(runs) == 1:
            # A blocked loop (the point): no lease renewal, the delivery is lost.
            time.sleep(0.7)  # noqa: ASYNC251
            with anyio.fail_after(5):
                await again.wait()  # settles only once the new delivery runs
            return 1
        again.set()
        await finish.wait()
        return 2

    async with app:
        task = await app.add_task("work", key="k")
        state = await slots_once_one_delivery_ended(app)  # the stale one
        finish.set()
        record = await app.wait(task.uuid, timeout=5)
    assert (record.status, record.returning) == (TaskStatus.SUCCESS, 2)
    assert state["slots:work:k"]["held"] == 1  # the new delivery's slot is still held


class EarlierFlowControl(MemoryGlobalConfig):
    """A global config written against FlowControl before ``waiter`` and ``release_rate``
    existed: ``acquire_slot`` without ``waiter``, and no ``release_rate`` at all."""

    async def acquire_slot(self, key: str, limit: int, holder: str, lease: float) -> float:  # type: ignore[override]  # the older signature, on purpose
        return await super().acquire_slot(key, limit, holder, lease)

    def __getattribute__(self, name: str) -> Any:
        if name == "release_rate":
            raise AttributeError(name)
        return super().__getattribute__(name)


async def test_a_flow_control_written_before_waiter_and_release_rate_still_serves() -> None:
    """``waiter`` and the ``RateRelease`` capability came later: an implementation of the
    earlier protocol is still a FlowControl, its slots are taken without ``waiter``, and a
    cancel just does not give rate tokens back (before, every limited task failed)."""
    gc = EarlierFlowControl()
    assert isinstance(gc, FlowControl) and not hasattr(gc, "release_rate")
    app = AsyncQueueTasks("t", global_config=gc, config=QueueConfig(max_tasks_process=4))

    @app.task(max_concurrency=1, concurrency_key="key")
    async def one_at_a_time(i: int, key: str = "k") -> int:
        return i

    @app.task(rate_limit="1/s")
    async def slow_rate(i: int) -> int:
        return i

    async with app:
        done = [await app.add_task("one_at_a_time", i, timeout=5) for i in range(3)]
        first = await app.add_task("slow_rate", 0, timeout=5)
        queued = await app.add_task("slow_rate", 1)
        cancelled = await app.cancel(queued.uuid)
    assert [t.status for t in done] == [TaskStatus.SUCCESS] * 3
    assert first.status is TaskStatus.SUCCESS
    assert cancelled is not None and cancelled.status is TaskStatus.CANCEL


class Delegate:
    """A wrapper that forwards every attribute to a global config (``__getattr__``), as
    instrumentation does: the class has no ``acquire_slot`` of its own."""

    def __init__(self, inner: MemoryGlobalConfig) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class KeywordProxy(MemoryGlobalConfig):
    """A subclass whose ``acquire_slot`` takes ``**kwargs`` and records what it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.waiters: list[object] = []

    async def acquire_slot(self, *args: Any, **kwargs: Any) -> float:
        self.waiters.append(kwargs.get("waiter"))
        return await super().acquire_slot(*args, **kwargs)


async def test_wrapped_flow_controls_get_waiter_as_they_can_take_it() -> None:
    """Whether ``acquire_slot`` takes ``waiter`` is read from the bound method: a
    ``__getattr__`` delegate serves (its class has no ``acquire_slot``: it raised), and a
    ``**kwargs`` one gets ``waiter`` (it was taken for one written before ``waiter``)."""
    for gc in (Delegate(MemoryGlobalConfig()), KeywordProxy()):
        app = AsyncQueueTasks("t", global_config=gc, config=QueueConfig(max_tasks_process=2))

        @app.task(max_concurrency=1, concurrency_key="key")
        async def one_at_a_time(i: int, key: str = "k") -> int:
            return i

        async with app:
            done = await app.add_task("one_at_a_time", 1, timeout=5)
        assert done.status is TaskStatus.SUCCESS
        if isinstance(gc, KeywordProxy):
            assert gc.waiters == [done.uuid]


class CountingReleases(MemoryGlobalConfig):
    """A global config of the user's own that counts the slots it frees."""

    def __init__(self) -> None:
        super().__init__()
        self.released: list[str] = []

    async def release_slot(self, key: str, holder: str) -> None:
        self.released.append(key)
        await super().release_slot(key, holder)


async def test_a_release_slot_override_is_still_called() -> None:
    """The core frees slots waking the next waiter (SlotWake) only where that does not skip an
    override of ``release_slot``: a subclass counting its releases sees every one."""
    config = CountingReleases()
    app = AsyncQueueTasks(global_config=config)

    @app.task(concurrency_key="key", max_concurrency=1)
    async def job(key: str, i: int) -> int:
        return i

    async with app:
        tasks = [await job.add_task("k", i) for i in range(3)]
        for task in tasks:
            assert (await app.wait(task.uuid, timeout=10)).status is TaskStatus.SUCCESS
    assert config.released == ["slots:job:k"] * 3
