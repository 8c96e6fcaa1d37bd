"""Timers declared in configuration, the entry-point plugin, and ``qtasks inspect``."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import pytest
from timer_helpers import Recorder, wait_until

from qtasks import AsyncQueueTasks, Depends, QueueConfig
from qtasks.config import load_config
from qtasks.errors import ConfigError, PluginError, TaskArgumentsError
from qtasks.state import AsyncState
from qtasks_timer import AsyncTimer, ScheduleError, TimerPlugin, TimerSettings

pytestmark = pytest.mark.anyio

TIMERS: list[dict[str, Any]] = [
    {"task": "tick", "schedule": "* * * * * *", "id": "every-second"},
    {"task": "tick", "interval": 0.3, "args": [1], "kwargs": {"source": "config"}},
]


def make_app(
    timers: list[dict[str, Any]], plugins_disabled: tuple[str, ...] = ()
) -> tuple[AsyncQueueTasks, Recorder]:
    config = QueueConfig(extra={"timers": timers}, plugins_disabled=list(plugins_disabled))
    app = AsyncQueueTasks(config=config)

    @app.task
    async def tick(*args: Any, source: str = "") -> None:
        return None

    recorder = Recorder()
    app.add_plugin(recorder)
    return app, recorder


async def test_config_timers_run_through_the_entry_point_plugin() -> None:
    app, rec = make_app(TIMERS)
    # The qtasks.plugins entry point "timer" was discovered and registered with the app.
    plugin = app.hooks.pm.get_plugin("timer")
    assert isinstance(plugin, TimerPlugin)
    async with app:
        await wait_until(lambda: rec.count("every-second") >= 1, 3, "the cron timer")
        await wait_until(lambda: rec.count() - rec.count("every-second") >= 2, 3, "interval")
    assert plugin.timer is not None
    assert {h.id for h in plugin.timer.timers} >= {"every-second"}
    interval = next(h for h in plugin.timer.timers if h.id != "every-second")
    assert interval.id.startswith("tick@")


async def test_timer_created_in_code_also_loads_config_timers() -> None:
    app, _ = make_app(TIMERS)
    app.add_plugin(TimerPlugin())  # the entry-point plugin binds to the code's timer
    timer = AsyncTimer(app)
    extra = timer.add_task("tick", trigger="@hourly")
    ids = [h.id for h in timer.timers]
    assert ids[0] == "every-second"
    assert extra.id in ids
    assert len(ids) == 3


async def test_inspect_lists_timers_with_next_run() -> None:
    app, _ = make_app(TIMERS)
    app.add_plugin(TimerPlugin())
    before = datetime.now(UTC)
    await app.start()
    try:
        report = await app.hooks.transform(
            "qtasks_inspect", "report", app=app, report={"app": app.name}
        )
    finally:
        await app.aclose()
    assert report["app"] == app.name
    rows = {row["id"]: row for row in report["timers"]}
    row = rows["every-second"]
    assert row["task"] == "tick"
    assert row["source"] == "config"
    assert row["paused"] is False
    assert "CronTrigger" in row["trigger"]
    next_run = datetime.fromisoformat(row["next_run"])
    # The next whole second after the timer started (read before it started, so a second
    # boundary passing since then cannot make this fail).
    assert 0 <= (next_run - before).total_seconds() <= 1.01
    assert len(rows) == 2


async def test_no_timers_no_report() -> None:
    app, _ = make_app([])
    app.add_plugin(TimerPlugin())
    report = await app.hooks.transform("qtasks_inspect", "report", app=app, report={})
    assert "timers" not in report


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"schedule": "* * * * *"}, "'task'"),
        ({"task": "tick"}, "exactly one"),
        ({"task": "tick", "schedule": "* * * * *", "interval": 5}, "exactly one"),
        ({"task": "tick", "schedule": "not cron"}, "crontab"),
        ({"task": "tick", "schedule": "* * * * *", "every": 5}, "unknown keys"),
        ({"task": "tick", "interval": 5, "args": "x"}, "'args'"),
        ({"task": "tick", "interval": -1}, "positive"),
        ({"task": "tick", "interval": 5, "timezone": "Nowhere/Else"}, "time zone"),
        ({"task": "tick", "interval": 5, "kwargs": {"nope": 1}}, "nope"),
    ],
)
async def test_bad_config_timers_are_refused(entry: dict[str, Any], message: str) -> None:
    app, _ = make_app([entry], plugins_disabled=("timer",))  # the entry point would refuse it
    expected = TaskArgumentsError if "nope" in message else ScheduleError
    with pytest.raises(expected, match=message):
        AsyncTimer(app)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"task": "tick", "every": 5}, "unknown keys ['every']"),
        ({"task": "tick", "schedule": "61 * * * *"}, "bad crontab '61 * * * *'"),
        ({"task": "tick", "interval": 5, "timezone": "Nowhere/Else"}, "unknown time zone"),
    ],
)
def test_a_bad_config_timer_fails_building_an_app_with_the_timer_plugin(
    entry: dict[str, Any], message: str
) -> None:
    # Found only when the worker started, the error was logged and ignored (a notification
    # hook's), and the app served with none of its timers, the good ones neither.
    good = {"task": "tick", "interval": 5}
    with pytest.raises(PluginError) as caught:
        AsyncQueueTasks(config=QueueConfig(extra={"timers": [good, entry]}))
    assert "plugin 'timer'" in str(caught.value)
    assert f"ScheduleError: extra.timers[1]: {message}" in str(caught.value)


async def test_a_timer_of_a_task_the_app_does_not_have_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``task = "ticks"`` in ``[[extra.timers]]``: each tick was enqueued and dead-lettered by
    the worker (unknown task), with no word from the timer that a name was misspelt."""
    app, _ = make_app([{"task": "ticks", "interval": 5}, {"task": "tick", "interval": 5}])
    caplog.set_level("WARNING", logger="qtasks.timer")

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "qtasks.timer"]

    async with app:
        await wait_until(lambda: bool(said()), 3, "the timer's warning")
    [message] = said()
    assert message.startswith("timer ticks@")
    assert "this app has no task 'ticks' (did you mean 'tick'?)" in message
    # An app without tasks (one that only runs timers for other apps' workers) is not warned.
    caplog.clear()
    alone = AsyncQueueTasks(config=QueueConfig(extra={"timers": [{"task": "x", "interval": 5}]}))
    async with alone:
        plugin = alone.hooks.pm.get_plugin("timer")
        assert isinstance(plugin, TimerPlugin)
        await wait_until(lambda: plugin.timer is not None and plugin.timer.running, 3, "timer")
    assert said() == []


