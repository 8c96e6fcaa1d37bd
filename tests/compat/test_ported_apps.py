"""QTasks' own test apps and example apps (ported in qtasks_apps/) run against qtasks: in memory
in this process, and on Redis with the worker in another process (``qtasks -A mod:app run``).

QTasks' tests drive the app through its ``SyncTestCase``/``AsyncTestCase``; qtasks' test cases
differ (docs/coming-from-qtasks.md), so these call the app itself with the same arguments.
One assertion differs on purpose: a wait that times out raises ``TaskTimeoutError`` where QTasks
returned ``None``.
"""

from __future__ import annotations

import time
from types import ModuleType
from typing import Any
from uuid import uuid4

import anyio
import pytest
from ported import load, serve, stop, wait_alive

from qtasks.enums.task_status import TaskStatusEnum
from qtasks.errors import TaskTimeoutError

WAIT = 20

# --- tests/sync/test_sync_task.py and tests/async/test_async_task.py -----------------------


def check_sync_app(app: Any) -> None:
    task = app.add_task("test", 5)
    assert app.get(uuid=task.uuid) is not None
    result = app.add_task("test", 5, timeout=500)
    assert result.status == TaskStatusEnum.SUCCESS.value
    result = app.add_task("error_task", timeout=500)
    assert result.status == TaskStatusEnum.ERROR.value
    result = app.add_task("test", 5, timeout=500)
    assert result.returning == "User 5 saved"
    assert app.get(uuid=str(uuid4())) is None
    with pytest.raises(TaskTimeoutError):  # QTasks returned None on timeout; qtasks raises
        app.add_task("slow", timeout=0.1)


async def check_async_app(app: Any) -> None:
    task = await app.add_task("test", 5)
    assert await app.get(uuid=task.uuid) is not None
    result = await app.add_task("test", 5, timeout=500)
    assert result.status == TaskStatusEnum.SUCCESS.value
    result = await app.add_task("error_task", timeout=500)
    assert result.status == TaskStatusEnum.ERROR.value
    result = await app.add_task("test", 5, timeout=500)
    assert result.returning == "User 5 saved"
    assert await app.get(uuid=str(uuid4())) is None
    with pytest.raises(TaskTimeoutError):
        await app.add_task("slow", timeout=0.1)


def test_qtasks_sync_test_app_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    app = load("app_sync", monkeypatch).app
    try:
        with app:
            check_sync_app(app)
    finally:
        app.close()


@pytest.mark.anyio
async def test_qtasks_async_test_app_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    app = load("app_async", monkeypatch).app
    with anyio.fail_after(WAIT):
        async with app:
            await check_async_app(app)


@pytest.mark.redis
@pytest.mark.slow
def test_qtasks_sync_test_app_on_redis_with_a_worker_process(
    redis_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = load("app_sync", monkeypatch).app  # the producer, as QTasks' tests are
    proc = serve("app_sync", redis_env)
    try:
        wait_alive(app.ping, proc)
        check_sync_app(app)
    finally:
        stop(proc)
        app.close()


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_qtasks_async_test_app_on_redis_with_a_worker_process(
    redis_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = load("app_async", monkeypatch).app
    proc = serve("app_async", redis_env)
    try:
        deadline = time.monotonic() + WAIT
        while not await app.ping():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the worker did not start"
            await anyio.sleep(0.1)
        await check_async_app(app)
    finally:
        stop(proc)
        await app.aclose()


# --- the example apps ------------------------------------------------------------------------


def check_sync_example(module: ModuleType) -> None:
    app = module.app
    assert sorted(app.tasks) == sorted(
        [
            "async_test",
            "error_zero",
            "example_error_timeout",
            "example_pydantic",
            "router_test",
            "sync_test",
            "test",
            "test_echo",
            "test_num",
            "test_yield",
        ]
    )
    assert app.add_task("test", timeout=WAIT).returning == "It's a test task!"
    assert app.add_task("test_echo", timeout=WAIT).returning == "Task test_num, Result: 5"
    retried = app.add_task("error_zero", timeout=WAIT)
    assert retried.status == TaskStatusEnum.ERROR.value and retried.attempt == 6
    assert app.add_task("test_yield", n=3, timeout=WAIT).returning == [4, 5, 6]
    record = module.example_pydantic.add_task("Test", value=42, timeout=WAIT)
    assert record.returning == "Hello, Test!"
    timed_out = app.add_task("example_error_timeout", timeout=WAIT)
    assert timed_out.status == TaskStatusEnum.ERROR.value and "max_time" in (timed_out.error or "")
    assert module.router_tasks.router_test.add_task(timeout=WAIT).returning == "router_test"
    assert app.add_task("sync_test", timeout=WAIT).returning == [10, 20]
    assert app.add_task("async_test", timeout=WAIT).returning == "async_test"


def test_qtasks_sync_example_app_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load("example_sync", monkeypatch)
    app = module.app
    try:
        with app:
            check_sync_example(module)
    finally:
        app.close()
    assert module.marks.seen == ["example_pydantic"]
    # The QTasks TaskMiddleware class ran after each shared task.
    calls = module.shared_tasks.MyTaskMiddleware.__call__.__globals__["CALLS"]
    assert calls == ["sync_test", "async_test"]


@pytest.mark.redis
@pytest.mark.slow
def test_qtasks_sync_example_app_on_redis_with_a_worker_process(
    redis_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    module = load("example_sync", monkeypatch)
    proc = serve("example_sync", redis_env)
    try:
        wait_alive(module.app.ping, proc)
        check_sync_example(module)
    finally:
        stop(proc)
        module.app.close()


async def check_async_example(module: ModuleType) -> None:
    app = module.app
    assert (await app.add_task("test", timeout=WAIT)).returning == "It's a test task!"
    echo = await app.add_task("test_echo", timeout=WAIT)
    assert echo.returning == "Task test_num, result: 5"
    assert (await app.add_task("test_yield", n=2, timeout=WAIT)).returning == [5, 6]
    retried = await app.add_task("test_retry", timeout=WAIT)
    assert retried.status == TaskStatusEnum.ERROR.value and retried.attempt == 3
    record = await module.example_pydantic.add_task("Test", 42, timeout=WAIT)
    assert record.returning == '"Hello, Test!"'
    ctx = await app.add_task("test_echo_ctx", timeout=WAIT)
    assert ctx.status == TaskStatusEnum.CANCEL.value
    assert ctx.cancel_reason == "Test task cancelled"
    late = await app.add_task("example_error_timeout", timeout=WAIT)
    assert late.status == TaskStatusEnum.ERROR.value


@pytest.mark.anyio
async def test_qtasks_async_example_app_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load("example_async", monkeypatch)
    with anyio.fail_after(WAIT):
        async with module.app:
            await check_async_example(module)


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_qtasks_async_example_app_on_redis_with_a_worker_process(
    redis_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    module = load("example_async", monkeypatch)
    proc = serve("example_async", redis_env)
    try:
        deadline = time.monotonic() + WAIT
        while not await module.app.ping():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the worker did not start"
            await anyio.sleep(0.1)
        with anyio.fail_after(2 * WAIT):
            await check_async_example(module)
    finally:
        stop(proc)
        await module.app.aclose()
