"""Plugins: transform hooks, the exception policy, registration checks, middlewares and
entry-point discovery (the separately installed ``qtasks-audit-example`` distribution)."""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest

from qtasks import (
    AsyncQueueTasks,
    QueueConfig,
    TaskRecord,
    TaskRun,
    TaskStatus,
    discovery,
    hookimpl,
)
from qtasks.errors import ConfigError, PluginError
from qtasks.messages import Message

pytestmark = pytest.mark.anyio

CallNext = Callable[[], Awaitable[Any]]


@pytest.fixture
async def app() -> AsyncIterator[AsyncQueueTasks]:
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"], shutdown_grace=1.0))
    yield app
    await app.aclose()


# --- transform hooks change what runs and what is stored ------------------------------------


async def test_a_transform_that_hands_its_value_back_leaves_it_as_it_came(
    app: AsyncQueueTasks,
) -> None:
    """Returned as it came, a value is unchanged, even one that is awaitable (a task's result
    object with ``__await__``): it is neither awaited nor checked for being awaitable."""
    awaited: list[bool] = []

    class Deferred:
        def __await__(self) -> Any:
            awaited.append(True)
            yield from ()
            return "not the value"

    class Passthrough:
        @hookimpl
        def qtasks_executor_result(self, result: Any) -> Any:
            return result

    class Later:  # an async implementation first: the rest chain after its await
        @hookimpl
        async def qtasks_executor_result(self, result: Any) -> None:
            return None

    app.add_plugin(Passthrough())
    value = Deferred()
    got = await app.hooks.transform("qtasks_executor_result", "result", result=value)
    assert got is value
    assert awaited == []
    app.add_plugin(Later())
    got = await app.hooks.transform("qtasks_executor_result", "result", result=value)
    assert got is value
    assert awaited == []


async def test_args_and_result_transforms_change_the_call_and_the_stored_result(
    app: AsyncQueueTasks,
) -> None:
    seen: list[tuple[int, int]] = []

    class Rewrite:
        @hookimpl
        async def qtasks_executor_args(
            self, args: list[Any], kwargs: dict[str, Any]
        ) -> tuple[list[Any], dict[str, Any]]:
            return [a * 10 for a in args], kwargs

        @hookimpl
        def qtasks_executor_result(self, result: Any) -> Any:
            return {"wrapped": result}

    class Untouched:
        @hookimpl
        def qtasks_executor_result(self, result: Any) -> None:
            return None  # "unchanged": must not wipe the value

    app.add_plugin(Rewrite())
    app.add_plugin(Untouched())

    @app.task
    async def add(a: int, b: int) -> int:
        seen.append((a, b))
        return a + b

    async with app:
        task = await add.add_task(1, 2, timeout=5)
    assert seen == [(10, 20)]
    assert task.returning == {"wrapped": 30}
    stored = await app.get(task.uuid)
    assert stored is not None
    assert stored.returning == {"wrapped": 30}


async def test_an_args_transform_sees_the_callers_arguments_then_injection_fills_the_rest(
    app: AsyncQueueTasks,
) -> None:
    """Injection is the executor's step after the hook: a plugin sees what the caller passed,
    and the task still gets its dependency when the plugin returns arguments of its own."""
    from qtasks import Depends

    seen_by_plugin: list[dict[str, Any]] = []
    seen_by_task: list[tuple[int, str]] = []

    class Look:
        @hookimpl
        def qtasks_executor_args(
            self, args: list[Any], kwargs: dict[str, Any]
        ) -> tuple[list[Any], dict[str, Any]]:
            seen_by_plugin.append(dict(kwargs))
            return args, {**kwargs, "x": kwargs["x"] + 1}

    app.add_plugin(Look())

    def token() -> str:
        return "injected"

    @app.task
    async def use(x: int, tok: str = Depends(token)) -> None:
        seen_by_task.append((x, tok))

    async with app:
        await use.add_task(x=1, timeout=5)
    assert seen_by_plugin == [{"x": 1}]
    assert seen_by_task == [(2, "injected")]


