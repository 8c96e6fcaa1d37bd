"""Depends: sharing per scope, teardown exactly once per scope (success, error, cancel, timeout,
shutdown), every supported dependency form, nested dependencies, explicit values."""

import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from typing import Annotated, Any

import anyio
import pytest

from qtasks import AsyncQueueTasks, Depends, QueueConfig, QueueTasks, TaskStatus
from qtasks.errors import TaskArgumentsError

pytestmark = pytest.mark.anyio
WAIT = 20


class Resource:
    """Something a dependency opens and closes; counts both per scope."""

    def __init__(self, scope: str, log: Counter[str]) -> None:
        self.scope = scope
        self.log = log
        self.closed = False
        log[f"{scope}.created"] += 1

    def close(self) -> None:
        assert not self.closed, "closed twice"
        self.closed = True
        self.log[f"{self.scope}.closed"] += 1


def counting_app(log: Counter[str], **config: Any) -> tuple[AsyncQueueTasks, dict[str, Any]]:
    """An app whose tasks use one dependency of each scope, each in a different form."""
    app = AsyncQueueTasks(config=QueueConfig(**config))

    async def task_dep() -> AsyncIterator[Resource]:  # async generator
        res = Resource("task", log)
        try:
            yield res
        finally:
            await anyio.lowlevel.checkpoint()
            res.close()

    @asynccontextmanager
    async def worker_dep() -> AsyncIterator[Resource]:  # async context manager factory
        res = Resource("worker", log)
        try:
            yield res
        finally:
            res.close()

    def broker_dep() -> Iterator[Resource]:  # sync generator
        res = Resource("broker", log)
        yield res
        res.close()

    @contextmanager
    def storage_dep() -> Iterator[Resource]:  # sync context manager factory
        res = Resource("storage", log)
        yield res
        res.close()

    class GlobalDep:  # a class whose instances are async context managers
        def __init__(self) -> None:
            self.res = Resource("global_config", log)

        async def __aenter__(self) -> Resource:
            return self.res

        async def __aexit__(self, *exc: object) -> None:
            self.res.close()

    deps = {
        "task": task_dep,
        "worker": worker_dep,
        "broker": broker_dep,
        "storage": storage_dep,
        "global_config": GlobalDep,
    }
    return app, deps


