"""The harness: inline and worker modes, recording, time, restoring the app."""

import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pydantic
import pytest

from qtasks import (
    AsyncQueueTasks,
    AsyncState,
    Depends,
    MemoryBroker,
    MemoryGlobalConfig,
    QueueTasks,
    TaskStatus,
    chain,
)
from qtasks.errors import TaskFailedError, TaskTimeoutError
from qtasks_testing import FakeClock
from qtasks_testing.harness import WRAPPED, Harness, HarnessError, Mode
from qtasks_testing.sync_harness import SyncHarness


def make_async_app() -> tuple[AsyncQueueTasks, dict[str, Any]]:
    app = AsyncQueueTasks()
    seen: dict[str, Any] = {"flaky": 0}

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task(retry=2, retry_backoff=30)
    async def flaky() -> str:
        seen["flaky"] += 1
        if seen["flaky"] < 3:
            raise ConnectionError(f"attempt {seen['flaky']}")
        return "ok"

    @app.task
    async def divide(a: int, b: int) -> float:
        return a / b

    @app.task
    async def countdown(n: int) -> Any:
        while n:
            yield n
            n -= 1

    @app.task(echo=True)
    async def parent(self: Any, n: int) -> int:
        child = await self.add_task("add", n, 1)
        return int(child.returning) * 10

    @app.task
    def sync_add(a: int, b: int) -> int:
        return a + b

    return app, seen


@pytest.mark.anyio
async def test_inline_add_task_returns_the_final_record() -> None:
    app, _ = make_async_app()
    async with Harness(app) as qt:
        task = await app.add_task("add", 2, 3)
        assert (task.status, task.returning) == (TaskStatus.SUCCESS, 5)
        assert (await app.add_task("sync_add", 1, 1)).returning == 2
        qt.assert_enqueued("add", 2, 3)
        qt.assert_not_enqueued("add", 3, 2)


@pytest.mark.anyio
async def test_enqueued_arguments_are_what_the_task_receives() -> None:
    """A tuple argument reaches the task as a list (JSON has no tuple): the harness records
    the list, and matches either shape a test asserts with."""
    app = AsyncQueueTasks()
    received: list[Any] = []

    @app.task
    async def total(prices: list[int], pair: Any = None) -> int:
        received.append((prices, pair))
        return sum(prices)

    async with Harness(app) as qt:
        await app.add_task("total", (3, 4), pair=(1, (2,)))
        assert received == [([3, 4], [1, [2]])]
        (call,) = qt.enqueued(total)
        assert (call.args, call.kwargs) == ([[3, 4]], {"pair": [1, [2]]})
        for prices, pair in (([3, 4], [1, [2]]), ((3, 4), (1, (2,)))):
            assert qt.assert_enqueued("total", prices, pair=pair) == call
        qt.assert_not_enqueued("total", [4, 3], pair=[1, [2]])


@pytest.mark.anyio
async def test_a_model_argument_matches_as_the_model_or_its_dict() -> None:
    class Item(pydantic.BaseModel):
        name: str

    app = AsyncQueueTasks()

    @app.task
    async def store(item: Item) -> str:
        return str(item.name)

    async with Harness(app) as qt:
        await app.add_task("store", Item(name="x"))
        assert qt.enqueued(store)[0].args == [{"name": "x"}]
        qt.assert_enqueued(store, Item(name="x"))
        qt.assert_enqueued(store, {"name": "x"})


@pytest.mark.anyio
async def test_inline_retries_skip_the_backoff() -> None:
    app, seen = make_async_app()
    async with Harness(app):
        task = await app.add_task("flaky")
        assert (task.status, task.returning, task.attempt) == (TaskStatus.SUCCESS, "ok", 3)
        assert seen["flaky"] == 3


