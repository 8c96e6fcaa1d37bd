"""Plugins written for QTasks (``BasePlugin`` + ``trigger``) and ``app.events.on.<event>()``."""

from __future__ import annotations

from types import UnionType
from typing import Any

import anyio
import pytest

from qtasks import AsyncQueueTasks, QueueConfig, QueueTasks
from qtasks.compat.plugins import TRIGGERS, UNMAPPED
from qtasks.errors import PluginError
from qtasks.plugins.base import BasePlugin
from qtasks.record import TaskStatus

WAIT = 10
pytestmark = pytest.mark.anyio


class Recorder(BasePlugin):
    """Remembers every trigger it sees; optionally answers some."""

    def __init__(self, answers: dict[str, Any] | None = None) -> None:
        super().__init__("recorder")
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.answers = answers or {}
        self.started = self.stopped = 0

    async def start(self, *args: Any, **kwargs: Any) -> None:
        self.started += 1

    def stop(self, *args: Any, **kwargs: Any) -> None:
        self.stopped += 1

    async def trigger(self, name: str, **kwargs: Any) -> dict[str, Any] | None:
        self.seen.append((name, kwargs))
        answer = self.answers.get(name)
        return answer(**kwargs) if callable(answer) else answer

    def names(self) -> list[str]:
        return [name for name, _ in self.seen]


async def test_a_worker_plugin_sees_the_triggers_of_a_task_in_order() -> None:
    app = AsyncQueueTasks()
    plugin = Recorder()
    app.add_plugin(plugin, component="worker")

    @app.task
    async def double(n: int) -> int:
        return n * 2

    with anyio.fail_after(WAIT):
        async with app:
            record = await app.add_task("double", 21, timeout=WAIT)
    assert record.returning == 42
    names = plugin.names()
    order = [
        "worker_start",
        "worker_add",
        "worker_execute_before",
        "worker_run_task_before",
        "task_executor_args_replace",
        "task_executor_before_execute",
        "task_executor_run_task",
        "task_executor_after_execute",
        "task_executor_task_close",
        "worker_remove_finished_task",
        "worker_execute_after",
        "worker_stop",
    ]
    assert [n for n in names if n in order] == order
    assert plugin.started == 1 and plugin.stopped == 1
    before = dict(plugin.seen)["worker_execute_before"]
    assert before["task_func"].name == "double" and before["model"].uuid == record.uuid


async def test_returned_values_change_data_only_where_qtasks_transforms() -> None:
    app = AsyncQueueTasks()
    app.add_plugin(
        Recorder(
            {
                # Only the returned key changes (QTasks 1.7 also reset args/kw here).
                "qtasks_add_task_before_broker": {"priority": 5},
                "task_executor_args_replace": lambda args, kw, **_: {"args": [a + 1 for a in args]},
                "task_executor_decode": lambda result, **_: {"result": f"<{result}>"},
            }
        ),
        trigger_names=["qtasks_add_task_before_broker"],
    )
    worker_side = Recorder(
        {
            "task_executor_args_replace": lambda args, kw, **_: {"args": [a + 1 for a in args]},
            "task_executor_decode": lambda result, **_: {"result": f"<{result}>"},
            "worker_add": {"task_name": "renamed"},  # notification only: ignored, logged
        }
    )
    app.add_plugin(
        worker_side,
        ["task_executor_args_replace", "task_executor_decode", "worker_add"],
        component="worker",
    )

    @app.task
    def echo(n: int) -> int:
        return n

    with anyio.fail_after(WAIT):
        async with app:
            record = await app.add_task("echo", 1, timeout=WAIT)
    assert record.priority == 5
    assert record.args == [1]
    assert record.returning == "<2>"


