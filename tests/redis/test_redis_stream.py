"""Following a generator task with the async ``stream()`` on Redis (review r19 #2, #8; the
scenarios are in ``stream_scenarios.py``, the memory run in ``tests/core/test_stream.py``)."""

from __future__ import annotations

import pytest
from redis_worker_app import build
from stream_scenarios import (
    a_consumer_slower_than_the_deadline_gets_task_timeout_error,
    breaking_out_of_a_live_stream_leaves_the_app_clean,
    closing_a_stream_inside_another_scope_is_clean,
    stream_errors_are_those_of_wait,
)

pytestmark = pytest.mark.anyio


async def test_breaking_out_of_a_live_stream_leaves_the_app_clean(
    redis_url: str, prefix: str
) -> None:
    await breaking_out_of_a_live_stream_leaves_the_app_clean(build(redis_url, prefix))


async def test_closing_a_stream_inside_another_scope_is_clean(redis_url: str, prefix: str) -> None:
    await closing_a_stream_inside_another_scope_is_clean(build(redis_url, prefix))


async def test_a_consumer_slower_than_the_deadline_gets_task_timeout_error(
    redis_url: str, prefix: str
) -> None:
    await a_consumer_slower_than_the_deadline_gets_task_timeout_error(build(redis_url, prefix))


async def test_stream_errors_are_those_of_wait(redis_url: str, prefix: str) -> None:
    await stream_errors_are_those_of_wait(build(redis_url, prefix))
