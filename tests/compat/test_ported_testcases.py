"""QTasks' tests/sync/test_sync_task.py and tests/async/test_async_task.py in their own shape:
``SyncTestCase(app=app)`` / ``AsyncTestCase(app=app)`` with ``TestConfig.full()``; in memory the
worker is started in the test process, on Redis it is another process (as QTasks ran them)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any
from uuid import uuid4

import pytest
from ported import load, serve, stop, wait_alive

from qtasks.enums.task_status import TaskStatusEnum
from qtasks.errors import ConfigError, TaskTimeoutError
from qtasks.schemas.test import TestConfig
from qtasks.tests import AsyncTestCase, SyncTestCase


@pytest.fixture(params=["memory", pytest.param("redis", marks=[pytest.mark.redis])])
def sync_case(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    if request.param == "redis":
        env = request.getfixturevalue("redis_env")
    app = load("app_sync", monkeypatch).app
    case = SyncTestCase(app=app)
    case.settings(TestConfig.full())
    if request.param == "memory":
        case.start_in_background()
        yield case
        case.stop()
        return
    proc = serve("app_sync", env)
    try:
        wait_alive(app.ping, proc)
        yield case
    finally:
        stop(proc)
        case.stop()


def test_task_get_result(sync_case: Any) -> None:
    task = sync_case.add_task("test", 5)
    result = sync_case.app.get(uuid=task.uuid)
    assert result is not None


def test_task_get_wait_and_error_and_result(sync_case: Any) -> None:
    result = sync_case.add_task("test", 5, timeout=500)
    assert result.status == TaskStatusEnum.SUCCESS.value
    result = sync_case.add_task("error_task", timeout=500)
    assert result.status == TaskStatusEnum.ERROR.value
    result = sync_case.add_task("test", 5, timeout=500)
    assert result.returning == "User 5 saved"


def test_task_not_found(sync_case: Any) -> None:
    assert sync_case.app.get(uuid=str(uuid4())) is None


def test_task_timeout(sync_case: Any) -> None:
    with pytest.raises(TaskTimeoutError):  # QTasks: `assert result is None`
        sync_case.add_task("slow", timeout=0.1)


@pytest.fixture
async def async_case(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    app = load("app_async", monkeypatch).app
    case = AsyncTestCase(app=app)
    case.settings(TestConfig.full())
    await case.start_in_background()
    yield case
    await case.stop()


@pytest.mark.anyio
async def test_async_test_case(async_case: Any) -> None:
    task = await async_case.add_task("test", 5)
    assert await async_case.app.get(uuid=task.uuid) is not None
    result = await async_case.add_task("test", 5, timeout=500)
    assert result.status == TaskStatusEnum.SUCCESS.value
    assert result.returning == "User 5 saved"
    result = await async_case.add_task("error_task", timeout=500)
    assert result.status == TaskStatusEnum.ERROR.value
    with pytest.raises(TaskTimeoutError):
        await async_case.add_task("slow", timeout=0.1)


def test_stub_settings_are_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    case = SyncTestCase(app=load("app_sync", monkeypatch).app)
    with pytest.raises(ConfigError, match="stubs that ran nothing"):
        case.settings(TestConfig.only_worker())
    case.stop()