async def test_trigger_error_can_turn_a_failure_into_a_result() -> None:
    app = AsyncQueueTasks()

    class TestPlugin(BasePlugin):
        async def trigger(self, name: str, **kwargs: Any) -> dict[str, Any] | None:
            if name == "task_executor_run_task_trigger_error":
                return {"result": f"handled {type(kwargs['e']).__name__}"}
            return None

    app.add_plugin(
        TestPlugin(), trigger_names=["task_executor_run_task_trigger_error"], component="worker"
    )

    @app.task(echo=True)
    async def test_task(self: Any) -> None:
        self.ctx.plugin_error()

    with anyio.fail_after(WAIT):
        async with app:
            record = await app.add_task("test_task", timeout=WAIT)
    assert record.status is TaskStatus.SUCCESS
    assert record.returning == "handled TaskPluginTriggerError"


def test_registration_errors_name_the_reason() -> None:
    app = QueueTasks()
    with pytest.raises(PluginError, match="no qtasks moment"):
        app.add_plugin(Recorder(), trigger_names=["storage_get_all"], component="storage")
    with pytest.raises(PluginError, match="component='worker'"):
        app.add_plugin(Recorder(), trigger_names=["worker_add"])
    with pytest.raises(PluginError, match="unknown QTasks trigger"):
        app.add_plugin(Recorder(), trigger_names=["worker_add_typo"], component="worker")


async def test_qtasks_positional_add_plugin_reaches_the_component_on_both_apps() -> None:
    """QTasks' ``add_plugin(plugin, trigger_names, component)`` given positionally: the third
    argument is the component (it was taken for the trigger names and refused, review r11 #5)."""
    aio = AsyncQueueTasks()
    on_aio = Recorder()
    assert aio.add_plugin(on_aio, ["worker_execute_before"], "worker") == (
        "qtasks17:recorder:worker"
    )

    @aio.task
    async def double(n: int) -> int:
        return n * 2

    with anyio.fail_after(WAIT):
        async with aio:
            assert (await aio.add_task("double", 2, timeout=WAIT)).returning == 4
    assert on_aio.names() == ["worker_execute_before"]

    app = QueueTasks()
    on_app = Recorder()
    app.add_plugin(on_app, ["worker_execute_before"], "worker", component="worker")

    @app.task
    def triple(n: int) -> int:
        return n * 3

    try:
        with app:
            assert app.add_task("triple", 2, timeout=WAIT).returning == 6
    finally:
        app.close()
    assert on_app.names() == ["worker_execute_before"]


def test_add_plugin_errors_name_the_plugin_and_a_doubled_argument() -> None:
    app = QueueTasks()
    plugin = Recorder()  # named "recorder"
    with pytest.raises(PluginError, match=r"^plugin 'recorder': trigger 'worker_add' belongs"):
        app.add_plugin(plugin, ["worker_add"], "broker")
    with pytest.raises(PluginError, match=r"^plugin 'recorder': component given twice"):
        app.add_plugin(plugin, ["worker_add"], "worker", component="broker")
    with pytest.raises(PluginError, match=r"^plugin 'recorder': trigger names given twice"):
        app.add_plugin(plugin, ["worker_add"], trigger_names=["worker_start"])
    with pytest.raises(PluginError, match=r"^plugin 'recorder': component must be"):
        app.add_plugin(plugin, component="nowhere")
    assert not [n for n, _ in app.aio.hooks.pm.list_name_plugin() if n.startswith("qtasks17:")]


def test_every_trigger_is_in_the_hookspecs_table() -> None:
    import qtasks.hookspecs

    table = qtasks.hookspecs.__doc__ or ""
    for trigger in (*TRIGGERS, *UNMAPPED):
        assert f"``{trigger}``" in table, trigger


