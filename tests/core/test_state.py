"""State: injection, the API, atomic updates under concurrent threads and coroutines, and the
worker vs global_config scopes."""

from __future__ import annotations

import importlib
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.lowlevel
import pytest
from state_lock import a_late_unlock_spares_the_next_holder

from qtasks import (
    AsyncQueueTasks,
    MemoryBroker,
    MemoryGlobalConfig,
    QueueConfig,
    QueueTasks,
    TaskStatus,
)
from qtasks.errors import (
    StateError,
    TaskArgumentsError,
    TaskDeclarationError,
    UnresolvedAnnotationError,
)
from qtasks.plugins import AsyncState, SyncState

pytestmark = pytest.mark.anyio
WAIT = 20


class Counter(AsyncState):
    pass


class SharedCounter(AsyncState):
    scope = "global_config"
    name = "shared-counter"


class SyncCounter(SyncState):
    name = "sync-counter"


class SyncShared(SyncState):
    scope = "global_config"
    name = "sync-shared"


async def test_async_state_api() -> None:
    app = AsyncQueueTasks()

    @app.task
    async def use(state: Counter) -> dict[str, Any]:
        assert isinstance(state, Counter)
        await state.set("a", 1)
        await state.update(b=2, c=3)
        got = [await state.get("a"), await state.get("missing", "dflt")]
        deleted = [await state.delete("c"), await state.delete("c")]
        n = await state.increment("n", 5)
        items = await state.update_with("items", lambda xs: [*xs, "x"], [])
        everything = await state.get_all()
        await state.clear()
        return {
            "got": got,
            "deleted": deleted,
            "n": n,
            "items": items,
            "all": everything,
            "after_clear": await state.get_all(),
        }

    with anyio.fail_after(WAIT):
        async with app:
            task = await app.add_task("use", timeout=WAIT)
    assert task.status is TaskStatus.SUCCESS, task.error
    assert task.returning == {
        "got": [1, "dflt"],
        "deleted": [True, False],
        "n": 5,
        "items": ["x"],
        "all": {"a": 1, "b": 2, "n": 5, "items": ["x"]},
        "after_clear": {},
    }


async def test_async_state_no_lost_updates_across_coroutines() -> None:
    app = AsyncQueueTasks(config=QueueConfig(max_tasks_process=50))
    tasks_n = 200

    @app.task
    async def bump(i: int, state: Annotated[Counter, "metadata is fine"]) -> None:
        await anyio.lowlevel.checkpoint()  # interleave with the other tasks
        await state.increment("n")
        await state.update_with("seen", lambda xs: [*xs, i], [])

    @app.task
    async def read(state: Counter) -> dict[str, Any]:
        return await state.get_all()

    with anyio.fail_after(WAIT):
        async with app:
            records = [await app.add_task("bump", i) for i in range(tasks_n)]
            for record in records:
                assert (await record.wait_result(timeout=WAIT)).status is TaskStatus.SUCCESS
            result = await app.add_task("read", timeout=WAIT)
    assert result.returning["n"] == tasks_n
    assert sorted(result.returning["seen"]) == list(range(tasks_n))


def test_sync_state_no_lost_updates_across_threads() -> None:
    app = QueueTasks(config=QueueConfig(max_tasks_process=8))
    tasks_n, per_task = 16, 50

    def slow_plus_one(value: int) -> int:
        # A read-modify-write that yields the GIL in the middle: without the state's lock,
        # concurrent threads would lose updates here.
        time.sleep(0.0002)
        return value + 1

    @app.task
    def bump(state: SyncCounter) -> None:
        for _ in range(per_task):
            state.update_with("slow", slow_plus_one, 0)
            state.increment("fast")

    @app.task
    def read(state: SyncCounter) -> dict[str, Any]:
        return state.get_all()

    try:
        with app:
            records = [app.add_task("bump") for _ in range(tasks_n)]
            for record in records:
                assert record.wait_result(timeout=WAIT).status is TaskStatus.SUCCESS
            result = app.add_task("read", timeout=WAIT)
    finally:
        app.close()
    assert result.returning == {"slow": tasks_n * per_task, "fast": tasks_n * per_task}


