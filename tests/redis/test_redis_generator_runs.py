"""A generator task that runs more than once, on Redis (review r19 #7; the scenarios are in
``generator_run_scenarios.py``, the memory run in ``tests/core/test_generator_runs.py``)."""

from __future__ import annotations

import pytest
from generator_run_scenarios import (
    a_retried_generator_is_marked_where_it_starts_over,
    a_step_after_a_cancel_is_not_stored_and_the_run_ends_cancelled,
    a_step_of_a_run_whose_lease_was_lost_is_refused_and_the_run_stops,
)
from redis_worker_app import build

pytestmark = pytest.mark.anyio


async def test_a_retried_generator_is_marked_where_it_starts_over(
    redis_url: str, prefix: str
) -> None:
    await a_retried_generator_is_marked_where_it_starts_over(build(redis_url, prefix))


async def test_a_step_of_a_run_whose_lease_was_lost_is_refused_and_the_run_stops(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    await a_step_of_a_run_whose_lease_was_lost_is_refused_and_the_run_stops(
        build(redis_url, prefix), caplog
    )


async def test_a_step_after_a_cancel_is_not_stored_and_the_run_ends_cancelled(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    await a_step_after_a_cancel_is_not_stored_and_the_run_ends_cancelled(
        build(redis_url, prefix), caplog
    )