@pytest.mark.anyio
async def test_inline_generator_and_child_tasks() -> None:
    app, _ = make_async_app()
    async with Harness(app) as qt:
        task = await app.add_task("countdown", 3)
        assert task.returning == [3, 2, 1]
        assert [s async for s in task.stream()] == [3, 2, 1]
        parent = await app.add_task("parent", 4)
        assert parent.returning == 50
        child = qt.assert_enqueued("add", 4, 1)
        assert (await app.get(child.uuid)).parent_uuid == parent.uuid  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_failing_task_raises_with_its_traceback() -> None:
    app, _ = make_async_app()
    async with Harness(app) as qt:
        with pytest.raises(TaskFailedError) as caught:
            await app.add_task("divide", 1, 0)
        text = str(caught.value)
        assert "divide(1, 0)" in text
        assert "ZeroDivisionError: division by zero" in text
        assert "return a / b" in text  # the task's own line, from its traceback
        qt.raise_task_errors = False
        record = await app.add_task("divide", 1, 0)
        assert record.status is TaskStatus.ERROR


@pytest.mark.anyio
async def test_delayed_tasks_wait_for_the_clock() -> None:
    app, _ = make_async_app()
    async with Harness(app) as qt:
        qt.freeze_time()
        task = await app.add_task("add", 1, 1, delay=60)
        assert task.status is TaskStatus.NEW
        assert await qt.run_pending() == []
        await qt.advance_time(59)
        assert (await app.get(task.uuid)).status is TaskStatus.NEW  # type: ignore[union-attr]
        await qt.advance_time(1)
        assert (await app.get(task.uuid)).returning == 2  # type: ignore[union-attr]
        later = await app.add_task("add", 2, 2, delay=3600)
        done = await qt.run_pending(include_delayed=True)
        assert [r.uuid for r in done] == [later.uuid]


@pytest.mark.anyio
async def test_worker_mode_runs_tasks_concurrently() -> None:
    app, _ = make_async_app()
    async with Harness(app, mode="worker") as qt:
        tasks = [await app.add_task("add", i, i) for i in range(5)]
        assert all(t.status is TaskStatus.NEW for t in tasks)
        done = await qt.run_pending()
        assert sorted(r.returning for r in done) == [0, 2, 4, 6, 8]
        assert (await qt.wait(tasks[1])).returning == 2
        assert (await app.add_task("add", 1, 2, timeout=5)).returning == 3


@pytest.mark.anyio
async def test_components_are_restored() -> None:
    broker = MemoryBroker()
    app = AsyncQueueTasks(broker=broker)
    storage = app.storage
    async with Harness(app, keep=["storage"]) as qt:
        assert app.broker is not broker
        assert app.storage is storage
        assert set(WRAPPED) <= set(vars(app))
        assert (app.clock, app.sleep_until, app.wait_clock) == (
            qt.clock.time,
            qt.advance_to,
            qt._wait_clock,
        )
    assert app.broker is broker
    assert (app.clock, app.sleep_until, app.wait_clock) == (time.time, None, None)
    assert not set(WRAPPED) & set(vars(app))
    assert not app.started


@pytest.mark.anyio
async def test_refuses_a_started_app() -> None:
    app = AsyncQueueTasks()
    await app.start()
    try:
        with pytest.raises(HarnessError, match="already started"):
            await Harness(app).start()
    finally:
        await app.aclose()


def test_sync_harness_with_a_sync_app() -> None:
    app = QueueTasks()

    @app.task
    def mul(a: int, b: int) -> int:
        return a * b

    with SyncHarness(app) as qt:
        assert mul.add_task(3, 4).returning == 12
        qt.assert_enqueued(mul, 3, 4)
        qt.freeze_time()
        task = mul.add_task(2, 2, delay=10)
        assert task.status is TaskStatus.NEW
        qt.advance_time(10)
        assert app.get(task.uuid).returning == 4  # type: ignore[union-attr]
    with SyncHarness(app, mode="worker") as qt:
        task = mul.add_task(5, 5)
        assert qt.wait(task).returning == 25


