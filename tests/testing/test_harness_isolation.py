"""The harness keeps one test apart from the others: declarations enqueue through the app under
test."""

from __future__ import annotations

import pytest

from qtasks import AsyncQueueTasks, QueueTasks, TaskStatus
from qtasks.routers import Router
from qtasks_testing import SyncHarness

pytest_plugins = ["pytester"]


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