async def test_enqueue_transform_replaces_the_message_and_get_transform_the_record(
    app: AsyncQueueTasks,
) -> None:
    class Tagger:
        @hookimpl
        def qtasks_task_enqueue(self, message: Message) -> Message:
            message.kwargs = {**message.kwargs, "who": "plugin"}
            message.priority = 7
            return message

        @hookimpl
        def qtasks_storage_got(self, record: TaskRecord) -> TaskRecord:
            record.kwargs = {**record.kwargs, "seen_by_get": True}
            return record

    app.add_plugin(Tagger())

    @app.task
    async def greet(who: str = "nobody") -> str:
        return f"hi {who}"

    async with app:
        task = await greet.add_task(timeout=5)
    assert (task.returning, task.priority) == ("hi plugin", 7)
    got = await app.get(task.uuid)
    assert got is not None
    assert got.kwargs == {"who": "plugin", "seen_by_get": True}


# --- the exception policy ---------------------------------------------------------------------


async def test_implementations_after_an_async_one_run_once_each_in_order() -> None:
    """A notification and a transform whose third implementation called (of four) is async:
    the caller awaits it, then calls the fourth once (the rest is found by the position of
    the one that returned an awaitable; the fourth raising in the notification is logged
    and skipped, as ever)."""
    import anyio

    from qtasks.plugins import Hooks

    calls: list[str] = []

    class Sync:
        def __init__(self, name: str, *, raises: bool = False) -> None:
            self.name, self.raises = name, raises

        @hookimpl
        def qtasks_storage_added(self, record: Any) -> None:
            calls.append(f"{self.name} added")
            if self.raises:
                raise RuntimeError("ignored")

        @hookimpl
        def qtasks_task_enqueue(self, message: Message) -> Message:
            calls.append(f"{self.name} enqueue")
            message.headers[self.name] = len(message.headers)
            return message

    class Async:
        name = "b"

        @hookimpl
        async def qtasks_storage_added(self, record: Any) -> None:
            await anyio.lowlevel.checkpoint()
            calls.append("b added")

        @hookimpl
        async def qtasks_task_enqueue(self, message: Message) -> Message:
            await anyio.lowlevel.checkpoint()
            calls.append("b enqueue")
            message.headers["b"] = len(message.headers)
            return message

    hooks = Hooks()
    # pluggy calls the last registered first: d, c, b (async), a.
    for each in (Sync("a", raises=True), Async(), Sync("c"), Sync("d")):
        hooks.register(each)
    await hooks.notify("qtasks_storage_added", app=None, record=None)
    message = Message(uuid="u", task_name="t")
    result = await hooks.transform("qtasks_task_enqueue", "message", app=None, message=message)
    assert calls == [
        *(f"{label} added" for label in "dcba"),
        *(f"{label} enqueue" for label in "dcba"),
    ]
    assert result is message
    assert message.headers == {"d": 0, "c": 1, "b": 2, "a": 3}


async def test_notification_hook_exception_is_logged_with_the_plugin_name_and_ignored(
    app: AsyncQueueTasks, caplog: pytest.LogCaptureFixture
) -> None:
    class Noisy:
        @hookimpl
        async def qtasks_worker_execute_before(self) -> None:
            raise RuntimeError("notification broke")

        @hookimpl
        def qtasks_task_enqueued(self) -> None:
            raise RuntimeError("enqueued broke")

    app.add_plugin(Noisy(), name="noisy")

    @app.task
    async def ok() -> str:
        return "fine"

    with caplog.at_level(logging.ERROR, logger="qtasks.plugins"):
        async with app:
            task = await ok.add_task(timeout=5)
    assert (task.status, task.returning) == (TaskStatus.SUCCESS, "fine")
    messages = [r.getMessage() for r in caplog.records]
    assert any("'noisy'" in m and "qtasks_worker_execute_before" in m for m in messages)
    assert any("'noisy'" in m and "qtasks_task_enqueued" in m for m in messages)


async def test_transform_hook_exception_fails_the_task_with_plugin_error_and_no_retry(
    app: AsyncQueueTasks,
) -> None:
    class Broken:
        @hookimpl
        def qtasks_executor_args(self) -> None:
            raise KeyError("missing thing")

    app.add_plugin(Broken(), name="broken-args")
    ran: list[int] = []

    @app.task(retry=3, retry_backoff=0)
    async def victim() -> None:
        ran.append(1)

    async with app:
        task = await victim.add_task(timeout=5)
    assert task.status is TaskStatus.ERROR
    assert task.error is not None
    assert task.error.startswith("PluginError: plugin 'broken-args'")
    assert "qtasks_executor_args" in task.error
    assert "missing thing" in task.error
    assert ran == []
    assert task.attempt == 1  # a broken plugin is not retried