@pytest.mark.anyio
async def test_inline_runs_depends_and_state() -> None:
    app = AsyncQueueTasks()
    events: list[str] = []

    async def resource() -> Any:
        events.append("open")
        yield "conn"
        events.append("close")

    class Counter(AsyncState):
        pass

    @app.task
    async def uses(state: Counter, n: int, conn: str = Depends(resource)) -> Any:
        count = await state.increment("runs")
        return [conn, n, count]

    async with Harness(app):
        assert (await app.add_task("uses", 1)).returning == ["conn", 1, 1]
        assert (await app.add_task("uses", 2)).returning == ["conn", 2, 2]
    assert events == ["open", "close", "open", "close"]


async def run_a_timer_tick(app: AsyncQueueTasks) -> None:
    """docs/testing.md's recipe: a timer on the harness's clock, built before the harness
    starts (it starts with the app), in worker mode."""
    from qtasks_timer import AsyncTimer

    clock = FakeClock()
    clock.freeze()
    # Half past an hour: near the top of a real hour, the tick just passed would still be
    # within misfire_grace and run at start.
    clock.advance_to(math.ceil(clock.time() / 3600) * 3600 + 1800)
    timer = AsyncTimer(app, clock=clock.now)  # before the app serves: it starts with the app
    timer.add_task("tick", trigger=3600)
    async with Harness(app, mode="worker", clock=clock) as qt:
        assert qt.enqueued() == []
        # Hourly ticks are aligned to the epoch: move to the next one (a tick found later than
        # misfire_grace would be skipped, as in production).
        await qt.advance_to(math.ceil(clock.time() / 3600) * 3600)
        # The timer re-reads its clock at least once a second; nothing tells us when it did.
        with anyio.fail_after(5):
            while not qt.enqueued("tick"):  # noqa: ASYNC110 - no event to wait on
                await anyio.sleep(0.05)
        (call,) = qt.enqueued("tick")
        assert (await qt.wait(call.uuid)).returning == "tock"


@pytest.mark.anyio
async def test_worker_mode_timer_follows_the_fake_clock_in_every_test() -> None:
    app = AsyncQueueTasks()  # one app for both tests, as a module-level one is

    @app.task
    async def tick() -> str:
        return "tock"

    await run_a_timer_tick(app)
    # The first test's timer was let go when its harness closed: the second builds its own.
    await run_a_timer_tick(app)


TIMED_PROJECT = """
from qtasks import AsyncQueueTasks
from qtasks_timer import AsyncTimer

app = AsyncQueueTasks()
timer = AsyncTimer(app)
"""


