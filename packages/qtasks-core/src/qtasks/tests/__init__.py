"""``from qtasks.tests import SyncTestCase, AsyncTestCase`` (QTasks' path), so QTasks' test files
run with their call shapes: ``case = SyncTestCase(app=app)``, ``case.settings(TestConfig.full())``,
``case.add_task("test", 5, timeout=500)``, ``case.get(uuid)``.

They drive the app itself, as QTasks' did with ``TestConfig.full()``: tasks run on a worker,
either one started elsewhere (``qtasks -A app:app run``, QTasks' way) or one in the test process
(``start_in_background()``, which QTasks left unfinished). QTasks' other settings replaced
components with stubs that did nothing, so no task could run; they are refused with that
reason. For tests without servers use ``qtasks_testing`` (in-memory components, tasks run
inline or on a worker).
"""

from __future__ import annotations

from typing import Any

from qtasks.app import AsyncQueueTasks
from qtasks.errors import ConfigError
from qtasks.schemas.test import TestConfig
from qtasks.sync import QueueTasks

_STUBS = (
    "TestConfig without every component ({config}) is not supported: QTasks replaced the "
    "others with stubs that ran nothing. Use TestConfig.full() with a worker (another "
    "process, or start_in_background()), or qtasks_testing's test cases, which run tasks "
    "with in-memory components."
)


class _Settings:
    """What both test cases share: the app, a name, and QTasks' ``TestConfig`` (full only)."""

    __test__ = False

    def __init__(self, app: Any, name: str | None = None) -> None:
        self.app = app
        self.name = name
        self.test_config = TestConfig.full()

    def settings(self, test_config: TestConfig) -> None:
        if not test_config.is_full:
            raise ConfigError(_STUBS.format(config=test_config))
        self.test_config = test_config


class SyncTestCase(_Settings):
    """QTasks' sync test case over a :class:`~qtasks.QueueTasks`."""

    app: QueueTasks

    def add_task(
        self,
        task_name: str,
        *args: Any,
        priority: int | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """``app.add_task``; with ``timeout`` it waits (and raises ``TaskTimeoutError``)."""
        return self.app.add_task(task_name, *args, priority=priority, timeout=timeout, **kwargs)

    def get(self, uuid: str) -> Any:
        return self.app.get(uuid)

    def start(self) -> None:
        """Serve in this thread until stopped (``app.run_forever()``)."""
        self.app.run_forever()

    def start_in_background(self) -> None:
        """Serve in the app's background loop, as ``with app:`` does, until :meth:`stop`."""
        self.app.__enter__()

    def stop(self) -> None:
        self.app.close()


class AsyncTestCase(_Settings):
    """QTasks' async test case over an :class:`~qtasks.AsyncQueueTasks`."""

    app: AsyncQueueTasks

    async def add_task(
        self,
        task_name: str,
        *args: Any,
        priority: int | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        return await self.app.add_task(
            task_name, *args, priority=priority, timeout=timeout, **kwargs
        )

    async def get(self, uuid: str) -> Any:
        return await self.app.get(uuid)

    async def start_in_background(self) -> None:
        """Serve in the running event loop until :meth:`stop` (``async with app``)."""
        await self.app.__aenter__()

    async def stop(self) -> None:
        await self.app.aclose()


__all__ = ["AsyncTestCase", "SyncTestCase"]