async def test_result_transform_exception_fails_the_task(app: AsyncQueueTasks) -> None:
    class Broken:
        @hookimpl
        async def qtasks_executor_result(self) -> None:
            raise ValueError("cannot wrap")

    app.add_plugin(Broken(), name="broken-result")

    @app.task
    async def ok() -> int:
        return 1

    async with app:
        task = await ok.add_task(timeout=5)
    assert task.status is TaskStatus.ERROR
    assert "plugin 'broken-result'" in (task.error or "")


async def test_enqueue_transform_exception_aborts_add_task(app: AsyncQueueTasks) -> None:
    class Refuse:
        @hookimpl
        def qtasks_task_enqueue(self) -> None:
            raise PermissionError("not allowed")

    app.add_plugin(Refuse(), name="gate")
    with pytest.raises(PluginError) as info:
        await app.add_task("anything")
    assert info.value.plugin == "gate"
    assert sum((await app.storage.stats()).values()) == 0  # nothing stored either


@pytest.mark.parametrize("colour", ["sync", "async"])
async def test_a_transform_returning_the_wrong_shape_is_blamed_on_its_plugin(
    app: AsyncQueueTasks, colour: str
) -> None:
    """A transform that returned a value of the wrong shape failed later, in the core, blamed
    on the task ("TypeError: 'int' object is not iterable" on its record) or on the caller
    (``add_task`` raising "AttributeError: 'dict' object has no attribute 'uuid'"), never
    naming the plugin (walk-through). It fails as a transform that raised does: a
    ``PluginError`` naming the plugin, the hook and what was wrong, nothing stored."""

    def plugin(hook: str, value: Any) -> object:
        def plain(self: Any) -> Any:
            return value

        async def coroutine(self: Any) -> Any:
            return value

        return type("Wrong", (), {hook: hookimpl(plain if colour == "sync" else coroutine)})()

    app.add_plugin(plugin("qtasks_task_enqueue", {"task": "add"}), name="wrong-message")
    with pytest.raises(PluginError) as info:
        await app.add_task("anything")
    assert str(info.value) == (
        "plugin 'wrong-message': hook qtasks_task_enqueue returned message of type dict, "
        "not Message"
    )
    assert sum((await app.storage.stats()).values()) == 0
    app.hooks.unregister(app.hooks.pm.get_plugin("wrong-message"))

    # args=1, kwargs=2, where (list, dict) was due
    app.add_plugin(plugin("qtasks_executor_args", [1, 2]), name="wrong-args")

    @app.task(retry=2, retry_backoff=0)
    async def add(a: int, b: int) -> int:
        return a + b

    async with app:
        task = await add.add_task(1, 2, timeout=5)
    assert (task.status, task.attempt) == (TaskStatus.ERROR, 1)  # a broken plugin: no retry
    assert task.error == (
        "PluginError: plugin 'wrong-args': hook qtasks_executor_args returned args of type "
        "int, not list or tuple"
    )


SECRET = "redis://u:hunter2@db:6379/0 password=hunter2"


def _everything_logged(caplog: pytest.LogCaptureFixture) -> str:
    """What the handlers got: each message and any traceback handed to them."""
    shown = []
    for record in caplog.records:
        shown.append(record.getMessage())
        if record.exc_info:
            shown.append("".join(traceback.format_exception(*record.exc_info)))
    return "\n".join(shown)