def test_a_timer_built_when_its_module_is_imported_stays_the_app_s(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The project's own timer, built at import, is not the test's: the harness leaves it."""
    import importlib

    from qtasks_timer.plugin import TimerPlugin

    (tmp_path / "timed_project.py").write_text(TIMED_PROJECT)
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.delitem(sys.modules, "timed_project", raising=False)
    project = importlib.import_module("timed_project")
    with SyncHarness(project.app):
        pass
    bound = [p.timer for p in project.app.hooks.pm.get_plugins() if isinstance(p, TimerPlugin)]
    assert project.timer in bound


@pytest.mark.anyio
async def test_worker_run_pending_moves_the_clock_through_retry_backoff() -> None:
    """A retry's back-off is real in worker mode; run_pending moves the (frozen) clock through
    it instead of waiting for the timeout."""
    app = AsyncQueueTasks()
    attempts: list[int] = []

    @app.task(retry=1, retry_backoff=60)
    async def fails() -> None:
        attempts.append(len(attempts) + 1)
        raise ConnectionError(f"attempt {len(attempts)}")

    @app.task(retry=2, retry_backoff=30)
    async def flaky() -> str:
        attempts.append(len(attempts) + 1)
        if len(attempts) < 5:
            raise ConnectionError("not yet")
        return "ok"

    async with Harness(app, mode="worker", timeout=3, raise_task_errors=False) as qt:
        qt.freeze_time()
        task = await app.add_task("fails")
        with anyio.fail_after(2):
            (done,) = await qt.run_pending()
        assert (done.uuid, done.status, done.attempt) == (task.uuid, TaskStatus.ERROR, 2)
        assert attempts == [1, 2]
        later = await app.add_task("flaky")
        with anyio.fail_after(2):
            (ok,) = await qt.run_pending()
        assert (ok.uuid, ok.returning, ok.attempt) == (later.uuid, "ok", 3)


@pytest.mark.anyio
async def test_worker_wait_moves_the_clock_through_retry_backoff() -> None:
    app, seen = make_async_app()  # flaky: fails twice, retry=2 with a 30 s backoff
    async with Harness(app, mode="worker", timeout=3) as qt:
        qt.freeze_time()
        task = await app.add_task("flaky")
        with anyio.fail_after(2):
            done = await qt.wait(task)
        assert (done.returning, done.attempt, seen["flaky"]) == ("ok", 3, 3)
        slow = await app.add_task("add", 1, 1, delay=3600)
        with pytest.raises(TaskTimeoutError):  # delayed at enqueue: the clock stays
            await qt.wait(slow, timeout=0.2)


@pytest.mark.anyio
async def test_worker_run_pending_leaves_delayed_tasks_unless_asked() -> None:
    app, _ = make_async_app()
    async with Harness(app, mode="worker", timeout=3) as qt:
        qt.freeze_time()
        delayed = await app.add_task("add", 1, 1, delay=3600)
        now = await app.add_task("add", 2, 2)
        with anyio.fail_after(2):
            assert [r.uuid for r in await qt.run_pending()] == [now.uuid]
        assert (await app.get(delayed.uuid)).status is TaskStatus.NEW  # type: ignore[union-attr]
        with anyio.fail_after(2):
            assert [r.returning for r in await qt.run_pending(include_delayed=True)] == [2]


@pytest.mark.anyio
async def test_worker_harness_close_cancels_a_running_task_at_once() -> None:
    app = AsyncQueueTasks()
    running = anyio.Event()

    @app.task
    async def forever() -> None:
        running.set()
        await anyio.sleep_forever()

    qt = Harness(app, mode="worker")
    await qt.start()
    try:
        await app.add_task("forever")
        with anyio.fail_after(2):
            await running.wait()
    finally:
        with anyio.fail_after(2):  # shutdown_grace is 30 s: a harness must not wait for it
            await qt.close()


def test_sync_worker_harness_close_cancels_a_running_task_at_once() -> None:
    app = QueueTasks()
    running = threading.Event()

    @app.task
    async def forever_async() -> None:
        running.set()
        await anyio.sleep_forever()

    qt = SyncHarness(app, mode="worker")
    qt.start()
    started = time.monotonic()
    try:
        forever_async.add_task()
        assert running.wait(2)
    finally:
        qt.close()
    assert time.monotonic() - started < 2


FAILED_START = """
import sys
from contextlib import AsyncExitStack

from qtasks import AsyncQueueTasks, MemoryBroker
from qtasks.config import QueueConfig
from qtasks_testing import SyncHarness


class Unreachable(MemoryBroker):
    async def start(self, stack: AsyncExitStack, config: QueueConfig) -> None:
        raise ConnectionError("broker unreachable")


app = AsyncQueueTasks(broker=Unreachable())
try:
    with SyncHarness(app, keep=["broker"]):
        sys.exit("the harness started")
except ConnectionError as exc:
    print("start failed:", exc)
"""


def test_sync_harness_whose_start_fails_lets_the_process_exit() -> None:
    """The portal a SyncHarness starts for an async app is stopped when the start fails: its
    thread would otherwise be joined at exit, for ever."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        done = subprocess.run(
            [sys.executable, "-c", FAILED_START],
            capture_output=True,
            text=True,
            timeout=20,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the process did not exit after the failed start: {exc.stdout!r}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "start failed: broker unreachable"


@pytest.mark.parametrize("mode", ["inline", "worker"])
@pytest.mark.anyio
async def test_each_session_starts_with_fresh_worker_state(mode: str) -> None:
    """Worker-scoped State lives with the app: one test's values must not reach the next, and
    the app's own State is back after the harness."""
    app = AsyncQueueTasks()

    class Hits(AsyncState):
        pass

    @app.task
    async def hit(hits: Hits) -> float:
        return await hits.increment("n")

    own = app.injector.states
    for _ in range(2):
        async with Harness(app, mode=mode) as qt:  # type: ignore[arg-type]  # a Mode
            assert (await qt.wait(await app.add_task("hit"))).returning == 1
    assert app.injector.states is own


@pytest.mark.anyio
async def test_inline_child_failure_does_not_reach_its_parent() -> None:
    """In production add_task returns once the child is queued: the child's failure must not
    fail (and retry) the parent. The test's own call reports it once the parent is done."""
    app = AsyncQueueTasks()
    charged: list[str] = []
    caught_in_parent: list[BaseException] = []

    @app.task
    async def notify(order: str) -> None:
        raise ConnectionError("smtp down")

    @app.task(echo=True, retry=2)
    async def checkout(self: Any, order: str) -> str:
        charged.append(order)
        try:
            await self.add_task("notify", order)  # fire and forget
        except Exception as exc:  # production never gets here
            caught_in_parent.append(exc)
        return "paid"

    async with Harness(app) as qt:
        with pytest.raises(TaskFailedError, match="smtp down") as caught:
            await app.add_task("checkout", "o-1")
        assert caught.value.task.task_name == "notify"  # type: ignore[attr-defined]
        assert "enqueued while another task ran" in str(caught.value)
        assert (charged, caught_in_parent) == (["o-1"], [])
        (parent,) = qt.enqueued("checkout")
        record = await app.get(parent.uuid)
        assert record is not None
        assert (record.status, record.returning, record.attempt) == (TaskStatus.SUCCESS, "paid", 1)
        assert len(qt.enqueued("notify")) == 1
        assert await qt.run_pending() == []  # reported once

    async with Harness(app, raise_task_errors=False) as qt:
        assert (await app.add_task("checkout", "o-2")).returning == "paid"
        (child,) = qt.enqueued("notify")
        assert (await app.get(child.uuid)).status is TaskStatus.ERROR  # type: ignore[union-attr]


def make_bulk_app() -> AsyncQueueTasks:
    app = AsyncQueueTasks()

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task
    async def double(n: int) -> int:
        if n < 0:
            raise ValueError(f"negative: {n}")
        return n * 2

    return app


@pytest.mark.anyio
async def test_inline_runs_and_records_add_tasks_and_workflows() -> None:
    app = make_bulk_app()
    add, double = app.tasks["add"], app.tasks["double"]
    async with Harness(app) as qt:
        tasks = await app.add_tasks([double.s(1), double.s(2)])
        assert [(t.status, t.returning) for t in tasks] == [
            (TaskStatus.SUCCESS, 2),
            (TaskStatus.SUCCESS, 4),
        ]
        qt.assert_enqueued(double, 1)
        qt.assert_enqueued(double, 2)
        state = await app.run_workflow(chain(add.s(1, 2), double.s(), double.s()))
        assert (state.status, state.result) == ("success", 12)
        names = [e.task_name for e in qt.enqueued()]
        assert names == ["double", "double", "add", "double", "double"]
        assert await qt.run_pending() == []  # all handed out already
        with pytest.raises(TaskFailedError, match="negative: -1"):
            await app.add_tasks([double.s(5), double.s(-1)])
        with pytest.raises(TaskFailedError, match="negative: -3"):
            await app.run_workflow(chain(add.s(-1, -2), double.s()))


@pytest.mark.anyio
async def test_worker_run_pending_waits_for_add_tasks_and_workflows() -> None:
    app = make_bulk_app()
    add, double = app.tasks["add"], app.tasks["double"]
    async with Harness(app, mode="worker", timeout=5) as qt:
        tasks = await app.add_tasks([double.s(i) for i in range(3)])
        state = await app.run_workflow(chain(add.s(1, 2), double.s(), double.s()))
        with anyio.fail_after(5):
            done = await qt.run_pending()
        assert {t.uuid for t in tasks} | set(state.members) == {d.uuid for d in done}
        assert all(d.status is TaskStatus.SUCCESS for d in done)
        ended = await app.get_workflow(state.id)
        assert ended is not None
        assert (ended.status, ended.result) == ("success", 12)
        assert len(qt.enqueued(double)) == 5


@pytest.mark.anyio
async def test_expires_follows_the_harness_clock() -> None:
    app = AsyncQueueTasks()

    @app.task
    async def ping() -> str:
        return "pong"

    async with Harness(app, raise_task_errors=False) as qt:
        qt.freeze_time()
        late = await app.add_task("ping", delay=120, expires=60)
        (done,) = await qt.advance_time(3600)
        assert (done.uuid, done.status) == (late.uuid, TaskStatus.EXPIRED)
        # Measured from the clock as it is now, not from the wall clock it is an hour past.
        assert (await app.add_task("ping", expires=60)).returning == "pong"
        soon = await app.add_task("ping", delay=30, expires=60)
        assert soon.status is TaskStatus.NEW
        assert [r.returning for r in await qt.advance_time(30)] == ["pong"]


@pytest.mark.anyio
async def test_inline_rate_limit_waits_on_the_harness_clock() -> None:
    app = AsyncQueueTasks()

    @app.task(rate_limit="1/m")
    async def call(n: int) -> int:
        return n

    async with Harness(app, timeout=2, raise_task_errors=False) as qt:
        qt.freeze_time()
        start = qt.clock.time()
        with anyio.fail_after(5):
            assert (await app.add_task("call", 1)).returning == 1
            assert qt.clock.time() == start
            # Its token comes a minute later: the harness moves the clock to it.
            assert (await app.add_task("call", 2)).returning == 2
            assert 59 <= qt.clock.time() - start <= 61
            # No token before it expires: expired, as a worker would find it.
            hurried = await app.add_task("call", 3, expires=30)
        assert hurried.status is TaskStatus.EXPIRED


@pytest.mark.anyio
async def test_worker_rate_limit_waits_on_the_harness_clock() -> None:
    app = AsyncQueueTasks()

    @app.task(rate_limit="1/m")
    async def call(n: int) -> int:
        return n

    async with Harness(app, mode="worker", timeout=2) as qt:
        qt.freeze_time()
        start = qt.clock.time()
        tasks = [await app.add_task("call", n) for n in range(3)]
        with anyio.fail_after(5):
            done = await qt.run_pending()
        assert sorted(d.returning for d in done) == [0, 1, 2]
        assert {d.uuid for d in done} == {t.uuid for t in tasks}
        assert 119 <= qt.clock.time() - start <= 121


HELD = 20
"""Tasks of a ``10/s`` task in a row: each after the first is held back by 0.1 s, a wait the
flow gate takes itself (no hand-back to the broker) and, once, took in real time."""


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["inline", "worker"])
async def test_rate_limit_holds_move_the_fake_clock_instead_of_sleeping(mode: Mode) -> None:
    app = AsyncQueueTasks()

    @app.task(rate_limit="10/s")
    async def call(n: int) -> int:
        return n

    async with Harness(app, mode=mode, timeout=5) as qt:
        qt.freeze_time()
        start = qt.clock.time()
        began = time.monotonic()
        with anyio.fail_after(10):
            if mode == "inline":
                done = [await app.add_task("call", n) for n in range(HELD)]
            else:
                for n in range(HELD):
                    await app.add_task("call", n)
                done = await qt.run_pending()
        elapsed = time.monotonic() - began
    assert sorted(d.returning for d in done) == list(range(HELD))
    # The rate held on the fake clock: 0.1 s between starts ...
    assert qt.clock.time() - start >= (HELD - 1) * 0.1 - 0.01
    # ... and none of it in real time. Not a speed check: real sleeps would have taken at
    # least (HELD - 1) * 0.1 s; the bound is half of that, generous for a loaded machine.
    assert elapsed < (HELD - 1) * 0.1 / 2, f"{elapsed:.2f} s of real time for {HELD} tasks"


