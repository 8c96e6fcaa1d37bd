"""QTasks' call shapes and import paths, next to the qtasks forms."""

from __future__ import annotations

import re
from typing import Any

import anyio
import pytest
from typer.testing import CliRunner

from qtasks import AsyncQueueTasks, AsyncState, QueueTasks, SyncState
from qtasks.errors import ComponentError
from qtasks.record import TaskStatus

WAIT = 10
pytestmark = pytest.mark.anyio


def test_import_paths_of_qtasks_apps() -> None:
    from qtasks import AsyncRouter, SyncRouter, shared_task
    from qtasks.asyncio import QueueTasks as AsyncApp
    from qtasks.asyncio.qtasks import QueueTasks as AsyncApp2
    from qtasks.enums import TaskStatusEnum
    from qtasks.enums.task_status import TaskStatusEnum as TaskStatusEnum2
    from qtasks.exc import TaskCancelError, TaskPluginTriggerError
    from qtasks.plugins import AsyncState, SyncState
    from qtasks.plugins.depends import Depends, ScopeEnum
    from qtasks.plugins.states import AsyncState as AsyncState2
    from qtasks.registries import AsyncTask, SyncTask
    from qtasks.registries.async_task_decorator import AsyncTask as AsyncTask2
    from qtasks.registries.sync_task_decorator import SyncTask as SyncTask2
    from qtasks.timers import AsyncTimer, SyncTimer

    assert AsyncApp is AsyncApp2 is AsyncQueueTasks
    assert TaskStatusEnum is TaskStatusEnum2 is TaskStatus
    assert TaskStatusEnum.SUCCESS.value == TaskStatus.SUCCESS  # type: ignore[comparison-overlap]  # StrEnum == str
    assert AsyncState is AsyncState2 and SyncState is not None
    assert AsyncTask is AsyncTask2 and SyncTask is SyncTask2
    assert ScopeEnum.WORKER == "worker" and callable(Depends)  # type: ignore[comparison-overlap]  # StrEnum == str
    assert issubclass(TaskCancelError, Exception) and issubclass(TaskPluginTriggerError, Exception)
    assert AsyncTimer is not None and SyncTimer is not None
    assert AsyncRouter is not None and SyncRouter is not None and callable(shared_task)


def test_task_name_by_keyword_everywhere() -> None:
    app = QueueTasks()

    @app.task(name="test_num")
    def test_num(number: int) -> int:
        return number

    @app.task(name="test_echo", echo=True)
    def test_echo(self: Any) -> Any:
        child = self.add_task(5, task_name="test_num", timeout=WAIT)
        return child.returning

    @app.task
    def other() -> str:
        return "other"

    try:
        with app:
            assert app.add_task(task_name="test_num", number=3, timeout=WAIT).returning == 3
            assert app.add_task("test_echo", timeout=WAIT).returning == 5
            assert test_num.add_task(task_name="other", timeout=WAIT).returning == "other"
            assert test_num.add_task(4, timeout=WAIT).returning == 4
    finally:
        app.close()


def test_a_task_with_a_task_name_parameter_gets_it_from_its_own_add_task() -> None:
    """``audit.add_task(task_name="resize")`` of a task with its own ``task_name`` parameter
    was read as QTasks' form and enqueued a task named ``resize`` instead (an unknown task,
    or another one run with audit's arguments; walk-through). The task's own parameter wins;
    a task without one keeps QTasks' form."""
    app = QueueTasks()

    @app.task
    def audit(task_name: str, ok: bool) -> str:
        return f"{task_name}: {ok}"

    @app.task
    def resize(ok: bool) -> str:
        return f"resized: {ok}"

    try:
        with app:
            done = audit.add_task(task_name="resize", ok=True, timeout=WAIT)
            assert (done.task_name, done.returning) == ("audit", "resize: True")
            other = resize.add_task(task_name="resize", ok=False, timeout=WAIT)  # QTasks' form
            assert (other.task_name, other.returning) == ("resize", "resized: False")
    finally:
        app.close()


