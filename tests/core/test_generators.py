"""Generator tasks, live: each step is stored and visible to the producer before the generator
continues; the result is the ``return`` value or the list of handled steps."""

import threading
import time
from collections.abc import AsyncIterator, Generator, Iterator
from typing import Any

import anyio
import pytest

from qtasks import AsyncQueueTasks, QueueConfig, QueueTasks, TaskStatus, hookimpl

pytestmark = pytest.mark.anyio
WAIT = 10


async def test_async_generator_steps_are_seen_before_it_continues() -> None:
    app = AsyncQueueTasks()
    gates = [anyio.Event() for _ in range(5)]
    yielded_at: list[float] = []

    @app.task
    async def produce() -> AsyncIterator[int]:
        for i in range(5):
            yielded_at.append(time.perf_counter())
            yield i
            # Blocks until the producer saw step i: if steps were only visible later (e.g. at
            # the end), this would deadlock and the fail_after below would fire.
            await gates[i].wait()

    latencies: list[float] = []
    seen: list[int] = []
    with anyio.fail_after(WAIT):
        async with app:
            task = await app.add_task("produce")
            async for step in task.stream():
                latencies.append(time.perf_counter() - yielded_at[step])
                seen.append(step)
                gates[step].set()
            final = await task.wait_result(timeout=WAIT)
    assert seen == [0, 1, 2, 3, 4]
    assert final.status is TaskStatus.SUCCESS
    assert final.returning == [0, 1, 2, 3, 4]
    assert final.steps == 5
    print(f"async step latency max {max(latencies) * 1000:.2f} ms")


def test_sync_generator_steps_are_seen_before_it_continues() -> None:
    app = QueueTasks()
    gates = [threading.Event() for _ in range(5)]
    yielded_at: list[float] = []

    @app.task
    def produce() -> Generator[int, None, str]:
        for i in range(5):
            yielded_at.append(time.perf_counter())
            yield i
            if not gates[i].wait(WAIT):
                raise AssertionError(f"step {i} was not seen while the generator waited")
        return "done"

    latencies: list[float] = []
    seen: list[int] = []
    try:
        with app:
            task = app.add_task("produce")
            for step in task.stream(timeout=WAIT):
                latencies.append(time.perf_counter() - yielded_at[step])
                seen.append(step)
                gates[step].set()
            final = task.wait_result(timeout=WAIT)
    finally:
        app.close()
    assert seen == [0, 1, 2, 3, 4]
    assert final.status is TaskStatus.SUCCESS, final.error
    assert final.returning == "done"  # the return value, not the list of steps
    print(f"sync step latency max {max(latencies) * 1000:.2f} ms")


async def test_handler_result_is_sent_back_and_collected() -> None:
    app = AsyncQueueTasks()
    received: list[Any] = []

    async def handler(value: int) -> int:
        return value * 10

    @app.task(generate_handler=handler)
    async def agen() -> AsyncIterator[int]:
        for i in range(3):
            step = yield i
            received.append(step)

    @app.task(generate_handler=lambda v: f"<{v}>")
    def sgen() -> Generator[int, Any, list[Any]]:
        got: list[Any] = []
        for i in range(2):
            got.append((yield i))
        return got

    @app.task
    def plain_yield_from(n: int) -> Iterator[int]:
        yield from range(n)  # works: without a handler nothing is sent back

    with anyio.fail_after(WAIT):
        async with app:
            a = await app.add_task("agen", timeout=WAIT)
            steps = [s async for s in (await app.add_task("sgen")).stream(timeout=WAIT)]
            s = await app.add_task("sgen", timeout=WAIT)
            p = await app.add_task("plain_yield_from", 4, timeout=WAIT)
    assert received == [0, 10, 20]
    assert a.returning == [0, 10, 20]
    assert steps == ["<0>", "<1>"]
    assert s.returning == ["<0>", "<1>"]
    assert p.returning == [0, 1, 2, 3]


async def test_yield_hook_fires_per_step_after_the_step_is_stored() -> None:
    app = AsyncQueueTasks()
    stored_counts: list[int] = []

    class Watcher:
        @hookimpl
        async def qtasks_executor_yielded(self, record: Any, value: Any) -> None:
            stored = await app.storage.get(record.uuid)
            assert stored is not None
            stored_counts.append(stored.steps)

    app.add_plugin(Watcher())

    @app.task
    async def three() -> AsyncIterator[str]:
        for s in "abc":
            yield s

    with anyio.fail_after(WAIT):
        async with app:
            await app.add_task("three", timeout=WAIT)
    assert stored_counts == [1, 2, 3]


async def test_cancelled_generator_is_closed() -> None:
    app = AsyncQueueTasks()
    started = anyio.Event()
    closed: list[bool] = []

    @app.task
    async def forever() -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                yield i
                started.set()
                i += 1
                await anyio.sleep(0.01)
        finally:
            with anyio.CancelScope(shield=True):  # cleanup that awaits must be shielded
                await anyio.lowlevel.checkpoint()
            closed.append(True)

    with anyio.fail_after(WAIT):
        async with app:
            task = await app.add_task("forever")
            await started.wait()
            await app.cancel(task.uuid)
            final = await task.wait_result(timeout=WAIT)
    assert final.status is TaskStatus.CANCEL
    assert closed == [True]


async def test_a_step_that_cannot_be_stored_names_the_step_and_generate_handler(
    redis_url: str, redis_prefix: str
) -> None:
    """A yielded value the serializer cannot store failed the task saying the task
    "returned" it and to "pass decode=", which is not applied to steps: the fix is a
    ``generate_handler``."""
    app = AsyncQueueTasks(
        config=QueueConfig(broker_url=redis_url, extra={"redis_prefix": redis_prefix})
    )

    @app.task
    async def tags() -> AsyncIterator[Any]:
        yield ["a"]
        yield {"b", "c"}

    @app.task
    def sync_tags() -> Iterator[Any]:
        yield ["a"]
        yield {"b", "c"}

    with anyio.fail_after(20):
        async with app:
            for name in ("tags", "sync_tags"):
                final = await (await app.add_task(name)).wait_result(timeout=10)
                assert (final.status, final.steps) == (TaskStatus.ERROR, 1)
                assert final.error is not None
                assert final.error.startswith(
                    f"SerializationError: task {name!r} yielded a value that cannot be "
                    "stored as a step (set): cannot encode as JSON"
                ), final.error
                assert final.error.endswith("pass generate_handler= to convert it")