@pytest.mark.anyio
async def test_a_kept_global_config_on_another_clock_is_refused_for_rate_limits() -> None:
    app = AsyncQueueTasks(global_config=MemoryGlobalConfig())  # the monotonic clock

    @app.task(rate_limit="10/s")
    async def call() -> None:
        pass

    with pytest.raises(HarnessError, match=r"clock of its own.*\['call'\]"):
        await Harness(app, keep=["global_config"]).start()
    assert not app.started
    # On the harness's own clock it is accepted, and the rate holds on that clock.
    clock = FakeClock()
    app.global_config = MemoryGlobalConfig(clock=clock.time)
    async with Harness(app, keep=["global_config"], clock=clock, timeout=5) as qt:
        qt.freeze_time()
        start = clock.time()
        with anyio.fail_after(5):
            for _ in range(3):
                await app.add_task("call")
        assert clock.time() - start >= 0.2 - 0.01


def test_the_sync_harness_is_still_found_where_it_was() -> None:
    """``SyncHarness`` moved out of ``qtasks_testing.harness``; importing it from there, as
    code written before the move does, gives the same class."""
    import qtasks_testing
    from qtasks_testing.harness import SyncHarness

    assert SyncHarness is qtasks_testing.SyncHarness


@pytest.mark.parametrize("mode", ["inline", "worker"])
def test_worker_scoped_dependencies_are_torn_down_before_the_components_ones(mode: Mode) -> None:
    """A worker-scoped dependency may use a storage-scoped one (it does not outlive it), so
    its teardown runs first, as a worker's stop does in production. Inline, no worker run
    reports a stop: the worker scope used to be torn down after every component's, its
    teardown meeting a pool already closed."""
    app = QueueTasks()
    events: list[str] = []

    def pool() -> Iterator[list[str]]:
        events.append("pool open")
        yield events
        events.append("pool closed")

    def session(p: list[str] = Depends(pool, scope="storage")) -> Iterator[str]:
        events.append("session open")
        yield "session"
        events.append("session closed" + (" on a closed pool" if "pool closed" in p else ""))

    @app.task
    def use(s: str = Depends(session, scope="worker")) -> str:
        return s

    with SyncHarness(app, mode=mode) as qt:
        record = use.add_task()
        assert qt.wait(record).returning == "session"
    assert events == ["pool open", "session open", "session closed", "pool closed"]


