"""The harness keeps one test apart from the others: declarations enqueue through the app under
test, and what a test adds to the app (tasks, shared tasks, plugins, middlewares, event
handlers) is taken off when its harness closes."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from qtasks import AsyncQueueTasks, QueueTasks, TaskStatus, shared_task
from qtasks.context import SyncTaskHandle
from qtasks.plugins import hookimpl
from qtasks.record import TaskRecord
from qtasks.routers import Router, shared_tasks
from qtasks_testing import SyncHarness

pytest_plugins = ["pytester"]


def module_level_task() -> str:
    return "module"


class Spy:
    name = "spy"

    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl
    def qtasks_storage_added(self, record: TaskRecord) -> None:
        self.seen.append(record.task_name)


def test_router_tasks_enqueue_through_the_app_under_test() -> None:
    """An app that bound the declaration after the app under test (an earlier test's fixture
    app, or one built during the test) must not take the test's enqueues."""
    router = Router()

    @router.task
    def ping(n: int) -> str:
        return f"pong {n}"

    app = QueueTasks()
    app.include_router(router)
    earlier = QueueTasks()
    earlier.include_router(router)
    with SyncHarness(app) as qt:
        later = AsyncQueueTasks()
        later.include_router(router)
        done = ping.add_task(2)
        assert (done.status, done.returning) == (TaskStatus.SUCCESS, "pong 2")
        qt.assert_enqueued("ping", 2)
    # The binding found before the harness is back; the app built during the test is not it.
    assert ping.task.app is earlier.aio


SHARED_PROJECT = """
from qtasks import QueueTasks, shared_task


@shared_task
def ping(x):
    return f"pong {x}"


app = QueueTasks()
"""

SHARED_TESTS = """
import project
from qtasks import AsyncQueueTasks, TaskStatus
from qtasks_testing import SyncHarness


def test_1_a_fixture_app_adopts_the_shared_task(qtasks):
    assert project.ping.add_task(1).returning == "pong 1"


def test_2_the_project_app_runs_it():
    with SyncHarness(project.app) as qt:
        done = project.ping.add_task(2)
        assert (done.status, done.returning) == (TaskStatus.SUCCESS, "pong 2")
        qt.assert_enqueued("ping", 2)


def test_3_an_app_built_during_the_test_does_not_take_it():
    with SyncHarness(project.app) as qt:
        AsyncQueueTasks()
        done = project.ping.add_task(3)
        assert (done.status, done.returning) == (TaskStatus.SUCCESS, "pong 3")
        qt.assert_enqueued("ping", 3)
"""