async def test_a_config_timer_whose_arguments_do_not_fit_leaves_the_others_running(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Arguments are checked against the task when the worker starts (the task is declared
    after the app is built): an unfit one made the plugin's hook fail, logged and ignored,
    and the worker served with none of its timers, the good ones neither."""
    good = {"task": "tick", "interval": 0.3, "args": [1], "id": "good"}
    unfit = {"task": "tick", "interval": 0.3, "kwargs": {"nope": 1}, "id": "unfit"}
    app, rec = make_app([unfit, good])
    caplog.set_level("ERROR")
    async with app:
        await wait_until(lambda: rec.count("good") >= 1, 5, "the good timer")
        plugin = app.hooks.pm.get_plugin("timer")
        assert isinstance(plugin, TimerPlugin) and plugin.timer is not None
        assert [h.id for h in plugin.timer.timers] == ["good"]
    [message] = [r.getMessage() for r in caplog.records if r.levelno >= 40]
    assert message.startswith("extra.timers[0] is not scheduled (the others are): task 'tick'")
    assert "nope" in message


TASKS_MODULE = """
from qtasks import QueueTasks

app = QueueTasks.from_config()


@app.task
def heartbeat(service: str) -> None:
    pass
"""


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('every = 1\nargs = ["api"]', "extra.timers[0]: unknown keys ['every']"),
        ('schedule = "61 * * * *"', "extra.timers[0]: bad crontab '61 * * * *'"),
    ],
)
def test_qtasks_run_stops_on_a_bad_config_timer_with_one_error_line(
    tmp_path: Path, entry: str, message: str
) -> None:
    (tmp_path / "tasks.py").write_text(TASKS_MODULE)
    (tmp_path / "qtasks.toml").write_text(
        f'app = "tasks:app"\n\n[[extra.timers]]\ntask = "heartbeat"\n{entry}\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "qtasks", "run"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"qtasks run kept serving despite the bad timer:\n{exc.stderr!r}")
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr  # no traceback
    assert lines[0].startswith("error: plugin 'timer': ")
    assert message in lines[0]


# --- extra.timers: qtasks-timer's own place in the configuration -----------------------------


async def test_extra_timers_from_a_file_run_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file = tmp_path / "qtasks.toml"
    file.write_text(
        'broker = "memory"\n\n'
        '[[extra.timers]]\ntask = "tick"\nschedule = "* * * * * *"\nid = "every-second"\n\n'
        '[[extra.timers]]\ntask = "tick"\ninterval = 0.3\nargs = [1]\n'
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation: this is the place
        with caplog.at_level("WARNING", logger="qtasks.config"):
            config = load_config(file, env={}).config
        assert not caplog.records  # [extra.timers] is not the "setting inside extra" pitfall
        app = AsyncQueueTasks(config=config)

        @app.task
        async def tick(*args: Any) -> None:
            return None

        rec = Recorder()
        app.add_plugin(rec)
        async with app:
            await wait_until(lambda: rec.count("every-second") >= 1, 3, "the cron timer")
            await wait_until(lambda: rec.count() - rec.count("every-second") >= 1, 3, "interval")
    plugin = app.hooks.pm.get_plugin("timer")
    assert plugin is not None
    assert plugin.timer.timers[0].id == "every-second"
    assert len(plugin.timer.timers) == 2


def test_the_old_timers_key_is_refused_naming_its_new_place(tmp_path: Path) -> None:
    moved = r"'timers' is not a setting of the core: .*\[\[extra\.timers\]\]"
    file = tmp_path / "qtasks.toml"
    file.write_text('[[timers]]\ntask = "tick"\ninterval = 5\n')
    with pytest.raises(ConfigError, match=moved) as info:
        load_config(file, env={})
    assert str(file) in str(info.value)
    with pytest.raises(ConfigError, match=moved) as info:
        load_config(env={"QTASKS_TIMERS": "[]"}, directory=tmp_path / "nowhere")
    assert "QTASKS_TIMERS" in str(info.value)


def test_extra_timers_are_checked_where_they_are() -> None:
    one = QueueConfig(extra={"timers": [{"task": "t", "interval": 1}]})
    settings = TimerSettings.from_config(one)
    assert [(s.where, s.task, s.schedule) for s in settings.timers] == [("extra.timers[0]", "t", 1)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"timers": {"task": "tick", "interval": 5}}, r"extra\.timers: expected a list"),
        ({"timers": ["x"]}, r"extra\.timers\[0\]: expected a table"),
        ({"timers": [{"task": "tick", "every": 5}]}, r"extra\.timers\[0\]: unknown keys"),
        ({"timers": [{"task": "tick", "interval": "5"}]}, "'interval' must be a number"),
        ({"timers": [{"task": "tick", "interval": 5, "priority": "high"}]}, "'priority'"),
        ({"timers": [{"task": "tick", "interval": 5, "priority": True}]}, "'priority'"),
        ({"timers": [{"task": "tick", "interval": 5, "priority": 2**63}]}, "'priority'"),
        ({"timers": [{"task": "tick", "interval": 5, "misfire_grace": "1"}]}, "misfire_grace"),
        ({"timers": [{"task": "tick", "interval": 5, "id": 3}]}, "'id' must be a string"),
    ],
)
def test_bad_extra_timers_are_refused(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        TimerSettings.from_config(QueueConfig(extra=extra))


@pytest.mark.parametrize("priority", ["high", 1.5, True, 2**63])
async def test_a_bad_priority_of_a_timer_in_code_is_refused_when_it_is_added(priority: Any) -> None:
    app, _ = make_app([])
    timer = AsyncTimer(app)
    with pytest.raises(ScheduleError, match="timer priority expects an int"):
        timer.add_task("tick", trigger="@hourly", priority=priority)
    assert timer.timers == []


async def test_a_timer_added_before_its_task_is_checked_when_the_timer_starts() -> None:
    """A timer added in code before its task is declared could not be checked then: its
    arguments were found unfit only when it fired, each tick failing in a worker. They are
    checked as the timer starts, the error naming the timer, the task and the parameter."""
    app = AsyncQueueTasks("early")
    timer = AsyncTimer(app)
    handle = timer.add_task("later", trigger="@hourly", timer_id="early-one")
    assert handle.id == "early-one"  # the task is unknown yet: accepted

    @app.task
    async def later(count: int) -> None:
        return None

    with pytest.raises(TaskArgumentsError) as info:
        async with timer:
            pass
    assert str(info.value) == (
        "timer early-one: task 'later': missing a required argument: 'count'"
    )
    assert not timer.running


async def test_as_the_worker_starts_an_unfit_timer_added_early_is_left_out_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, rec = make_app([])
    timer = AsyncTimer(app)
    timer.add_task("late_task", trigger=0.3, timer_id="unfit", nope=1)
    timer.add_task("late_task", trigger=0.3, timer_id="good")

    @app.task
    async def late_task() -> None:
        return None

    caplog.set_level("ERROR")
    async with app:
        await wait_until(lambda: rec.count("good") >= 1, 5, "the good timer")
        assert [h.id for h in timer.timers] == ["good"]
    [message] = [r.getMessage() for r in caplog.records if r.levelno >= 40]
    assert message.startswith(
        "timer unfit is not scheduled (the others are): timer unfit: task 'late_task': "
    )
    assert "'nope'" in message


class Counter(AsyncState):
    scope = "worker"


def make_number() -> int:
    return 1


async def test_injected_parameters_are_not_asked_of_a_timer_added_early() -> None:
    """State, Depends and an echo task's ``self`` are qtasks', not the timer's arguments."""
    app = AsyncQueueTasks("injected")
    timer = AsyncTimer(app)
    timer.add_task("echoed", 1, trigger="@hourly")
    timer.add_task("with_state", trigger="@hourly", n=2)
    timer.add_task("with_depends", 3, trigger="@hourly")

    @app.task(echo=True)
    async def echoed(self: Any, n: int) -> None:
        return None

    @app.task
    async def with_state(counter: Counter, n: int) -> None:
        return None

    @app.task
    async def with_depends(n: int, extra: Annotated[int, Depends(make_number)]) -> None:
        return None

    async with timer:
        assert timer.running
        assert len(timer.timers) == 3
