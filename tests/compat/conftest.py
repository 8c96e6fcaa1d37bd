"""Fixtures of the QTasks-compatibility tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qtasks.routers import shared_tasks


@pytest.fixture(autouse=True)
def no_leftover_shared_tasks() -> Iterator[None]:
    """``@shared_task`` declarations are process-wide (every app adopts them): forget the ones
    a test declared, so apps of later tests do not grow its tasks."""
    before = dict(shared_tasks.tasks)
    yield
    shared_tasks.tasks.clear()
    shared_tasks.tasks.update(before)