def test_a_second_harness_on_the_same_app_is_refused_naming_the_cause() -> None:
    """Two harness fixtures in one test (``qtasks`` and ``qtasks_worker``), or nested
    harnesses: the error said the app was started by something at import time or by an
    earlier test, sending the user after a cause that is not theirs."""
    app = QueueTasks()
    with SyncHarness(app), pytest.raises(HarnessError) as caught:
        SyncHarness(app, mode="worker").__enter__()
    text = str(caught.value)
    assert "already has a harness" in text
    assert "qtasks_worker" in text
    assert "import time" not in text


@pytest.mark.parametrize("timeout", [0, -1, math.nan])
def test_a_timeout_that_leaves_no_time_is_refused(timeout: float) -> None:
    """``timeout=0`` made every call of the harness fail as a task that did not finish."""
    with pytest.raises(HarnessError, match="timeout must be a positive number of seconds"):
        SyncHarness(QueueTasks(), timeout=timeout)


@pytest.mark.parametrize("value", ["no", 0, None])
def test_raise_task_errors_takes_a_bool_only(value: object) -> None:
    """``@pytest.mark.qtasks(raise_task_errors="no")`` read as true without a word."""
    with pytest.raises(HarnessError, match="raise_task_errors must be True or False"):
        SyncHarness(QueueTasks(), raise_task_errors=value)  # type: ignore[arg-type]