async def test_a_hooks_runtime_error_is_shown_masked_everywhere(
    app: AsyncQueueTasks, caplog: pytest.LogCaptureFixture
) -> None:
    """A hook that fails quoting a DSN: the log line, the add error, the task record and
    every traceback show it masked, as the errors of a plugin's import and constructor are
    (review r15 #7). The traceback is logged at DEBUG, masked too."""

    class Leaky:
        @hookimpl
        def qtasks_task_enqueued(self) -> None:
            raise RuntimeError(f"enqueued hook exploded: {SECRET}")

        @hookimpl
        def qtasks_executor_args(self) -> None:
            raise RuntimeError(f"args hook exploded: {SECRET}")

        @hookimpl
        def qtasks_task_retry_delay(self) -> float:
            raise RuntimeError(f"policy exploded: {SECRET}")

    class Gate:
        @hookimpl
        def qtasks_task_enqueue(self, message: Message) -> Message:
            if message.task_name == "refused":
                raise RuntimeError(f"enqueue hook exploded: {SECRET}")
            return message

    @app.task
    async def ok() -> str:
        return "fine"

    with caplog.at_level(logging.DEBUG):
        async with app:
            app.add_plugin(Gate(), name="gate")
            with pytest.raises(PluginError) as refused:
                await app.add_task("refused")
            app.add_plugin(Leaky(), name="leaky")
            task = await ok.add_task(timeout=5)
            decided = None
            with pytest.raises(PluginError) as undecided:
                decided = app.hooks.decide(
                    "qtasks_task_retry_delay", app=app, task=ok, record=task, exc=ValueError()
                )
    assert decided is None
    assert str(refused.value) == (
        "plugin 'gate': hook qtasks_task_enqueue raised RuntimeError: enqueue hook exploded: "
        "redis://u:***@db:6379/0 password=***"
    )
    assert task.status is TaskStatus.ERROR
    assert task.error == (
        "PluginError: plugin 'leaky': hook qtasks_executor_args raised RuntimeError: args hook "
        "exploded: redis://u:***@db:6379/0 password=***"
    )
    assert "hunter2" not in (task.traceback or "")
    for error in (refused.value, undecided.value):
        assert "hunter2" not in "".join(traceback.format_exception(error))
        assert error.__cause__ is None
    logged = _everything_logged(caplog)
    assert "hunter2" not in logged
    assert (
        "plugin 'leaky' failed in hook qtasks_task_enqueued (ignored): RuntimeError: "
        "enqueued hook exploded: redis://u:***@db:6379/0 password=***"
    ) in logged
    # The traceback for the plugin's author: at DEBUG, masked, naming the hook's own line.
    assert "plugin 'leaky': hook qtasks_executor_args raised\nTraceback" in logged
    assert 'in qtasks_executor_args\n    raise RuntimeError(f"args hook exploded: ' in logged


# --- registration checks ----------------------------------------------------------------------


def test_unknown_hook_name_fails_at_registration() -> None:
    class Typo:
        @hookimpl
        def qtasks_task_suceeded(self) -> None: ...

    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"]))
    with pytest.raises(PluginError, match="qtasks_task_suceeded") as info:
        app.add_plugin(Typo(), name="typo")
    assert info.value.plugin == "typo"
    assert not app.hooks.pm.has_plugin("typo")


def test_a_hook_method_without_hookimpl_fails_at_registration() -> None:
    """A hook method without ``@hookimpl`` was registered without a word and never called
    (pluggy takes marked methods only): a plugin that did nothing, silently (walk-through).
    Other ``qtasks_`` attributes (``qtasks_off``, a helper not named after a hook) are fine."""

    class Forgot:
        qtasks_off = "off: set audit.enabled"

        def qtasks_helper(self) -> None: ...

        @hookimpl
        def qtasks_task_failed(self) -> None: ...

        def qtasks_task_succeeded(self) -> None: ...

    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"]))
    with pytest.raises(
        PluginError, match="qtasks_task_succeeded is named after a hook but not marked @hookimpl"
    ) as info:
        app.add_plugin(Forgot(), name="forgot")
    assert info.value.plugin == "forgot"
    assert not app.hooks.pm.has_plugin("forgot")
    del Forgot.qtasks_task_succeeded
    app.add_plugin(Forgot(), name="forgot")
    assert app.hooks.pm.has_plugin("forgot")


def test_async_firstresult_hook_is_rejected() -> None:
    class AsyncDecide:
        @hookimpl
        async def qtasks_task_retry_delay(self) -> float:
            return 1.0

    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"]))
    with pytest.raises(PluginError, match="plain function"):
        app.add_plugin(AsyncDecide())