def test_shared_tasks_do_not_depend_on_the_tests_that_ran_before(
    pytester: pytest.Pytester,
) -> None:
    # In a subprocess: shared tasks are process-wide.
    pytester.makepyfile(project=SHARED_PROJECT, test_shared=SHARED_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:asyncio", "-p", "no:anyio")
    result.assert_outcomes(passed=3)


def declare_and_run(app: QueueTasks, spy: Spy) -> None:
    """A test's body: declares a task, adds a plugin, a middleware and an event handler."""
    app.add_plugin(spy)
    ran: list[str] = []

    async def middleware(run: Any, call_next: Any) -> Any:
        ran.append(run.task.name)
        return await call_next()

    app.add_middleware(middleware)

    @app.events.on.task_success()  # type: ignore[untyped-decorator]  # QTasks' events: dynamic
    def succeeded(*args: Any, **kwargs: Any) -> None:
        ran.append("event")

    @app.task
    def made_in_the_test() -> int:
        return 1

    assert made_in_the_test.add_task().returning == 1
    assert spy.seen == ["made_in_the_test"]
    assert ran.count("made_in_the_test") == 1
    assert "event" in ran


def test_what_a_test_adds_to_the_app_is_taken_off_after_it() -> None:
    app = QueueTasks()

    @app.task
    def kept() -> str:
        return "kept"

    plugins = set(app.hooks.pm.get_plugins())
    spy = Spy()
    for _run in range(2):  # a parametrized test, run twice
        with SyncHarness(app):
            declare_and_run(app, spy)
            app.task(module_level_task)  # as a module imported during the test does
        assert sorted(app.tasks) == ["kept", "module_level_task"]
        assert set(app.hooks.pm.get_plugins()) == plugins
        assert app.middlewares == []
        assert "_events" not in vars(app.aio)
        del app.tasks["module_level_task"]
        spy.seen.clear()
    with SyncHarness(app):
        assert kept.add_task().returning == "kept"
        assert spy.seen == []


def test_event_handlers_added_during_a_test_are_taken_off() -> None:
    app = QueueTasks()
    before: list[str] = []
    app.events.on.task_success()(lambda *a, **k: before.append("app"))
    with SyncHarness(app):
        app.events.on.task_success()(lambda *a, **k: None)
    assert [len(handlers) for handlers in app.events.handlers.values()] == [1]


LAZY_PROJECT = """
from qtasks import QueueTasks

app = QueueTasks()


@app.task
def send(to: str) -> str:
    from lazy_audit import record  # imported on first use, by the code under test

    return record(to)
"""

LAZY_AUDIT = """
from qtasks.plugins import hookimpl

from lazy_project import app

seen = []


class Audit:
    name = "lazy-audit"

    @hookimpl
    def qtasks_task_succeeded(self, record):
        seen.append(("plugin", record.task_name))


async def middleware(run, call_next):
    seen.append(("middleware", run.task.name))
    return await call_next()


app.add_plugin(Audit())
app.add_middleware(middleware)


@app.events.on.task_success()
def succeeded(*args, **kwargs):
    seen.append(("event", "task_success"))


def record(to):
    return f"sent to {to}"
"""


def test_what_a_module_imported_during_a_test_adds_stays_with_it(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The module stays imported and will not add its plugin again: taken off, it would be
    missing from every later test, which would depend on the order tests run in."""
    import importlib

    (tmp_path / "lazy_project.py").write_text(LAZY_PROJECT)
    (tmp_path / "lazy_audit.py").write_text(LAZY_AUDIT)
    monkeypatch.syspath_prepend(tmp_path)
    for module in ("lazy_project", "lazy_audit"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    project = importlib.import_module("lazy_project")
    with SyncHarness(project.app):
        assert project.send.add_task("ada").returning == "sent to ada"
    audit = sys.modules["lazy_audit"]
    audit.seen.clear()
    with SyncHarness(project.app):
        assert project.send.add_task("bob").returning == "sent to bob"
    assert sorted(audit.seen) == [
        ("event", "task_success"),
        ("middleware", "send"),
        ("plugin", "send"),
    ]


def declare_a_shared_task() -> Any:
    @shared_task
    def made_in_a_test() -> str:
        return "x"

    return made_in_a_test


def test_shared_tasks_declared_during_a_test_are_dropped_after_it() -> None:
    app = QueueTasks()
    try:
        for _run in range(2):  # a parametrized test: the second declaration must not raise
            with SyncHarness(app):
                declare_a_shared_task()
            assert "made_in_a_test" not in shared_tasks.tasks
            assert "made_in_a_test" not in QueueTasks().tasks
    finally:
        shared_tasks.tasks.pop("made_in_a_test", None)  # this process's other tests


def test_ctx_sleep_inline_after_a_harness_with_a_worker() -> None:
    """A harness with a worker stops the app's worker when it closes. The next test's inline
    harness runs tasks through that same worker (not serving): its stop is over, so a task's
    ``ctx.sleep`` must sleep, not hand the task back as if the worker were stopping (which
    redelivered it in a busy loop until the harness's timeout)."""
    app = QueueTasks()
    runs: list[int] = []

    @app.task(echo=True)
    def nap(self: SyncTaskHandle, seconds: float) -> str:
        runs.append(self.ctx.attempt)
        self.ctx.sleep(seconds)
        return "rested"

    with SyncHarness(app, mode="worker") as qt:
        assert qt.wait(nap.add_task(0.01)).returning == "rested"
    runs.clear()
    with SyncHarness(app, timeout=5):
        assert nap.add_task(0.01).returning == "rested"
    assert runs == [1]
