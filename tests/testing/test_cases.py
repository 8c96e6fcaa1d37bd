"""SyncTestCase and AsyncTestCase: run as users run them, and through a unittest runner to check
what a failing task puts in the test output."""

# These tests are written the way unittest users write them (assertEqual, assertRaises).
# ruff: noqa: PT009, PT027

from __future__ import annotations

import io
import unittest
from typing import Any

from qtasks import AsyncQueueTasks, QueueTasks, TaskStatus
from qtasks.errors import TaskFailedError
from qtasks_testing import AsyncTestCase, SyncTestCase

# The "project" under test: an app with tasks, and code that enqueues them.
app = QueueTasks()
ORIGINAL_BROKER = app.aio.broker
sent: list[str] = []


@app.task(retry=2, retry_backoff=60)
def send_email(to: str, subject: str = "hi") -> str:
    sent.append(to)
    if to.startswith("flaky") and sent.count(to) < 2:
        raise ConnectionError("smtp down")
    return f"sent to {to}"


@app.task
def divide(a: int, b: int) -> float:
    return a / b


@app.task(echo=True)
def signup_flow(self: Any, user: str) -> str:
    self.add_task("send_email", user, subject="welcome")
    return "signed up"


def signup(user: str) -> str:
    """Code under test: it imports `app` and enqueues through it."""
    return str(signup_flow.add_task(user).returning)


aio_app = AsyncQueueTasks()


@aio_app.task
async def double(n: int) -> int:
    return n * 2


@aio_app.task
async def report(n: int) -> Any:
    for i in range(n):
        yield i


class SignupTests(SyncTestCase):
    qtasks_app = app

    def setUp(self) -> None:
        super().setUp()
        sent.clear()

    def test_inline_runs_the_task_and_its_children(self) -> None:
        self.assertEqual(signup("ada@example.org"), "signed up")
        self.assertTaskEnqueued("send_email", "ada@example.org", subject="welcome")
        self.assertTaskNotEnqueued(send_email, "bob@example.org")
        self.assertEqual(sent, ["ada@example.org"])

    def test_components_are_in_memory_while_testing(self) -> None:
        self.assertIsNot(app.aio.broker, ORIGINAL_BROKER)

    def test_retries_run_without_the_backoff(self) -> None:
        task = send_email.add_task("flaky@example.org")
        self.assertEqual((task.status, task.attempt), (TaskStatus.SUCCESS, 2))

    def test_delayed_task_runs_when_time_advances(self) -> None:
        self.qtasks.freeze_time()
        task = send_email.add_task("later@example.org", delay=3600)
        self.assertEqual(task.status, TaskStatus.NEW)
        self.assertEqual(sent, [])
        self.qtasks.advance_time(3600)
        self.assertEqual(sent, ["later@example.org"])
        self.assertEqual(self.qtasks.wait(task).returning, "sent to later@example.org")

    def test_failing_task_raises_with_traceback(self) -> None:
        with self.assertRaises(TaskFailedError) as caught:
            divide.add_task(1, 0)
        self.assertIn("ZeroDivisionError", str(caught.exception))
        self.assertIn("return a / b", str(caught.exception))


class SignupWorkerTests(SyncTestCase):
    qtasks_app = app
    qtasks_mode = "worker"

    def test_worker_runs_tasks_in_the_background(self) -> None:
        tasks = [send_email.add_task(f"user{i}@example.org") for i in range(5)]
        done = self.qtasks.run_pending()
        self.assertEqual({t.uuid for t in done}, {t.uuid for t in tasks})
        self.assertTrue(all(t.status is TaskStatus.SUCCESS for t in done))


class AsyncInlineTests(AsyncTestCase):
    qtasks_app = aio_app

    async def test_inline(self) -> None:
        self.assertEqual((await double.add_task(21)).returning, 42)
        task = await report.add_task(3)
        self.assertEqual(task.returning, [0, 1, 2])
        self.assertTaskEnqueued(double, 21)


class AsyncWorkerTests(AsyncTestCase):
    qtasks_app = aio_app
    qtasks_mode = "worker"

    async def test_worker(self) -> None:
        task = await double.add_task(4)
        self.assertEqual((await self.qtasks.wait(task)).returning, 8)


def test_app_restored_after_the_cases() -> None:
    assert app.aio.broker is ORIGINAL_BROKER
    assert "enqueue" not in vars(app.aio)
    assert not app.aio.started


def run_case(case: type[unittest.TestCase]) -> tuple[unittest.TestResult, str]:
    stream = io.StringIO()
    suite = unittest.defaultTestLoader.loadTestsFromTestCase(case)
    result = unittest.TextTestRunner(stream=stream, verbosity=2).run(suite)
    return result, stream.getvalue()


def test_a_failing_task_shows_its_traceback_in_the_unittest_output() -> None:
    class UserTests(SyncTestCase):
        qtasks_app = app

        def test_divides(self) -> None:
            self.assertEqual(divide.add_task(1, 0).returning, 0)

    result, output = run_case(UserTests)
    assert len(result.errors) == 1
    assert "TaskFailedError: task divide(1, 0)" in output
    assert "failed: ZeroDivisionError: division by zero" in output
    assert "return a / b" in output  # the line inside the task, from the worker's traceback
    assert app.aio.broker is ORIGINAL_BROKER


def test_async_case_refuses_a_sync_app() -> None:
    class Wrong(AsyncTestCase):
        qtasks_app = app

        async def test_nothing(self) -> None:
            pass

    result, output = run_case(Wrong)
    assert len(result.errors) == 1
    assert "use SyncTestCase for a QueueTasks app" in output