def test_a_misspelt_task_name_in_an_assertion_is_refused() -> None:
    """``assert_not_enqueued("nofity")`` passed whatever the code did: nothing is ever
    enqueued under a typo. A name the app does not have, that nothing was enqueued under,
    and that is close to one of its tasks is refused, naming that task."""
    app = QueueTasks()

    @app.task
    def notify(user: str) -> str:
        return user

    with SyncHarness(app, raise_task_errors=False) as qt:
        notify.add_task("ada")
        for check in (qt.assert_not_enqueued, qt.assert_enqueued, qt.enqueued):
            with pytest.raises(HarnessError, match="did you mean 'notify'"):
                check("nofity")
        # A task of another app, enqueued by name, is a name the harness saw: no refusal.
        app.add_task("notify_v2", "bob")
        qt.assert_enqueued("notify_v2", "bob")
        qt.assert_not_enqueued("audit")  # not close to any task: nothing to suggest


def test_an_assertion_on_a_task_the_app_under_test_lacks_says_which_app_it_tested() -> None:
    """Walk-through of docs/testing.md without the ``qtasks_app`` ini option: the plugin's
    ``qtasks`` fixture harnessed a fresh app, the code under test enqueued through its own app
    (a ``new`` record in that app's memory, no worker), and ``assert_enqueued`` said only
    "send_email(...) was not enqueued; enqueued: nothing". It now says that the app under test
    has no such task, and how to test the app the code uses."""
    theirs = QueueTasks("theirs")

    @theirs.task
    def send_email(to: str) -> str:
        return to

    with SyncHarness(QueueTasks("fresh")) as qt:
        send_email.add_task("ada@example.org")  # through the app that is not under test
        with pytest.raises(AssertionError) as caught:
            qt.assert_enqueued("send_email", "ada@example.org")
        assert str(caught.value) == (
            "send_email('ada@example.org') was not enqueued; enqueued: nothing; the app under "
            "test ('fresh', 0 task(s)) has no task 'send_email': if the code enqueues it "
            "through another app, test that one (the pytest ini option qtasks_app = "
            "'module:app', a qtasks_app fixture returning it, or the harness built around it)"
        )
    theirs.close()
    with SyncHarness(theirs) as qt:  # the app the code uses: nothing more to say
        with pytest.raises(AssertionError) as caught:
            qt.assert_enqueued("send_email", "bob@example.org")
        assert str(caught.value).endswith("enqueued: nothing")


def test_call_given_a_blocking_method_of_the_sync_app_says_so() -> None:
    """``qt.call(task.add_task, ...)`` with a task of a sync app ran the blocking method on the
    app's loop: its error spoke of an ``async def`` task the test does not have."""
    app = QueueTasks()

    @app.task
    def echo(x: int) -> int:
        return x

    with SyncHarness(app) as qt:
        for blocking in (echo.add_task, app.add_task):
            with pytest.raises(HarnessError, match="blocking method of the sync app"):
                qt.call(blocking, 1)  # type: ignore[arg-type]  # the misuse under test
        assert qt.call(echo.aio.add_task, 2).returning == 2