def test_two_plugins_with_one_name_are_refused() -> None:
    class A:
        @hookimpl
        def qtasks_app_started(self) -> None: ...

    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"]))
    app.add_plugin(A(), name="same")
    with pytest.raises(PluginError, match="already registered"):
        app.add_plugin(A(), name="same")


# --- middlewares --------------------------------------------------------------------------------


async def test_middlewares_form_an_onion_see_errors_and_can_short_circuit(
    app: AsyncQueueTasks,
) -> None:
    trail: list[str] = []

    def layer(label: str) -> Callable[[TaskRun, CallNext], Awaitable[Any]]:
        async def mw(run: TaskRun, call_next: CallNext) -> Any:
            trail.append(f"{label}>")
            try:
                result = await call_next()
            except ValueError as exc:
                trail.append(f"{label} saw {exc}")
                raise
            trail.append(f"<{label}")
            return result

        return mw

    async def short_circuit(run: TaskRun, call_next: CallNext) -> Any:
        if run.message.kwargs.get("cached"):
            return "from cache"
        return await call_next()

    app.add_middleware(layer("app"))

    @app.task(middlewares_before=[layer("before")], middlewares_after=[short_circuit])
    async def work(fail: bool = False, cached: bool = False) -> str:
        trail.append("task")
        if fail:
            raise ValueError("bad")
        return "computed"

    async with app:
        ok = await work.add_task(timeout=5)
        assert trail == ["app>", "before>", "task", "<before", "<app"]
        trail.clear()
        failed = await work.add_task(fail=True, timeout=5)
        assert trail == ["app>", "before>", "task", "before saw bad", "app saw bad"]
        trail.clear()
        cached = await work.add_task(cached=True, timeout=5)
    assert (ok.returning, failed.status, cached.returning) == (
        "computed",
        TaskStatus.ERROR,
        "from cache",
    )
    assert trail == ["app>", "before>", "<before", "<app"]  # the task never ran


async def test_a_plugin_adds_a_middleware_through_the_hook(app: AsyncQueueTasks) -> None:
    """The core composes the app's and the task's middlewares; a plugin on the hook gets that
    list, outermost first, and what it returns wraps the call."""
    seen: list[list[str]] = []
    calls: list[str] = []

    def layer(name: str) -> Any:
        async def mw(run: TaskRun, call_next: CallNext) -> Any:
            calls.append(name)
            return await call_next()

        mw.__name__ = name
        return mw

    class Timing:
        def __init__(self) -> None:
            self.wrapped: list[str] = []

        @hookimpl
        def qtasks_executor_middlewares(self, middlewares: list[Any]) -> list[Any]:
            seen.append([m.__name__ for m in middlewares])

            async def around(run: TaskRun, call_next: CallNext) -> Any:
                self.wrapped.append(run.task.name)
                calls.append("plugin")
                return await call_next()

            return [around, *middlewares]

    timing = Timing()
    app.add_plugin(timing)
    app.add_middleware(layer("app"))

    @app.task(middlewares_before=[layer("before")], middlewares_after=[layer("after")])
    async def ok() -> int:
        return 2

    async with app:
        task = await ok.add_task(timeout=5)
    assert (task.returning, timing.wrapped) == (2, ["ok"])
    assert seen == [["app", "before", "after"]]
    assert calls == ["plugin", "app", "before", "after"]


async def test_what_a_run_registers_with_on_close_is_closed_on_every_path_last_first(
    app: AsyncQueueTasks, caplog: pytest.LogCaptureFixture
) -> None:
    """``run.on_close`` callbacks are awaited once the code ended, success or error, the last
    registered first and before ``qtasks_executor_closed``; one that raises is logged and the
    others still run."""
    events: list[str] = []

    async def registers(run: TaskRun, call_next: CallNext) -> Any:
        for name in ("first", "broken", "last"):

            async def close(name: str = name) -> None:
                events.append(f"{name} {run.task.name}")
                if name == "broken":
                    raise RuntimeError("teardown failed")

            run.on_close(close)
        return await call_next()

    class Closed:
        @hookimpl
        def qtasks_executor_closed(self, run: TaskRun) -> None:
            events.append(f"hook {run.task.name}")

    app.add_plugin(Closed())
    app.add_middleware(registers)

    @app.task
    async def ok() -> int:
        return 1

    @app.task
    async def fails() -> int:
        raise ValueError("no")

    with caplog.at_level(logging.ERROR, logger="qtasks.worker"):
        async with app:
            assert (await ok.add_task(timeout=5)).status is TaskStatus.SUCCESS
            assert (await fails.add_task(timeout=5)).status is TaskStatus.ERROR
    assert events == [
        *("last ok", "broken ok", "first ok", "hook ok"),
        *("last fails", "broken fails", "first fails", "hook fails"),
    ]
    failed = [r for r in caplog.records if "closing what task" in r.getMessage()]
    assert len(failed) == 2 and all(r.exc_info is not None for r in failed)