async def test_worker_state_is_per_worker_global_state_is_shared() -> None:
    shared = MemoryGlobalConfig()
    broker_a, broker_b = MemoryBroker(), MemoryBroker()
    apps = [
        AsyncQueueTasks("a", broker=broker_a, global_config=shared),
        AsyncQueueTasks("b", broker=broker_b, global_config=shared),
    ]
    for app in apps:

        @app.task
        async def bump(local: Counter, glob: SharedCounter) -> list[float]:
            return [await local.increment("n"), await glob.increment("n")]

    with anyio.fail_after(WAIT):
        async with apps[0], apps[1]:
            first = await apps[0].add_task("bump", timeout=WAIT)
            second = await apps[1].add_task("bump", timeout=WAIT)
            third = await apps[0].add_task("bump", timeout=WAIT)
            stored = await shared.get_all("qtasks.state:shared-counter")
    # Worker-scoped: each worker counts its own; global: one count for both workers.
    assert first.returning == [1, 1]
    assert second.returning == [1, 2]
    assert third.returning == [2, 3]
    # The global state is plainly in the GlobalConfig, under its namespace.
    assert stored == {"n": 3}


async def test_global_state_update_with_is_atomic() -> None:
    app = AsyncQueueTasks(config=QueueConfig(max_tasks_process=20))

    @app.task
    async def add(i: int, state: SharedCounter) -> None:
        await state.update_with("seen", lambda xs: [*xs, i], [])

    with anyio.fail_after(WAIT):
        async with app:
            records = [await app.add_task("add", i) for i in range(60)]
            for record in records:
                assert (await record.wait_result(timeout=WAIT)).status is TaskStatus.SUCCESS
            seen = await app.global_config.get("qtasks.state:shared-counter", "seen")
            leftover_locks = await app.global_config.get_all("qtasks.state-lock:shared-counter")
    assert sorted(seen) == list(range(60))
    assert leftover_locks == {}


async def test_a_late_unlock_never_deletes_the_next_holders_lock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = MemoryGlobalConfig()
    async with AsyncExitStack() as stack:
        await config.start(stack, QueueConfig())
        await a_late_unlock_spares_the_next_holder(config, "late-unlock", monkeypatch)


def test_sync_global_state_from_threads() -> None:
    app = QueueTasks(config=QueueConfig(max_tasks_process=8))

    @app.task
    def bump(state: SyncShared) -> float:
        state.set("last", "set from a thread")
        return state.increment("n")

    try:
        with app:
            records = [app.add_task("bump") for _ in range(20)]
            values = [r.wait_result(timeout=WAIT).returning for r in records]
            stored = app.portal.call(app.aio.global_config.get_all, "qtasks.state:sync-shared")
    finally:
        app.close()
    assert sorted(values) == list(range(1, 21))
    assert stored == {"last": "set from a thread", "n": 20}


class AsyncView(AsyncState):
    name = "one-name"


class SyncView(SyncState):
    name = "one-name"


async def test_async_and_sync_state_with_one_name_share_values() -> None:
    # This module uses ``from __future__ import annotations``: the State classes are found from
    # the string annotations (module-level names).
    app = AsyncQueueTasks()

    @app.task
    async def write(state: AsyncView) -> None:
        await state.set("k", "from async")

    @app.task
    def read(state: SyncView) -> Any:
        return state.get("k")

    with anyio.fail_after(WAIT):
        async with app:
            await app.add_task("write", timeout=WAIT)
            result = await app.add_task("read", timeout=WAIT)
    assert result.returning == "from async"


async def test_async_state_in_sync_task_blocks_through_the_portal() -> None:
    # QTasks users annotate plain ``def`` tasks with an AsyncState (the seed's own example):
    # the sync task gets a view whose calls block its worker thread.
    app = AsyncQueueTasks()

    @app.task
    def bump(state: Counter) -> Any:
        state.update_with("n", lambda n: n + 1, 0)  # type: ignore[unused-coroutine]  # sync view
        assert isinstance(state, Counter)
        return state.get()

    with anyio.fail_after(WAIT):
        async with app:
            await app.add_task("bump", timeout=WAIT)
            task = await app.add_task("bump", timeout=WAIT)
    assert task.status is TaskStatus.SUCCESS, task.error
    assert task.returning == {"n": 2}


