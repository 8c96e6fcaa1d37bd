"""Routers and ``shared_task``: tasks declared without an app (QTasks' example apps start so)."""

from __future__ import annotations

import anyio
import pytest

from qtasks import AsyncQueueTasks, AsyncRouter, QueueTasks, SyncRouter, shared_task
from qtasks.errors import TaskDeclarationError

WAIT = 10
pytestmark = pytest.mark.anyio


def test_sync_router_included_by_a_sync_app() -> None:
    router = SyncRouter()

    @router.task(description="Test router task.")
    def router_test() -> str:
        return "router_test"

    assert router_test() == "router_test"  # still callable in-process
    with pytest.raises(TaskDeclarationError, match="include_router"):
        router_test.add_task()
    app = QueueTasks()
    app.include_router(router)
    assert app.tasks["router_test"].options.description == "Test router task."
    try:
        with app:
            assert router_test.add_task(timeout=WAIT).returning == "router_test"
            assert app.add_task("router_test", timeout=WAIT).returning == "router_test"
    finally:
        app.close()


async def test_async_router_and_nested_router() -> None:
    inner = AsyncRouter()
    outer = AsyncRouter()

    @inner.task(name="double", retry=1)
    async def double(n: int) -> int:
        return n * 2

    outer.include_router(inner)
    app = AsyncQueueTasks()
    app.include_router(outer)
    with anyio.fail_after(WAIT):
        async with app:
            record = await double.add_task(21, timeout=WAIT)
    assert record.returning == 42


def test_shared_tasks_are_adopted_when_built_and_when_started() -> None:
    @shared_task(description="declared before the app", awaiting=True)
    async def early() -> str:
        return "early"

    app = QueueTasks()
    assert "early" in app.tasks

    @shared_task
    def late(x: int) -> int:  # a module of shared tasks imported after the app
        return x + 1

    try:
        with app:
            assert early.add_task(timeout=WAIT).returning == "early"
            assert late.add_task(1, timeout=WAIT).returning == 2
    finally:
        app.close()


def test_an_apps_own_task_wins_over_a_shared_one() -> None:
    @shared_task(name="clash")
    def shared() -> str:
        return "shared"

    app = AsyncQueueTasks()
    del app.tasks["clash"]

    @app.task(name="clash")
    def own() -> str:
        return "own"

    app2 = QueueTasks()
    assert app2.tasks["clash"].func is shared.func
    from qtasks.routers import shared_tasks

    shared_tasks.adopt(app)
    assert app.tasks["clash"].func is own.func
