"""Fixtures of the QTasks-compatibility tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from ported import APPS

from qtasks.routers import shared_tasks


@pytest.fixture(autouse=True)
def no_leftover_shared_tasks() -> Iterator[None]:
    """``@shared_task`` declarations are process-wide (every app adopts them): forget the ones
    a test declared, so apps of later tests do not grow its tasks."""
    before = dict(shared_tasks.tasks)
    yield
    shared_tasks.tasks.clear()
    shared_tasks.tasks.update(before)


@pytest.fixture
def redis_env(redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("PORT_REDIS_URL", redis_url)
    monkeypatch.setenv("PORT_REDIS_PREFIX", prefix)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
    env["PYTHONPATH"] = os.pathsep.join([str(APPS), env.get("PYTHONPATH", "")])
    return env