def test_app_and_global_config_triggers_on_a_sync_app() -> None:
    app = QueueTasks()
    app_plugin = Recorder({"qtasks_get": lambda task, **_: {"task": task}})
    config_plugin = Recorder(
        {"global_config_get": {"get": "replaced"}, "global_config_set": {"value": 2}}
    )
    app.add_plugin(app_plugin)
    app.add_plugin(config_plugin, component="global_config")

    @app.task
    def noop() -> None:
        return None

    try:
        record = app.add_task("noop")
        assert app.get(record.uuid) is not None
        app.config_set("ns", "k", 1)
        assert app.config_get("ns", "k") == "replaced"
        assert app.portal.call(app.aio.global_config.get, "ns", "k") == 2  # written replaced
        app.ping(server=False)
    finally:
        app.close()
    assert {
        "qtasks_add_task_before_broker",
        "qtasks_add_task_after_broker",
        "qtasks_get",
        "qtasks_ping",
        "qtasks_stop",
        "starter_start",
    } <= set(app_plugin.names())
    assert {"global_config_set", "global_config_get", "global_config_start"} <= set(
        config_plugin.names()
    )


async def test_events_on_fire_every_qtasks_event() -> None:
    app = AsyncQueueTasks()
    fired: list[str] = []

    @app.events.on.starting()  # type: ignore[untyped-decorator]  # QTasks' events: dynamic
    def starting(worker: Any, broker: Any) -> None:
        fired.append("starting")

    @app.events.on.task_running
    async def running(task_func: Any, task_broker: Any) -> None:
        fired.append(f"running {task_func.name}")

    for event in ("task_success", "task_error", "task_cancel", "task_stopping", "stopping"):

        @app.events.on.__getattr__(event)()  # type: ignore[untyped-decorator]  # as above
        def handler(event: str = event, **kwargs: Any) -> None:
            fired.append(event)

    @app.events.on.worker_running()  # type: ignore[untyped-decorator]  # as above
    def worker_running(worker: Any, number: int) -> None:
        fired.append("worker_running")

    @app.task
    def ok() -> int:
        return 1

    @app.task
    def boom() -> None:
        raise ValueError("boom")

    @app.task(echo=True)
    def stop(self: Any) -> None:
        self.ctx.cancel("no")

    with anyio.fail_after(WAIT):
        async with app:
            for name in ("ok", "boom", "stop"):
                await app.add_task(name, timeout=WAIT)
    for event in (
        "starting",
        "worker_running",
        "running ok",
        "task_success",
        "task_error",
        "task_cancel",
        "task_stopping",
        "stopping",
    ):
        assert event in fired, (event, fired)
    with pytest.raises(AttributeError, match="unknown event"):
        app.events.on.task_exploded  # noqa: B018


def test_the_hookspecs_table_says_what_the_adapter_does() -> None:
    import re

    import qtasks.hookspecs
    from qtasks.compat.plugins import TRANSFORMS

    table = (qtasks.hookspecs.__doc__ or "").split("Coming from QTasks 1.7")[1]
    table = re.sub(r"\n +", " ", table)
    for trigger, (_, hook) in TRIGGERS.items():
        rows = re.findall(rf"\* ``{trigger}`` → ``(\w+)``[^:]*: (applied|notified)", table)
        assert len(rows) == 1, (trigger, rows)
        assert rows[0][0] == hook, (trigger, rows[0][0], hook)
        assert (rows[0][1] == "applied") == (trigger in TRANSFORMS), trigger
    for trigger in UNMAPPED:
        assert re.search(rf"``{trigger}``[^→]*?: none", table), trigger


def test_broker_start_gets_the_worker_as_in_qtasks() -> None:
    """QTasks fired ``broker_start`` with ``broker`` and ``worker``; a plugin naming both
    parameters must not fail with a TypeError."""
    seen: list[tuple[str, Any, Any]] = []

    class Named(BasePlugin):
        def trigger(  # type: ignore[override]  # QTasks plugins name the keywords they take
            self, name: str, broker: Any, worker: Any = "missing"
        ) -> None:
            seen.append((name, broker, worker))

    app = QueueTasks()
    app.add_plugin(Named(), trigger_names=["broker_start"], component="broker")
    try:
        with app:
            pass
    finally:
        app.close()
    assert seen == [("broker_start", app.broker, app.worker)]


