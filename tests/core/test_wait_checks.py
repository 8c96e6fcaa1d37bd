"""A wait's ``timeout`` is checked by one rule at every entry point (``wait``, a record's
``wait_result``, ``stream``, ``wait_workflow``; async, sync and from inside a sync task): a
value that is not seconds >= 0 raises :class:`InvalidTimeoutError` before anything waits,
instead of a bare ``TypeError`` from deep in the wait (``timeout="5"``) or an immediate
``TaskTimeoutError`` (``timeout=-1``); ``math.inf`` waits without limit, as ``None`` does."""

from __future__ import annotations

import math
import re
import reprlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from stream_scenarios import NotedWait

from qtasks import AsyncQueueTasks, InvalidTimeoutError, QueueConfig, QueueTasks
from qtasks.errors import ComponentNotStartedError, TaskTimeoutError
from qtasks.workflows import chain

pytestmark = pytest.mark.anyio

BAD = ["5", -1, -0.5, float("nan"), float("-inf"), True, 10**400, [1]]
WAIT = 10.0


def says(what: str, value: Any) -> str:
    return f"^{what}: timeout expects finite seconds >= 0, got " + re.escape(reprlib.repr(value))


def async_waits(
    app: AsyncQueueTasks, uuid: str, wf: str
) -> dict[str, Callable[[Any], Awaitable[Any]]]:
    async def stream(timeout: Any) -> list[Any]:
        return [step async for step in app.stream(uuid, timeout)]

    async def record_stream(timeout: Any) -> list[Any]:
        record = await app.get(uuid)
        assert record is not None
        return [step async for step in record.stream(timeout)]

    async def wait_result(timeout: Any) -> Any:
        record = await app.get(uuid)
        assert record is not None
        return await record.wait_result(timeout)

    return {
        "wait": lambda t: app.wait(uuid, t),
        "wait_result": wait_result,
        "stream": stream,
        "record.stream": record_stream,
        "wait_workflow": lambda t: app.wait_workflow(wf, t),
    }


def make_app() -> AsyncQueueTasks:
    app = AsyncQueueTasks("waits")

    @app.task
    async def steps() -> Any:
        yield 1
        yield 2

    @app.task
    def double(x: int) -> int:
        return 2 * x

    return app


@pytest.mark.parametrize("timeout", BAD, ids=lambda v: f"{v!r:.12}")
async def test_a_bad_timeout_is_refused_by_every_async_wait(timeout: Any) -> None:
    app = make_app()
    async with app:
        task = await app.add_task("steps")
        wf = await app.run_workflow(chain(app.tasks["double"].s(1), app.tasks["double"].s()))
        for name, wait in async_waits(app, task.uuid, wf.id).items():
            what = "wait_workflow" if name == "wait_workflow" else name.split(".")[-1]
            what = "wait" if what == "wait_result" else what
            with pytest.raises(InvalidTimeoutError, match=says(what, timeout)):
                await wait(timeout)
        # The refusals waited for nothing and changed nothing: the same waits with a good
        # timeout still see the task and the workflow end.
        assert [s async for s in app.stream(task.uuid, WAIT)] == [1, 2]
        assert (await app.wait_workflow(wf.id, WAIT)).result == 4


async def test_an_infinite_timeout_waits_without_limit() -> None:
    app = make_app()
    async with app:
        task = await app.add_task("double", 3)
        with anyio.fail_after(WAIT):
            done = await app.wait(task.uuid, math.inf)
            assert done.returning == 6
            assert [s async for s in (await app.add_task("steps")).stream(math.inf)] == [1, 2]


def test_a_bad_timeout_is_refused_by_the_sync_app_and_inside_a_sync_task() -> None:
    app = QueueTasks("waits-sync")
    seen: list[str] = []

    @app.task
    def double(x: int) -> int:
        return 2 * x

    @app.task(echo=True)
    def inside(self: Any, uuid: str) -> None:
        record = self.ctx.get_task(uuid)
        for call in (lambda: record.wait_result("5"), lambda: list(record.stream("5"))):
            try:
                call()
            except InvalidTimeoutError as exc:
                seen.append(str(exc))

    with app:
        task = app.add_task("double", 2)
        with pytest.raises(InvalidTimeoutError, match=says("wait", "5")):
            task.wait_result("5")  # type: ignore[arg-type]  # the point: a wrong type
        with pytest.raises(InvalidTimeoutError, match=says("stream", -1)):
            list(task.stream(-1))
        wf = app.run_workflow(chain(double.s(1), double.s()))
        with pytest.raises(InvalidTimeoutError, match=says("wait_workflow", "5")):
            app.wait_workflow(wf.id, "5")  # type: ignore[arg-type]  # the point: a wrong type
        assert app.wait_workflow(wf.id, WAIT).result == 4
        done = app.add_task("inside", task.uuid, timeout=WAIT)
        assert done.status.value == "success", done
    assert [re.sub(r",.*", "", s) for s in seen] == [
        "wait: timeout expects finite seconds >= 0",
        "stream: timeout expects finite seconds >= 0",
    ]


def test_close_while_a_thread_waits_for_a_workflow_raises_component_not_started() -> None:
    """Every blocking call of the sync app, not only ``wait``: ``wait_workflow`` cancelled by
    ``close()`` raised a bare ``concurrent.futures.CancelledError`` before."""
    storage = NotedWait()
    app = QueueTasks(storage=storage, config=QueueConfig(shutdown_grace=0.2))

    @app.task
    async def forever() -> None:
        await anyio.sleep_forever()

    outcome: list[BaseException | None] = []

    def waiter(id: str) -> None:
        try:
            app.wait_workflow(id)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    app.__enter__()
    try:
        wf = app.run_workflow(chain(forever.s()))
        thread = threading.Thread(target=waiter, args=(wf.id,))
        thread.start()
        assert storage.waiting.wait(WAIT)
    finally:
        app.close()
    thread.join(WAIT)
    assert len(outcome) == 1, "the waiter is still blocked"
    assert isinstance(outcome[0], ComponentNotStartedError), repr(outcome[0])
    assert "was closed while this call waited" in str(outcome[0])


async def test_waiting_with_no_worker_on_the_in_memory_broker_says_why() -> None:
    """A script that waits for a result of the in-memory app without ``with app:`` around it
    waited out its timeout and got "did not finish within 1 s", which reads as a slow task
    (walk-through): nothing consumes that broker, so nothing could have run it. The error
    says so; with a worker serving, a timeout says nothing more."""
    app = AsyncQueueTasks("alone")

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task
    async def slow() -> None:
        await anyio.sleep_forever()

    with pytest.raises(TaskTimeoutError) as raised:
        await app.add_task("add", 1, 2, timeout=0.05)
    assert str(raised.value).endswith(
        "did not finish within 0.05 s: no worker serves MemoryBroker (process memory), so "
        "nothing ran it; serve in this process (with app:, async with app:, app.run_forever())"
    )
    with pytest.raises(TaskTimeoutError, match="no worker serves"):
        await app.wait(raised.value.uuid, timeout=0.05)
    async with app:
        task = await app.add_task("slow")
        with pytest.raises(TaskTimeoutError) as served:
            await app.wait(task.uuid, timeout=0.05)
        assert str(served.value) == f"task {task.uuid} did not finish within 0.05 s"
        await app.cancel(task.uuid, "done")
    await app.aclose()