# --- entry-point discovery ----------------------------------------------------------------------


def test_third_party_plugin_is_discovered_with_its_distribution() -> None:
    found = {(d.kind, d.name): d for d in discovery.discover_all()}
    audit = found[("plugin", "audit")]
    assert (audit.distribution, audit.version) == ("qtasks-audit-example", "0.3.1")
    assert audit.value == "qtasks_audit_example:AuditPlugin"
    assert found[("cli", "audit")].distribution == "qtasks-audit-example"
    assert found[("broker", "memory")].distribution == "qtasks-core"


async def test_third_party_plugin_hooks_fire_in_a_real_worker() -> None:
    app = AsyncQueueTasks(config=QueueConfig(extra={"audit": {"prefix": "checked"}}))
    audit: Any = app.hooks.pm.get_plugin("audit")
    assert type(audit).__module__ == "qtasks_audit_example"
    assert audit.prefix == "checked"  # built with from_config(config)

    @app.task
    async def ok() -> int:
        return 1

    @app.task
    async def bad() -> None:
        raise ValueError("x")

    try:
        async with app:
            await ok.add_task(timeout=5)
            await bad.add_task(timeout=5)
        report = await app.inspect()
    finally:
        await app.aclose()
    assert ("app_started", app.name) in audit.events
    assert ("succeeded", "ok") in audit.events  # an async hook implementation, awaited
    assert ("failed", "bad") in audit.events
    assert report["audit"]["succeeded"] == 1  # its qtasks_inspect transform


def test_disabled_plugin_is_not_loaded() -> None:
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["audit"]))
    assert not app.hooks.pm.has_plugin("audit")
    assert AsyncQueueTasks().hooks.pm.has_plugin("audit")