def test_bad_scope_is_refused_at_declaration() -> None:
    with pytest.raises(StateError, match="scope"):

        class Bad(AsyncState):
            scope = "cluster"  # type: ignore[assignment]


# --- annotations that do not resolve (this module has ``from __future__ import annotations``)


async def test_state_class_local_to_a_function_fails_at_declaration() -> None:
    """The annotation is the string "LocalCounter", which the module cannot resolve: refused
    when declared, naming task, parameter, annotation and the fix (not at every enqueue as
    "missing a required argument")."""
    app = AsyncQueueTasks()

    class LocalCounter(AsyncState):
        pass

    with pytest.raises(UnresolvedAnnotationError) as info:

        @app.task
        async def bump(state: LocalCounter) -> float:
            return await state.increment("n")

    error = info.value
    assert (error.task_name, error.parameter, error.annotation) == ("bump", "state", "LocalCounter")
    message = str(error)
    assert "'bump'" in message and "'state'" in message and "'LocalCounter'" in message
    assert "module level" in message and "from __future__ import annotations" in message
    assert isinstance(error, TaskDeclarationError)
    assert "bump" not in app.tasks


def test_sync_state_local_to_a_function_fails_at_declaration_on_the_sync_app() -> None:
    app = QueueTasks()

    class LocalSync(SyncState):
        pass

    try:
        with pytest.raises(UnresolvedAnnotationError, match="'LocalSync'"):

            @app.task
            def bump(n: int, state: LocalSync) -> float:
                return state.increment("n", n)

    finally:
        app.close()


async def test_unresolvable_annotations_of_ordinary_parameters_are_fine() -> None:
    """A name known only to type checkers (a ``TYPE_CHECKING`` import) or a local class that is
    not a State: the caller passes that argument, so nothing is refused."""
    app = AsyncQueueTasks()

    class Point:
        pass

    @app.task
    async def describe(item: OnlyKnownToTypeCheckers, where: Point | None = None) -> str:  # type: ignore[name-defined]  # noqa: F821
        return f"{item}@{where}"

    assert app.tasks["describe"].unresolved == {
        "item": "OnlyKnownToTypeCheckers",
        "where": "Point | None",
    }
    with anyio.fail_after(WAIT):
        async with app:
            task = await app.add_task("describe", "x", timeout=WAIT)
    assert task.status is TaskStatus.SUCCESS, task.error
    assert task.returning == "x@None"


async def test_missing_argument_with_an_unresolved_annotation_hints_at_the_cause() -> None:
    """Declared through a helper, qtasks cannot see the local class; the enqueue error then
    says the annotation did not resolve and how to fix it."""
    app = AsyncQueueTasks()

    class Hidden(AsyncState):
        pass

    async def bump(state: Hidden) -> float:
        return await state.increment("n")

    def register(func: Any) -> Any:  # the declaring frame: ``Hidden`` is not among its names
        return app.task(func)

    register(bump)
    with pytest.raises(TaskArgumentsError) as info:
        await app.add_task("bump")
    message = str(info.value)
    assert "missing a required argument: 'state'" in message
    assert "'Hidden' could not be resolved" in message and "module level" in message
    await app.aclose()


FORWARD = """
from __future__ import annotations

from qtasks import AsyncQueueTasks, AsyncState

app = AsyncQueueTasks()


@app.task
async def bump(state: DefinedBelow) -> float:
    return await state.increment("n")


class DefinedBelow(AsyncState):
    pass
"""


async def test_state_defined_further_down_the_module_is_injected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not resolvable when the task is declared, resolvable when the app starts: injected."""
    (tmp_path / "forward_state_tasks.py").write_text(FORWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("forward_state_tasks")
    app: AsyncQueueTasks = module.app
    with anyio.fail_after(WAIT):
        async with app:
            first = await app.add_task("bump", timeout=WAIT)
            second = await app.add_task("bump", timeout=WAIT)
    assert (first.status, second.status) == (TaskStatus.SUCCESS, TaskStatus.SUCCESS), first.error
    assert (first.returning, second.returning) == (1, 2)