async def test_scopes_share_and_tear_down_once_across_concurrent_tasks() -> None:
    log: Counter[str] = Counter()
    app, deps = counting_app(log, max_tasks_process=40)
    seen: dict[str, set[int]] = {scope: set() for scope in deps}
    running = 0
    all_running = anyio.Event()
    release = anyio.Event()
    total = 40

    @app.task(max_time=0.3)  # the "timeout" tasks never finish on their own
    async def work(
        mode: str,
        t: Annotated[Resource, Depends(deps["task"])],
        w: Resource = Depends(deps["worker"], scope="worker"),
        b: Resource = Depends(deps["broker"], scope="broker"),
        s: Resource = Depends(deps["storage"], scope="storage"),
        g: Annotated[Resource, Depends(deps["global_config"], scope="global_config")] = None,  # type: ignore[assignment]
    ) -> str:
        nonlocal running
        assert g is not None
        for scope, res in zip(deps, (t, w, b, s, g), strict=True):
            assert not res.closed
            seen[scope].add(id(res))
        running += 1
        if running == total:
            all_running.set()
        await release.wait()
        if mode == "fail":
            raise RuntimeError("task failed")
        if mode in ("cancel", "timeout"):
            await anyio.sleep_forever()
        return mode

    modes = ["ok", "fail", "cancel", "timeout"] * (total // 4)
    with anyio.fail_after(WAIT):
        async with app:
            records = [await app.add_task("work", mode) for mode in modes]
            await all_running.wait()  # every task holds its resources at the same time
            release.set()
            for record, mode in zip(records, modes, strict=True):
                if mode == "cancel":
                    await app.cancel(record.uuid, "test cancel")
            finals = [await r.wait_result(timeout=WAIT) for r in records]
            during = dict(log)
        after = dict(log)

    statuses = Counter(f.status.value for f in finals)
    assert statuses == {"success": 10, "error": 20, "cancel": 10}
    # One task-scoped resource per execution, each torn down when its call ended, whatever
    # the ending; long scopes: one instance shared by every task, open until shutdown.
    assert len(seen["task"]) == total
    for scope in ("worker", "broker", "storage", "global_config"):
        assert len(seen[scope]) == 1, scope
    assert during == {
        "task.created": total,
        "task.closed": total,
        "worker.created": 1,
        "broker.created": 1,
        "storage.created": 1,
        "global_config.created": 1,
    }
    assert after == {**during, **{f"{s}.closed": 1 for s in deps if s != "task"}}


async def test_one_tasks_teardown_never_closes_anothers_resource() -> None:
    log: Counter[str] = Counter()
    app, deps = counting_app(log)
    long_started = anyio.Event()
    let_long_finish = anyio.Event()

    @app.task
    async def long(res: Resource = Depends(deps["task"])) -> bool:
        long_started.set()
        await let_long_finish.wait()
        return res.closed  # must still be open

    @app.task
    async def short(res: Resource = Depends(deps["task"])) -> bool:
        return res.closed

    @app.task
    async def failing(res: Resource = Depends(deps["task"])) -> None:
        raise ValueError("boom")

    with anyio.fail_after(WAIT):
        async with app:
            long_task = await app.add_task("long")
            await long_started.wait()
            assert (await app.add_task("short", timeout=WAIT)).returning is False
            assert (await app.add_task("failing", timeout=WAIT)).status is TaskStatus.ERROR
            assert log["task.closed"] == 2  # the short and failing tasks' own resources
            let_long_finish.set()
            assert (await long_task.wait_result(timeout=WAIT)).returning is False
    assert log["task.created"] == log["task.closed"] == 3


async def test_nested_dependencies_resolved_and_cached_within_scope() -> None:
    calls: Counter[str] = Counter()
    app = AsyncQueueTasks()

    class Settings:
        pass

    def settings() -> Settings:
        calls["settings"] += 1
        return Settings()

    async def pool(cfg: Settings = Depends(settings, scope="worker")) -> dict[str, Any]:
        calls["pool"] += 1
        return {"cfg": cfg}

    def session(
        p: Annotated[dict[str, Any], Depends(pool, scope="worker")],
        cfg: Settings = Depends(settings, scope="worker"),
        label: str = "default",
    ) -> dict[str, Any]:
        calls["session"] += 1
        return {"pool": p, "cfg": cfg, "label": label}

    @app.task
    async def use(
        s: dict[str, Any] = Depends(session),
        again: dict[str, Any] = Depends(session),
        cfg: Settings = Depends(settings, scope="worker"),
    ) -> list[bool]:
        return [s is again, s["cfg"] is cfg, s["pool"]["cfg"] is cfg, s["label"] == "default"]

    with anyio.fail_after(WAIT):
        async with app:
            first = await app.add_task("use", timeout=WAIT)
            second = await app.add_task("use", timeout=WAIT)
    assert first.returning == second.returning == [True, True, True, True]
    # session is task-scoped (once per execution, shared by both parameters); the worker-scoped
    # ones are created once for both executions.
    assert calls == {"settings": 1, "pool": 1, "session": 2}


async def test_explicit_value_is_never_overwritten() -> None:
    calls: list[str] = []
    app = AsyncQueueTasks()

    def make() -> str:
        calls.append("made")
        return "injected"

    @app.task
    async def use(x: int, value: str = Depends(make)) -> str:
        return f"{x}:{value}"

    with anyio.fail_after(WAIT):
        async with app:
            explicit = await app.add_task("use", 1, value="explicit", timeout=WAIT)
            assert calls == []
            injected = await app.add_task("use", 2, timeout=WAIT)
    assert explicit.returning == "1:explicit"
    assert injected.returning == "2:injected"
    assert calls == ["made"]


async def test_plain_and_coroutine_functions_and_positional_args() -> None:
    app = AsyncQueueTasks()

    def plain() -> int:
        return 1

    async def coro() -> int:
        return 2

    @app.task
    async def use(a: Annotated[int, Depends(plain)], b: int, c: int = Depends(coro)) -> list[int]:
        return [a, b, c]

    with anyio.fail_after(WAIT):
        async with app:
            task = await app.add_task("use", 10, timeout=WAIT)
    assert task.returning == [1, 10, 2]


async def test_a_dependency_error_known_only_at_run_fails_the_task_clearly() -> None:
    # Errors known at declaration raise there (test_depends_declaration.py); an annotation
    # that names nothing yet may name something by the run, so it is checked then.
    app = AsyncQueueTasks()

    def needs_later(x: "Later") -> int:  # type: ignore[name-defined]  # noqa: F821
        return 1

    @app.task
    async def later(v: int = Depends(needs_later)) -> int:
        return v

    with anyio.fail_after(WAIT):
        async with app:
            missing = await app.add_task("later", timeout=WAIT)
    assert missing.status is TaskStatus.ERROR
    assert "DependencyError" in (missing.error or "")
    assert "no default" in (missing.error or "")
    assert "could not be resolved" in (missing.error or "")
    with pytest.raises(Exception, match="unknown Depends scope"):
        Depends(needs_later, scope="cluster")  # type: ignore[arg-type]


async def test_failing_dependency_is_retried_like_the_task() -> None:
    app = AsyncQueueTasks()
    attempts: list[int] = []
    closed: list[int] = []

    def ok_dep() -> Iterator[int]:
        try:
            yield len(attempts)
        finally:  # the task's exception is raised at the yield (the failed attempt)
            closed.append(len(attempts))

    def flaky() -> int:
        attempts.append(1)
        if len(attempts) < 2:
            raise ConnectionError("database not up yet")
        return len(attempts)

    @app.task(retry=1, retry_backoff=0, retry_on_exc=ConnectionError)
    async def use(first: int = Depends(ok_dep), conn: int = Depends(flaky)) -> int:
        return conn

    with anyio.fail_after(WAIT):
        async with app:
            task = await app.add_task("use", timeout=WAIT)
    assert task.status is TaskStatus.SUCCESS, task.error
    assert task.returning == 2
    # The dependency created before the failure was torn down on the failed attempt too.
    assert closed == [1, 2]


async def test_task_scope_torn_down_when_shutdown_hands_the_task_back() -> None:
    log: Counter[str] = Counter()
    app, deps = counting_app(log, shutdown_grace=0.05)
    started = anyio.Event()

    @app.task
    async def stuck(res: Resource = Depends(deps["task"])) -> None:
        started.set()
        await anyio.sleep_forever()

    storage = app.storage
    async with AsyncExitStack() as hold:
        await storage.start(hold, app.config)  # keeps the storage readable after the app stops
        with anyio.fail_after(WAIT):
            async with app:
                task = await app.add_task("stuck")
                await started.wait()
        record = await storage.get(task.uuid)
    assert record is not None
    assert record.status is TaskStatus.NEW  # handed back
    assert log == {"task.created": 1, "task.closed": 1}


def test_sync_tasks_share_worker_scope_and_close_task_scope() -> None:
    log: Counter[str] = Counter()
    app = QueueTasks(config=QueueConfig(max_tasks_process=8))
    threads: set[int] = set()
    lock = threading.Lock()

    def per_task() -> Iterator[Resource]:
        res = Resource("task", log)
        try:
            yield res
        finally:  # the task's exception is raised at the yield
            res.close()

    def per_worker() -> Iterator[Resource]:
        res = Resource("worker", log)
        yield res
        res.close()

    @app.task
    def use(
        i: int,
        t: Resource = Depends(per_task),
        w: Resource = Depends(per_worker, scope="worker"),
    ) -> int:
        with lock:
            threads.add(threading.get_ident())
        assert not t.closed
        assert not w.closed
        if i % 3 == 0:
            raise RuntimeError("odd one out")
        return id(w)

    try:
        with app:
            records = [app.add_task("use", i) for i in range(30)]
            finals = [r.wait_result(timeout=WAIT) for r in records]
            during = dict(log)
        after = dict(log)
    finally:
        app.close()
    assert Counter(f.status.value for f in finals) == {"success": 20, "error": 10}
    assert len({f.returning for f in finals if f.status is TaskStatus.SUCCESS}) == 1
    assert during == {"task.created": 30, "task.closed": 30, "worker.created": 1}
    assert after == {**during, "worker.closed": 1}


# --- string annotations (as under ``from __future__ import annotations``) ------------------


def open_conn() -> dict[str, str]:
    return {"conn": "open"}


async def test_annotated_depends_with_a_type_only_known_to_type_checkers_injects() -> None:
    """``Conn`` is not defined at run time (a ``TYPE_CHECKING`` import): the ``Depends`` in
    the annotation still resolves, so the parameter is injected, not asked of the caller."""
    app = AsyncQueueTasks()

    @app.task
    async def use(n: int, db: "Annotated[Conn, Depends(open_conn)]") -> str:  # type: ignore[name-defined]  # noqa: F821
        return f"{n} {db['conn']}"

    assert app.tasks["use"].injected == {"db"}
    with anyio.fail_after(WAIT):
        async with app:
            task = await app.add_task("use", 1, timeout=WAIT)
    assert task.status is TaskStatus.SUCCESS, task.error
    assert task.returning == "1 open"


async def test_local_depends_in_a_string_annotation_fails_at_declaration() -> None:
    from qtasks.errors import UnresolvedAnnotationError

    app = AsyncQueueTasks()

    def local_conn() -> str:
        return "conn"

    with pytest.raises(UnresolvedAnnotationError, match="'db'"):

        @app.task
        async def use(db: "Annotated[str, Depends(local_conn)]") -> str:
            return db


async def test_dependency_parameter_with_an_unresolved_annotation_says_so() -> None:
    """A dependency's own parameter annotated with a class qtasks cannot resolve: the error
    names the annotation and the fix."""
    from qtasks import AsyncState

    app = AsyncQueueTasks()

    class Hidden(AsyncState):
        pass

    def needs_state(state: "Hidden") -> str:
        return "never"

    @app.task
    async def use(value: str = Depends(needs_state)) -> str:
        return value

    with anyio.fail_after(WAIT):
        async with app:
            task = await app.add_task("use", timeout=WAIT)
    assert task.status is TaskStatus.ERROR
    assert "'Hidden' could not be resolved" in (task.error or "")


async def test_teardown_is_told_how_the_task_ended() -> None:
    """The task's exception is raised at a generator dependency's ``yield`` and given to a
    context manager's ``__exit__``, as a ``with`` block would: a transaction commits on
    success and rolls back on error, cancel and ``max_time``."""
    seen: list[tuple[str, str, str | None]] = []  # (form, task, exception type)
    app = AsyncQueueTasks()
    started = anyio.Event()

    def tx() -> Iterator[str]:  # sync generator
        try:
            yield "tx"
        except BaseException as exc:
            seen.append(("gen", current[0], type(exc).__name__))
            raise
        seen.append(("gen", current[0], None))

    class Session:  # a class whose instances are context managers
        def __enter__(self) -> str:
            return "session"

        def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
            seen.append(("cm", current[0], None if kind is None else kind.__name__))

    current = [""]

    @app.task(max_time=0.2)
    async def work(mode: str, t: str = Depends(tx), s: str = Depends(Session)) -> str:
        current[0] = mode
        if mode == "fail":
            raise KeyError("boom")
        if mode in ("cancel", "slow"):
            started.set()
            await anyio.sleep_forever()
        return mode

    async with app:
        assert (await app.add_task("work", "ok", timeout=WAIT)).returning == "ok"
        failed = await app.add_task("work", "fail", timeout=WAIT)
        slow = await app.add_task("work", "slow", timeout=WAIT)
        started = anyio.Event()
        task = await app.add_task("work", "cancel")
        with anyio.fail_after(WAIT):
            await started.wait()
        await app.cancel(task.uuid, "test cancel")
        cancelled = await app.wait(task.uuid, timeout=WAIT)
    assert [r.status for r in (failed, slow, cancelled)] == [
        TaskStatus.ERROR,
        TaskStatus.ERROR,
        TaskStatus.CANCEL,
    ]
    # The last made is torn down first (the session), as nested ``with`` blocks.
    assert seen == [
        ("cm", "ok", None),
        ("gen", "ok", None),
        ("cm", "fail", "KeyError"),
        ("gen", "fail", "KeyError"),
        ("cm", "slow", "TaskMaxTimeError"),
        ("gen", "slow", "TaskMaxTimeError"),
        ("cm", "cancel", "TaskCancelledError"),
        ("gen", "cancel", "TaskCancelledError"),
    ]


def test_a_direct_call_that_leaves_out_a_depends_default_is_refused() -> None:
    """``transfer(10)``, the task called directly as tasks.md's "still a plain function for
    tests" invites, gave the function the ``Depends`` marker itself for ``tx``: the test then
    failed on ``'Dependency' object has no attribute 'append'``, or passed with nonsense. It
    raises, naming the parameter; passing it (by keyword or position) calls the function."""
    app = QueueTasks("direct-calls")

    def connect() -> str:
        return "db"

    @app.task
    def transfer(amount: int, tx: str = Depends(connect)) -> str:
        return f"{amount} on {tx}"

    with pytest.raises(
        TaskArgumentsError, match=r"without its parameter 'tx': its default is a Depends"
    ):
        transfer(10)
    assert transfer(10, tx="test-db") == "10 on test-db"
    assert transfer(10, "test-db") == "10 on test-db"

    @app.task
    def plain(amount: int, fee: int = 1) -> int:
        return amount + fee

    assert plain(10) == 11  # no Depends: called as it is
    app.close()