class Clock:
    """What an annotation-driven QTasks plugin injects (module level: the annotations of this
    module are strings, resolved in it)."""


def test_args_info_describes_the_task_parameters_as_qtasks_did() -> None:
    """QTasks' State, Depends and Pydantic plugins, and plugins copied from them, find the
    parameters to fill in ``args_info`` at ``task_executor_args_replace``."""
    from qtasks.schemas.argmeta import ArgMeta

    infos: list[list[ArgMeta]] = []

    class InjectClock(BasePlugin):
        async def trigger(self, name: str, **kw: Any) -> dict[str, Any]:
            kwargs = dict(kw["kw"])
            infos.append(kw["args_info"])
            for meta in kw["args_info"]:
                if meta.raw_type is Clock:
                    kwargs[meta.key] = "CLOCK"
            return {"args": kw["args"], "kw": kwargs}

    app = QueueTasks()
    app.add_plugin(InjectClock(), trigger_names=["task_executor_args_replace"], component="worker")

    @app.task(echo=True)
    def stamp(self: Any, n: int, items: list[str], clock: Clock | None = None) -> list[Any]:
        return [n, items, clock]

    try:
        with app:
            record = app.add_task("stamp", 1, ["x"], timeout=WAIT)
    finally:
        app.close()
    assert (record.status, record.returning) == (TaskStatus.SUCCESS, [1, ["x"], "CLOCK"])
    # An echo task's ``self`` is not in ``args`` here, so neither is it in ``args_info``.
    assert infos == [
        [
            ArgMeta("n", None, None, int, int, is_kwarg=False, index=0),
            ArgMeta("items", None, list, str, list[str], is_kwarg=False, index=1),
            ArgMeta("clock", None, UnionType, Clock, Clock | None, is_kwarg=True, key="clock"),
        ]
    ]


def test_task_broker_and_task_func_have_the_fields_qtasks_plugins_read(
    redis_url: str, prefix: str
) -> None:
    """QTasks' plugins (its own retry plugin among them) and event handlers read
    ``task_broker.name``/``.priority``/``.uuid``/``.args`` and ``task_func.name``/``.func``/
    ``.awaiting``/``.generating``/``.retry``...: they are there, on a worker fed from Redis."""
    app = QueueTasks(broker_url=redis_url, config=QueueConfig(extra={"redis_prefix": prefix}))
    seen: list[tuple[Any, ...]] = []

    class ReadsFields(BasePlugin):
        def trigger(self, name: str, **kwargs: Any) -> None:
            broker, func = kwargs["task_broker"], kwargs["task_func"]
            fields = (broker.name, broker.priority, broker.args, broker.kwargs, func.name)
            flags = (func.func.__name__, func.awaiting, func.generating, func.echo, func.retry)
            seen.append((name, *fields, *flags, func.priority, func.tags, func.extra))

    app.add_plugin(ReadsFields("reads"), ["worker_execute_before"], "worker")

    @app.events.on.task_success()  # type: ignore[untyped-decorator]  # QTasks' events: dynamic
    def succeeded(task_func: Any, task_broker: Any) -> None:
        seen.append(("task_success", task_broker.name, task_func.name, task_func.awaiting))

    @app.task(name="steps", retry=2, priority=3, tags=["t"], test=True)
    async def steps(n: int, *, by: int = 1) -> Any:
        for i in range(n):
            yield i * by

    with app:
        assert app.add_task("steps", 2, by=5, timeout=WAIT).returning == [0, 5]
    app.close()
    before = ("steps", 3, [2], {"by": 5}, "steps", "steps", True, "async", False, 2, 3)
    assert seen == [
        ("worker_execute_before", *before, ["t"], {"test": True}),
        ("task_success", "steps", "steps", True),
    ]