async def test_echo_self_has_the_task_options_and_cached_metadata() -> None:
    app = AsyncQueueTasks()

    @app.task(echo=True, tags=["test"], priority=1, retry=3, retry_on_exc=[KeyError], test="x")
    async def test_echo_ctx(self: Any) -> dict[str, Any]:
        first = await self.ctx.get_metadata(cache=True)
        again = await self.ctx.get_metadata(cache=True)
        assert first is again
        return {
            "name": self.task_name,
            "tags": self.tags,
            "priority": self.priority,
            "extra": self.extra,
            "retry": self.retry,
            "retry_on_exc": [e.__name__ for e in self.retry_on_exc],
            "echo": self.echo,
            "decode": self.decode,
            "executor": self.executor,
            "middlewares": [self.middlewares_before, self.middlewares_after],
            "status": first.status.value,
        }

    with anyio.fail_after(WAIT):
        async with app:
            record = await app.add_task("test_echo_ctx", timeout=WAIT)
    assert record.returning == {
        "name": "test_echo_ctx",
        "tags": ["test"],
        "priority": 1,
        "extra": {"test": "x"},
        "retry": 3,
        "retry_on_exc": ["KeyError"],
        "echo": True,
        "decode": None,
        "executor": None,
        "middlewares": [[], []],
        "status": "process",
    }


def test_sync_echo_self_cancel_and_plugin_error() -> None:
    app = QueueTasks()

    @app.task(echo=True)
    def cancelled(self: Any) -> None:
        assert self.ctx.get_metadata(cache=True) is self.ctx.get_metadata(cache=True)
        self.ctx.cancel("Test task cancelled")

    @app.task(echo=True)
    def plugin_error(self: Any) -> None:
        self.ctx.plugin_error(reason="x")

    try:
        with app:
            record = app.add_task("cancelled", timeout=WAIT)
            assert record.status is TaskStatus.CANCEL
            assert record.cancel_reason == "Test task cancelled"
            record = app.add_task("plugin_error", timeout=WAIT)
            assert record.status is TaskStatus.ERROR
            assert "TaskPluginTriggerError" in (record.error or "")
    finally:
        app.close()


def test_ping_and_a_guarded_flush_all() -> None:
    app = QueueTasks()

    @app.task
    def noop() -> None:
        return None

    try:
        assert app.ping(server=False) is True
        assert app.ping() is False  # no worker of this app is alive
        app.add_task("noop")
        with app:
            assert app.ping() is True
            with pytest.raises(ComponentError, match="serving"):
                app.flush_all()
            app.add_task("noop", timeout=WAIT)
        counts = app.flush_all()
        assert counts["storage"] == 2
        assert app.inspect()["records_by_status"] == {}
    finally:
        app.close()


