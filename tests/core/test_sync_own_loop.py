"""An ``async def`` task of the sync app runs on the app's own loop, where its blocking calls
would wait for themselves (review r19 #5): they raise a ``ComponentError`` naming the awaitable
forms, and those forms (``task.aio``, ``app.aio``, an echo task's ``self``) work."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from qtasks import QueueTasks, TaskStatus


def make_app() -> tuple[QueueTasks, Any]:
    app = QueueTasks("own-loop")

    @app.task
    def child(x: int) -> int:
        return x * 2

    return app, child


BLOCKING: dict[str, Callable[[QueueTasks, Any], object]] = {
    "task.add_task": lambda app, child: child.add_task(1),
    "app.add_task": lambda app, child: app.add_task("child", 1),
    "app.get": lambda app, child: app.get("0" * 32),
}


@pytest.mark.parametrize("call", list(BLOCKING))
def test_a_blocking_call_on_the_apps_loop_says_what_to_await(call: str) -> None:
    app, child = make_app()

    @app.task
    async def parent() -> None:
        BLOCKING[call](app, child)

    try:
        with app:
            record = app.add_task("parent", timeout=10)
    finally:
        app.close()
    assert record.status is TaskStatus.ERROR
    last = (record.traceback or "").strip().splitlines()[-1]
    assert last.startswith("qtasks.errors.ComponentError: app 'own-loop'"), last
    assert "`await app.aio.add_task(...)`" in last
    assert "`await task.aio.add_task(...)`" in last


def test_the_awaitable_forms_work_in_an_async_task_of_the_sync_app() -> None:
    app, child = make_app()

    @app.task
    async def parent(x: int) -> int:
        by_task = await child.aio.add_task(x)
        by_app = await app.aio.add_task("child", x + 1, timeout=10)
        total: int = (await by_task.wait_result(timeout=10)).returning + by_app.returning
        return total

    @app.task(echo=True)
    async def echoed(self: Any, x: int) -> int:
        return (await self.add_task("child", x, timeout=10)).returning  # type: ignore[no-any-return]

    try:
        with app:
            assert app.add_task("parent", 20, timeout=10).returning == 82
            assert app.add_task("echoed", 5, timeout=10).returning == 10
            # The same blocking calls still work from this (another) thread.
            assert child.add_task(4, timeout=10).returning == 8
    finally:
        app.close()
