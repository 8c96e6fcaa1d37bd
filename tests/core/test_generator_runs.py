"""A generator task that runs more than once, on the memory components (the scenarios are in
``generator_run_scenarios.py``, shared with Redis); and a storage written before fenced steps,
which the worker calls without a fence."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from generator_run_scenarios import (
    WAIT,
    a_retried_generator_is_marked_where_it_starts_over,
    a_step_after_a_cancel_is_not_stored_and_the_run_ends_cancelled,
    a_step_of_a_run_whose_lease_was_lost_is_refused_and_the_run_stops,
)

from qtasks import AsyncQueueTasks, MemoryStorage

pytestmark = pytest.mark.anyio


async def test_a_retried_generator_is_marked_where_it_starts_over() -> None:
    await a_retried_generator_is_marked_where_it_starts_over(AsyncQueueTasks())


async def test_a_step_of_a_run_whose_lease_was_lost_is_refused_and_the_run_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    await a_step_of_a_run_whose_lease_was_lost_is_refused_and_the_run_stops(
        AsyncQueueTasks(), caplog
    )


async def test_a_step_after_a_cancel_is_not_stored_and_the_run_ends_cancelled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    await a_step_after_a_cancel_is_not_stored_and_the_run_ends_cancelled(AsyncQueueTasks(), caplog)


class _UnfencedStorage(MemoryStorage):
    """A storage written before fenced steps: ``add_step`` has no ``fence``."""

    async def add_step(self, uuid: str, value: Any) -> int:  # type: ignore[override]  # the older protocol, on purpose
        index = await super().add_step(uuid, value)
        assert index is not None
        return index


async def test_a_storage_without_fenced_steps_is_called_without_a_fence() -> None:
    # The older protocol, on purpose: what it takes is what this test is about.
    app = AsyncQueueTasks(storage=_UnfencedStorage())  # type: ignore[arg-type]

    @app.task
    async def produce() -> AsyncIterator[str]:
        yield "a"
        yield "b"

    with anyio.fail_after(WAIT):
        async with app:
            task = await app.add_task("produce")
            assert [step async for step in task.stream()] == ["a", "b"]
            assert (await task.wait_result(timeout=WAIT)).returning == ["a", "b"]