def test_a_disabled_name_no_installed_plugin_has_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A misspelt name leaves the plugin it meant loaded: warned, with the close match. Only
    warned: a configuration shared with another environment may name a plugin installed there
    only."""
    with caplog.at_level(logging.WARNING, logger="qtasks.discovery"):
        app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["audti", "qtasks_fancy"]))
    assert app.hooks.pm.has_plugin("audit")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2
    assert warned[0].startswith(
        "plugins_disabled names 'audti', which is not an installed plugin (did you mean 'audit'?"
    )
    assert "installed: audit, " in warned[0]
    assert "did you mean" not in warned[1] and "'qtasks_fancy'" in warned[1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qtasks.discovery"):
        AsyncQueueTasks(config=QueueConfig(plugins_disabled=["audit", "*"]))
    assert not caplog.records


def _fake_entry_points(monkeypatch: pytest.MonkeyPatch, group: str, eps: list[EntryPoint]) -> None:
    real = discovery.entry_points  # type: ignore[attr-defined]  # the name discovery imports

    def fake(*, group: str) -> Any:
        return eps if group == wanted else real(group=group)

    wanted = group
    monkeypatch.setattr(discovery, "entry_points", fake)


def test_entry_point_plugin_naming_an_unknown_hook_fails_app_startup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "typo_plugin_mod.py").write_text(
        "from qtasks import hookimpl\n"
        "class TypoPlugin:\n"
        "    @hookimpl\n"
        "    def qtasks_worker_started(self): ...\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = EntryPoint("typo", "typo_plugin_mod:TypoPlugin", "qtasks.plugins")
    _fake_entry_points(monkeypatch, "qtasks.plugins", [ep])
    with pytest.raises(PluginError, match="unknown hook 'qtasks_worker_started'") as info:
        AsyncQueueTasks()
    assert info.value.plugin == "typo"
    # ...and configuration can switch it off.
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["typo"]))
    assert not app.hooks.pm.has_plugin("typo")
    sys.modules.pop("typo_plugin_mod", None)


def test_entry_point_plugin_that_cannot_import_is_logged_and_skipped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ep = EntryPoint("ghost", "no_such_module_here:Plugin", "qtasks.plugins")
    _fake_entry_points(monkeypatch, "qtasks.plugins", [ep])
    with caplog.at_level(logging.ERROR, logger="qtasks.discovery"):
        app = AsyncQueueTasks()
    assert not app.hooks.pm.has_plugin("ghost")
    assert any(
        "'ghost'" in r.getMessage() and "plugins_disabled" in r.getMessage() for r in caplog.records
    )


def test_missing_component_name_lists_installed_and_the_distribution_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = discovery.entry_points  # type: ignore[attr-defined]  # the name discovery imports
    memory = {
        "qtasks.brokers": "MemoryBroker",
        "qtasks.storages": "MemoryStorage",
        "qtasks.global_configs": "MemoryGlobalConfig",
    }

    def without_redis(*, group: str) -> Any:  # qtasks-redis not installed at all
        if group not in memory:
            return real(group=group)
        return [EntryPoint("memory", f"qtasks.memory:{memory[group]}", group)]

    monkeypatch.setattr(discovery, "entry_points", without_redis)
    with pytest.raises(ConfigError) as info:
        discovery.load("broker", "redis")
    message = str(info.value)
    assert "no broker named 'redis'" in message
    assert "installed: memory" in message
    assert "pip install qtasks-redis" in message
    with pytest.raises(ConfigError, match=r"entry-point group qtasks\.brokers"):
        discovery.load("broker", "kafka")


def test_a_name_whose_distribution_is_installed_says_what_it_provides() -> None:
    """``--storage rabbitmq`` told to ``pip install qtasks-rabbitmq``, which is installed and
    has a broker of that name only (review r15 #10)."""
    with pytest.raises(ConfigError) as info:
        discovery.load("storage", "rabbitmq")
    message = str(info.value)
    assert message.startswith("no storage named 'rabbitmq' is installed (installed: memory")
    assert message.endswith(
        "; qtasks-rabbitmq is installed and provides a broker 'rabbitmq', but no storage: name "
        "one of those installed"
    )
    assert "pip install" not in message


def test_components_are_built_by_name_from_the_config() -> None:
    config = QueueConfig(lease=3.0)
    built = discovery.build_components(config)
    assert {k: type(v).__name__ for k, v in built.items()} == {
        "broker": "MemoryBroker",
        "storage": "MemoryStorage",
        "global_config": "MemoryGlobalConfig",
    }


LEAK = "cannot reach amqp://audit:hunter2@mq:5672/ (password=hunter2)"
"""What a plugin or component that cannot reach its server often raises: its DSN."""


def _leaky_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, body: str) -> str:
    """A module ``name`` in ``tmp_path`` on ``sys.path``, forgotten after the test."""
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, name, None)  # undone by removing whatever is imported
    del sys.modules[name]
    return name


def _printed(error: BaseException) -> str:
    """``error`` as any traceback print shows it, every chained exception included."""
    return "".join(traceback.format_exception(error))


LEAKY_CLASS = (
    "class Leaky:\n"
    "    @classmethod\n"
    "    def from_config(cls, config):\n"
    f"        raise ConnectionError({LEAK!r})\n"
)
LEAKY_IMPORT = f"raise ConnectionError({LEAK!r})\n"


