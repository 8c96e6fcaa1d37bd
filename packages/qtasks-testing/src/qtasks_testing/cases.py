"""unittest test cases that test code using a qtasks app without servers or a worker process."""

from __future__ import annotations

import unittest
from collections.abc import Collection
from typing import Any, ClassVar

from qtasks.app import AsyncQueueTasks
from qtasks.sync import QueueTasks
from qtasks.task import TaskDef
from qtasks_testing.harness import Harness, HarnessError, Mode
from qtasks_testing.records import EnqueuedTask
from qtasks_testing.sync_harness import SyncHarness


class _Options:
    qtasks_app: ClassVar[QueueTasks | AsyncQueueTasks | None] = None
    """The app under test (the object your code imports). ``None``: a fresh in-memory app per
    test, reachable as ``self.qtasks.app``."""
    qtasks_mode: ClassVar[Mode] = "inline"
    """``"inline"``: a task added runs at once and ``add_task`` returns its final record.
    ``"worker"``: a real worker runs in the background for the test."""
    qtasks_keep: ClassVar[Collection[str]] = ()
    """Components to keep instead of swapping for in-memory ones: ``"broker"``, ``"storage"``,
    ``"global_config"``."""
    qtasks_raise_task_errors: ClassVar[bool] = True
    """A task that ends in ``error`` raises ``TaskFailedError`` (with its traceback) where the
    harness hands out its record."""
    qtasks_timeout: ClassVar[float] = 10.0
    """Seconds to wait for a result before failing."""

    def _options(self) -> dict[str, Any]:
        return {
            "mode": self.qtasks_mode,
            "keep": self.qtasks_keep,
            "raise_task_errors": self.qtasks_raise_task_errors,
            "timeout": self.qtasks_timeout,
        }


class SyncTestCase(_Options, unittest.TestCase):
    """A ``TestCase`` whose tests run against ``qtasks_app`` with in-memory components.

    ``setUp`` swaps the components and starts the harness (``self.qtasks``, a
    :class:`~qtasks_testing.sync_harness.SyncHarness`); a cleanup stops it and restores the app.
    Override ``setUp`` only with a call to ``super().setUp()``.
    """

    qtasks: SyncHarness

    def setUp(self) -> None:
        super().setUp()
        app = self.qtasks_app if self.qtasks_app is not None else QueueTasks()
        self.qtasks = SyncHarness(app, **self._options())
        self.addCleanup(self.qtasks.close)
        self.qtasks.start()

    def assertTaskEnqueued(
        self, task: str | TaskDef[..., Any], /, *args: Any, **kwargs: Any
    ) -> EnqueuedTask:
        """Assert ``task`` was enqueued (with exactly these arguments, if any)."""
        return self.qtasks.assert_enqueued(task, *args, **kwargs)

    def assertTaskNotEnqueued(
        self, task: str | TaskDef[..., Any], /, *args: Any, **kwargs: Any
    ) -> None:
        """Assert ``task`` was not enqueued (with these arguments, if any)."""
        self.qtasks.assert_not_enqueued(task, *args, **kwargs)


class AsyncTestCase(_Options, unittest.IsolatedAsyncioTestCase):
    """An ``IsolatedAsyncioTestCase`` for an :class:`~qtasks.AsyncQueueTasks` app.

    ``asyncSetUp`` starts the harness (``self.qtasks``, a :class:`~qtasks_testing.harness.Harness`)
    in the test's event loop; an async cleanup stops it and restores the app. Override
    ``asyncSetUp`` only with a call to ``await super().asyncSetUp()``.
    """

    qtasks: Harness

    async def asyncSetUp(self) -> None:
        await super().asyncSetUp()
        app = self.qtasks_app if self.qtasks_app is not None else AsyncQueueTasks()
        if isinstance(app, QueueTasks):
            raise HarnessError(
                "AsyncTestCase tests an AsyncQueueTasks app; use SyncTestCase for a QueueTasks app"
            )
        self.qtasks = Harness(app, **self._options())
        self.addAsyncCleanup(self.qtasks.close)
        await self.qtasks.start()

    def assertTaskEnqueued(
        self, task: str | TaskDef[..., Any], /, *args: Any, **kwargs: Any
    ) -> EnqueuedTask:
        """Assert ``task`` was enqueued (with exactly these arguments, if any)."""
        return self.qtasks.assert_enqueued(task, *args, **kwargs)

    def assertTaskNotEnqueued(
        self, task: str | TaskDef[..., Any], /, *args: Any, **kwargs: Any
    ) -> None:
        """Assert ``task`` was not enqueued (with these arguments, if any)."""
        self.qtasks.assert_not_enqueued(task, *args, **kwargs)