def test_qtasks_stats_inspect_is_an_alias(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from qtasks.cli import cli

    (tmp_path / "stats_app.py").write_text(
        "from qtasks import QueueTasks\napp = QueueTasks()\n"
        "@app.task(tags=['x'])\ndef hello(n: int) -> int:\n    return n\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    alias = runner.invoke(cli, ["-A", "stats_app:app", "stats", "inspect", "tasks", "json=true"])
    plain = runner.invoke(cli, ["-A", "stats_app:app", "inspect", "--json"])
    assert alias.output == plain.output
    assert alias.exit_code == plain.exit_code


def test_qtasks_single_dash_app_flag(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """QTasks' parser spelled the app flag ``-app``; click read it as ``-a -p -p`` and said
    "No such option: -a" (review r11 #8). It is ``--app``/``-A``, before or after the command."""
    from qtasks.cli import cli

    (tmp_path / "dash_app.py").write_text("from qtasks import QueueTasks\napp = QueueTasks()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    with_a = runner.invoke(cli, ["-A", "dash_app:app", "config", "--json"])
    assert with_a.exit_code == 0, with_a.output
    assert with_a.output != runner.invoke(cli, ["config", "--json"]).output  # the app counts
    for args in (
        ["-app", "dash_app:app", "config", "--json"],
        ["config", "-app=dash_app:app", "--json"],
    ):
        result = runner.invoke(cli, args)
        assert (result.exit_code, result.output) == (0, with_a.output), args


@pytest.mark.redis
def test_flush_all_on_redis_deletes_only_this_apps_keys(redis_url: str, prefix: str) -> None:
    import redis

    from qtasks import QueueConfig

    other = f"{prefix}-other"
    client = redis.Redis.from_url(redis_url)
    client.set(f"{{{other}:rec}}:keep", "1")
    app = QueueTasks(broker_url=redis_url, config=QueueConfig(extra={"redis_prefix": prefix}))

    @app.task
    def noop() -> None:
        return None

    try:
        app.add_task("noop")  # queued, no worker: a message and a record
        app.config_set("ns", "k", 1)
        counts = app.flush_all()
        assert counts["broker"] >= 1 and counts["storage"] >= 1 and counts["global_config"] >= 1
        assert not list(client.scan_iter(match=f"{{{prefix}:*"))
        assert client.get(f"{{{other}:rec}}:keep") == b"1"
    finally:
        app.close()
        client.delete(f"{{{other}:rec}}:keep")


class CallShapeState(AsyncState):
    name = "call-shapes"


class CallShapeShared(AsyncState):
    scope = "global_config"
    name = "call-shapes-shared"


class SyncCallShapeState(SyncState):
    name = "call-shapes-sync"


class SyncCallShapeShared(SyncState):
    scope = "global_config"
    name = "call-shapes-sync-shared"


def test_state_update_returns_every_value_as_in_qtasks() -> None:
    """QTasks' ``update(**kw)`` returns the state's values after the update:
    ``total = (await state.update(n=1))["n"]``."""
    app = QueueTasks()

    @app.task
    async def async_states(local: CallShapeState, shared: CallShapeShared) -> list[Any]:
        await local.set("a", 1)
        await shared.set("a", 1)
        return [await local.update(b=2), await shared.update(b=2)]

    @app.task
    def sync_states(local: SyncCallShapeState, shared: SyncCallShapeShared) -> list[Any]:
        local.set("a", 1)
        shared.set("a", 1)
        return [local.update(b=2), shared.update(b=2)]

    try:
        with app:
            for name in ("async_states", "sync_states"):
                record = app.add_task(name, timeout=WAIT)
                assert record.returning == [{"a": 1, "b": 2}] * 2, (name, record.error)
    finally:
        app.close()


async def test_wait_result_async_on_the_records_of_both_apps() -> None:
    """QTasks' ``await task.wait_result_async(timeout=...)``: on the async app's records (an
    alias) and on the sync app's, awaited in another event loop than the app's."""
    aio = AsyncQueueTasks()

    @aio.task
    async def double(n: int) -> int:
        return n * 2

    with anyio.fail_after(WAIT):
        async with aio:
            queued = await aio.add_task("double", 2)
            assert (await queued.wait_result_async(timeout=WAIT)).returning == 4

    app = QueueTasks()

    @app.task
    def triple(n: int) -> int:
        return n * 3

    try:
        with app:
            queued_sync = app.add_task("triple", 2)
            with anyio.fail_after(WAIT):
                final = await queued_sync.wait_result_async(timeout=WAIT)
            assert (final.status, final.returning) == (TaskStatus.SUCCESS, 6)
    finally:
        app.close()


@pytest.mark.parametrize("option", ["middlewares_before", "middlewares_after"])
def test_task_middlewares_are_checked_as_add_middleware_checks_them(option: str) -> None:
    """A task's ``middlewares_before``/``middlewares_after`` take what ``add_middleware``
    takes; anything else is refused when the task is declared, naming the task and the
    middleware, and the task is not registered."""
    from qtasks.errors import TaskDeclarationError
    from qtasks.middlewares import TaskMiddleware

    class Audit(TaskMiddleware):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return None

    async def wrapping(run: Any, call_next: Any) -> Any:
        return await call_next()

    def one_argument(run: Any) -> None:
        return None

    app = QueueTasks()
    expected = f"task 'bad': {option} takes async def mw(run, call_next)"
    for bad, wrong in (
        ("oops", ", got 'oops'"),
        (one_argument, ".one_argument at 0x"),
        (Audit(None), "; pass the class Audit, not an instance"),
    ):
        options: dict[str, Any] = {option: [wrapping, bad]}
        with pytest.raises(TaskDeclarationError) as caught:

            @app.task(name="bad", **options)
            def task() -> None: ...

        assert str(caught.value).startswith(f"{expected} (or a QTasks TaskMiddleware class)")
        assert wrong in str(caught.value)
        assert "bad" not in app.tasks

    options = {option: [Audit, wrapping]}

    @app.task(name="good", **options)
    def good() -> None: ...

    assert "good" in app.tasks


def test_a_task_middleware_is_checked_once_not_at_each_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failed run's retry copies the task's options (``with_options``), which checks them
    again: a middleware that passed is not inspected again (its signature check is the
    costly part)."""
    import qtasks.compat.middleware as middleware_module

    async def wrapping(run: Any, call_next: Any) -> Any:
        return await call_next()

    app = QueueTasks()

    @app.task(name="retried", middlewares_before=[wrapping])
    def retried() -> None: ...

    inspected: list[object] = []
    real = middleware_module._takes_run_and_call_next

    def counting(func: Any) -> bool:
        inspected.append(func)
        return real(func)

    monkeypatch.setattr(middleware_module, "_takes_run_and_call_next", counting)
    for attempt in range(20):
        assert app.tasks["retried"].with_options(retry=attempt).options.retry == attempt
    assert inspected == []


def test_add_middleware_takes_qtasks_task_middleware_classes_and_refuses_the_rest() -> None:
    """QTasks' ``app.add_middleware(MyTaskMiddleware, position=...)`` runs the class around
    every task of the app; what is not a middleware is refused when it is added, not by
    failing every task later."""
    from qtasks.errors import TaskDeclarationError
    from qtasks.middlewares import TaskMiddleware

    trail: list[str] = []

    class Before(TaskMiddleware):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            trail.append(f"before {self.task_executor.task.name}")
            return self.task_executor

    class After(TaskMiddleware):
        async def __call__(self, *args: Any, **kwargs: Any) -> Any:
            trail.append(f"after {self.task_executor.task.name}")

    app = QueueTasks()
    app.add_middleware(Before)  # QTasks' default position: before
    app.add_middleware(After, position="after")

    async def wrapping(run: Any, call_next: Any) -> Any:
        return await call_next()

    app.add_middleware(wrapping)
    for bad, message in (
        ("oops", "add_middleware takes async def mw(run, call_next)"),
        (lambda run: None, "add_middleware takes async def mw(run, call_next)"),
        (Before(None), "pass the class Before, not an instance"),
    ):
        with pytest.raises(TaskDeclarationError, match=re.escape(message)):
            app.add_middleware(bad)
    with pytest.raises(TaskDeclarationError, match="position= is for QTasks TaskMiddleware"):
        app.add_middleware(wrapping, position="before")
    with pytest.raises(TaskDeclarationError, match="position must be 'before' or 'after'"):
        app.add_middleware(Before, position="around")

    @app.task
    def plain() -> int:
        return 1

    try:
        with app:
            record = app.add_task("plain", timeout=WAIT)
    finally:
        app.close()
    assert (record.status, record.returning, record.error) == (TaskStatus.SUCCESS, 1, None)
    assert trail == ["before plain", "after plain"]


def test_qtasks_packed_args_keywords_say_how_to_pass_the_arguments(
    redis_url: str, prefix: str
) -> None:
    """QTasks' sync example writes ``self.add_task(task_name="test_num", args=(5,), ...)``
    (an older QTasks' form that packed the arguments). qtasks passes a task's arguments as
    they are, so the call is refused; the error says how to write it."""
    from qtasks import QueueConfig
    from qtasks.errors import TaskArgumentsError
    from qtasks.registries import SyncTask

    app = QueueTasks(broker_url=redis_url, config=QueueConfig(extra={"redis_prefix": prefix}))

    @app.task(name="test_num")
    def test_num(number: int) -> int:
        return number

    @app.task(name="test_echo", echo=True)
    def test_echo(self: SyncTask) -> Any:
        return self.add_task(task_name="test_num", args=(5,), timeout=50).returning

    @app.task(name="takes_args")
    def takes_args(args: list[int]) -> int:
        return sum(args)

    fix = "qtasks passes them as they are: add_task('test_num', *args, **kwargs)"
    with app:
        failed = app.add_task("test_echo", timeout=WAIT)
        assert failed.status == "error" and failed.error is not None
        assert "args= packed the task's arguments" in failed.error and fix in failed.error
        with pytest.raises(TaskArgumentsError, match=r"args= and kwargs= packed") as raised:
            test_num.add_task(args=(5,), kwargs={}, timeout=WAIT)
        assert fix in str(raised.value)
        assert app.add_task("takes_args", args=[1, 2], timeout=WAIT).returning == 3
        with pytest.raises(TaskArgumentsError) as plain:
            app.add_task("takes_args", [1], args=[2])
        assert "packed" not in str(plain.value)  # its own parameter: no hint
    app.close()