def test_a_plugin_that_cannot_be_built_shows_no_credential_in_any_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PluginError's text is masked, and the raw error is not chained to it (its
    ``__cause__`` or ``__context__`` would print the password in any traceback)."""
    module = _leaky_module(tmp_path, monkeypatch, "leaky_plugin_mod", LEAKY_CLASS)
    ep = EntryPoint("audit", f"{module}:Leaky", "qtasks.plugins")
    _fake_entry_points(monkeypatch, "qtasks.plugins", [ep])
    with pytest.raises(PluginError) as info:
        AsyncQueueTasks()
    assert "hunter2" not in _printed(info.value)
    assert "ConnectionError: cannot reach amqp://audit:***@mq:5672/ (password=***" in str(
        info.value
    )
    assert info.value.__cause__ is None and info.value.__context__ is None


@pytest.mark.parametrize(
    ("body", "failure"),
    [
        (LEAKY_CLASS, "could not be built"),
        (LEAKY_IMPORT, "failed to import"),
    ],
    ids=["from_config", "import"],
)
def test_a_component_that_cannot_be_built_shows_no_credential_in_any_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, failure: str
) -> None:
    """docs/configuration.md: the error of a component that fails to import or to be built
    is masked like a plugin's, and its traceback holds no raw exception either."""
    module = _leaky_module(tmp_path, monkeypatch, "leaky_broker_mod", body)
    ep = EntryPoint("leaky", f"{module}:Leaky", "qtasks.brokers")
    _fake_entry_points(monkeypatch, "qtasks.brokers", [ep])
    with pytest.raises(ConfigError) as info:
        discovery.build_components(QueueConfig(broker="leaky"))
    assert "hunter2" not in _printed(info.value)
    message = str(info.value)
    assert message.startswith(f"broker 'leaky' ({module}:Leaky, from ")
    assert f"{failure}: ConnectionError: cannot reach amqp://audit:***@mq:5672/" in message
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_a_cli_extension_that_cannot_import_is_logged_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    module = _leaky_module(tmp_path, monkeypatch, "leaky_cli_mod", LEAKY_IMPORT)
    ep = EntryPoint("leaky", f"{module}:cli", "qtasks.cli")
    _fake_entry_points(monkeypatch, "qtasks.cli", [ep])
    with caplog.at_level(logging.WARNING, logger="qtasks.discovery"):
        assert discovery.load_cli_extensions() == []
    assert "hunter2" not in caplog.text
    assert "'leaky'" in caplog.text and "amqp://audit:***@mq:5672/" in caplog.text


def test_sync_app_hooks_fire_in_its_worker_thread() -> None:
    from qtasks import QueueTasks

    seen: list[str] = []

    class Seen:
        @hookimpl
        async def qtasks_task_succeeded(self, record: TaskRecord) -> None:
            seen.append(record.task_name)

    app = QueueTasks(config=QueueConfig(plugins_disabled=["*"]))
    app.add_plugin(Seen())

    @app.task
    def double(x: int) -> int:
        return x * 2

    try:
        with app:
            task = app.add_task("double", 4, timeout=5)
    finally:
        app.close()
    assert (task.returning, seen) == (8, ["double"])


async def test_decide_hook_exception_is_logged_and_the_task_fails_without_retry(
    app: AsyncQueueTasks, caplog: pytest.LogCaptureFixture
) -> None:
    class BadPolicy:
        @hookimpl(tryfirst=True)
        def qtasks_task_retry_delay(self) -> float:
            raise ZeroDivisionError("policy bug")

    app.add_plugin(BadPolicy(), name="bad-policy")

    @app.task(retry=5, retry_backoff=0)
    async def boom() -> None:
        raise ValueError("x")

    with caplog.at_level(logging.ERROR, logger="qtasks.worker"):
        async with app:
            task = await boom.add_task(timeout=5)
    assert (task.status, task.attempt) == (TaskStatus.ERROR, 1)
    assert any("bad-policy" in r.getMessage() for r in caplog.records)


def test_entry_points_are_scanned_once_per_process_and_plugins_built_per_app(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = discovery.entry_points  # type: ignore[attr-defined]  # imported there, not exported
    scans: list[str] = []

    def counting(*, group: str) -> Any:
        scans.append(group)
        return real(group=group)

    monkeypatch.setattr(discovery, "entry_points", counting)
    first, second = AsyncQueueTasks(), AsyncQueueTasks()
    AsyncQueueTasks.from_config()
    assert scans.count("qtasks.plugins") == 1
    assert scans.count("qtasks.brokers") == 1
    # Each app still has its own plugin objects.
    assert first.hooks.pm.get_plugin("audit") is not second.hooks.pm.get_plugin("audit")
    discovery.rescan()  # e.g. after installing a distribution into the running process
    AsyncQueueTasks()
    assert scans.count("qtasks.plugins") == 2
