"""What a task returns or yields reads back the same from the in-memory storage as from Redis,
which keeps JSON: a tuple as a list, a dict's int keys as strings, and never the object the
task still holds. The in-memory storage kept the very object (walk-through: a test that
asserted ``returning == (1, 2)`` or ``returning[1]`` passed in memory and failed on Redis,
and a result the task changed after returning changed in the storage too)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from qtasks import AsyncQueueTasks, QueueConfig, TaskStatus

pytestmark = pytest.mark.anyio

KEPT: list[int] = []


def make_app(backend: str, request: pytest.FixtureRequest) -> AsyncQueueTasks:
    if backend == "memory":
        return AsyncQueueTasks("alike")
    config = QueueConfig(
        broker="redis",
        broker_url=request.getfixturevalue("redis_url"),
        extra={"redis_prefix": request.getfixturevalue("prefix")},
    )
    return AsyncQueueTasks("alike", config=config)


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_results_and_steps_read_back_as_stored_json(
    backend: str, request: pytest.FixtureRequest
) -> None:
    app = make_app(backend, request)

    @app.task
    def pair() -> tuple[int, list[Any]]:
        return 1, [2, (3, 4)]

    @app.task
    def by_id() -> dict[int, str]:
        return {1: "one"}

    @app.task
    def kept() -> list[int]:
        return KEPT  # the task's own list, changed after it returned

    @app.task
    def steps() -> Iterator[tuple[int, int]]:
        yield 1, 2
        yield 3, 4

    async with app:
        assert (await app.add_task("pair", timeout=10)).returning == [1, [2, [3, 4]]]
        assert (await app.add_task("by_id", timeout=10)).returning == {"1": "one"}
        done = await app.add_task("kept", timeout=10)
        KEPT.append(5)
        assert (await app.get(done.uuid)).returning == []  # type: ignore[union-attr]
        walked = await app.add_task("steps")
        assert [step async for step in walked.stream(timeout=10)] == [[1, 2], [3, 4]]
        final = await walked.wait_result(timeout=10)
        assert (final.status, final.returning) == (TaskStatus.SUCCESS, [[1, 2], [3, 4]])
    KEPT.clear()
