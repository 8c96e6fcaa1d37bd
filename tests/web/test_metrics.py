"""The Prometheus plugin in a real in-process worker (in-memory components): a known workload,
scraped over HTTP from the plugin's port and parsed with prometheus_client's parser."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
from obs_helpers import (
    Samples,
    fails_once,
    free_port,
    runs_until_cancelled,
    scrape,
    scrape_until,
    value,
)
from prometheus_client import generate_latest
from typer.testing import CliRunner

from qtasks import AsyncQueueTasks, MemoryBroker, MemoryStorage, QueueConfig, TaskStatus, hookimpl
from qtasks.cli import cli
from qtasks.cli.serve import enable_metrics
from qtasks.errors import PluginError
from qtasks.record import TaskRecord
from qtasks_redis import RedisBroker
from qtasks_web.metrics import OUTCOMES, UNKNOWN_TASK, MetricsPlugin
from qtasks_web.plugins import Off

pytestmark = pytest.mark.anyio

HOLD = 1.2
"""Seconds the ``hold`` task runs: with concurrency 1 the next task waits at least that long."""


def total(samples: Samples, task: str, outcome: str) -> float | None:
    return value(samples, "qtasks_tasks_total", task=task, outcome=outcome)


async def test_known_workload_counts_every_outcome_and_times_queue_wait_and_run() -> None:
    port = free_port()
    app = AsyncQueueTasks(
        config=QueueConfig(plugins_disabled=["*"], max_tasks_process=1, shutdown_grace=1.0)
    )
    app.add_plugin(MetricsPlugin(port=port))
    flaky = fails_once(app)
    waits, started = runs_until_cancelled(app)

    @app.task
    async def ok(x: int) -> int:
        return x

    @app.task
    async def bad() -> None:
        raise ValueError("bad")

    @app.task
    async def hold() -> None:
        await anyio.sleep(HOLD)

    url = f"http://127.0.0.1:{port}/metrics"
    async with app:
        for i in range(3):
            assert (await ok.add_task(i, timeout=5)).status is TaskStatus.SUCCESS
        for _ in range(2):
            assert (await bad.add_task(timeout=5)).status is TaskStatus.ERROR
        assert (await flaky.add_task(timeout=5)).returning == "ok"
        waiting = await waits.add_task()
        with anyio.fail_after(5):
            await started.wait()
        await app.cancel(waiting.uuid, "enough")
        await app.enqueue("no_such_task")  # rejected by the worker (unknown task)
        # Concurrency 1: the second hold waits for the first to run (>= HOLD seconds).
        first, second = await hold.add_task(), await hold.add_task()
        await app.wait(first.uuid, timeout=5)
        await app.wait(second.uuid, timeout=5)

        def finished(s: Samples) -> bool:
            return value(s, "qtasks_task_run_seconds_count", task="hold") == 2 and bool(
                total(s, UNKNOWN_TASK, "rejected")
            )

        samples = await scrape_until(url, finished)
        worker_up = value(samples, "qtasks_worker_up")
    expected = {
        ("ok", "success"): 3,
        ("bad", "error"): 2,
        ("flaky", "retry"): 1,
        ("flaky", "success"): 1,
        ("waits", "cancel"): 1,
        (UNKNOWN_TASK, "rejected"): 1,
        ("hold", "success"): 2,
    }
    counted = {
        (dict(labels)["task"], dict(labels)["outcome"]): n
        for (name, labels), n in samples.items()
        if name == "qtasks_tasks_total"
    }
    assert counted == expected
    assert set(OUTCOMES) >= {outcome for _, outcome in counted}
    # One queue wait and one run time per execution (flaky ran twice; rejected never ran).
    for task, runs in (("ok", 3), ("bad", 2), ("flaky", 2), ("waits", 1), ("hold", 2)):
        assert value(samples, "qtasks_task_queue_wait_seconds_count", task=task) == runs, task
        assert value(samples, "qtasks_task_run_seconds_count", task=task) == runs, task
    # hold ran HOLD seconds each time, and the second waited for the first in the queue; the
    # first waited less than a second (a bucket below HOLD, wide enough for a loaded CI box:
    # at 0.25 s a stalled moment of the suite failed it once).
    assert value(samples, "qtasks_task_run_seconds_bucket", task="hold", le="1.0") == 0
    assert value(samples, "qtasks_task_run_seconds_bucket", task="hold", le="+Inf") == 2
    assert value(samples, "qtasks_task_queue_wait_seconds_bucket", task="hold", le="1.0") == 1
    run_sum = value(samples, "qtasks_task_run_seconds_sum", task="hold")
    assert run_sum is not None and run_sum >= 2 * HOLD
    assert value(samples, "qtasks_task_run_seconds_bucket", task="ok", le="0.25") == 3
    assert value(samples, "qtasks_tasks_in_flight") == 0
    assert worker_up == 1
    # Read from the broker at the scrape: the rejected message is the one dead letter.
    assert value(samples, "qtasks_dead_letters") == 1
    assert value(samples, "qtasks_queue_delayed") == 0


async def test_worker_up_follows_the_worker_and_the_port_closes_with_it() -> None:
    port = free_port()
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"], shutdown_grace=1.0))
    plugin = app.add_plugin(MetricsPlugin(port=port))
    metrics = app.hooks.pm.get_plugin(plugin)
    assert isinstance(metrics, MetricsPlugin)
    url = f"http://127.0.0.1:{port}/metrics"
    await app.start()  # components only: a producer serves no metrics
    with pytest.raises(OSError):
        await scrape(url)
    await app.aclose()
    async with app:
        samples = await scrape(url)
        assert value(samples, "qtasks_worker_up") == 1
        assert metrics.address == ("127.0.0.1", port)
    assert metrics.registry.get_sample_value("qtasks_worker_up") == 0
    assert metrics.address is None
    with pytest.raises(OSError):
        await scrape(url)


async def test_dead_lettered_outcome_when_the_last_allowed_delivery_loses_its_lease() -> None:
    lease = 0.3
    app = AsyncQueueTasks(
        broker=MemoryBroker(lease=lease),
        config=QueueConfig(
            plugins_disabled=["*"], max_tasks_process=1, lease=lease, max_deliveries=1
        ),
    )
    metrics = MetricsPlugin()  # no port: the registry alone
    app.add_plugin(metrics)

    @app.task
    async def hog() -> str:
        time.sleep(lease * 2)  # noqa: ASYNC251 - blocks the loop: the lease runs out
        return "late"

    async with app:
        task = await app.add_task("hog")
        done = await app.wait(task.uuid, timeout=10)
        assert done.status is TaskStatus.ERROR
        with anyio.fail_after(5):
            while metrics.registry.get_sample_value("qtasks_tasks_in_flight") != 0:  # noqa: ASYNC110 - settled by the worker after the record
                await anyio.sleep(0.01)
    reg = metrics.registry
    assert reg.get_sample_value("qtasks_tasks_total", {"task": "hog", "outcome": "dead_lettered"})
    for outcome in ("success", "error"):
        labels = {"task": "hog", "outcome": outcome}
        assert reg.get_sample_value("qtasks_tasks_total", labels) is None


async def test_two_apps_in_one_process_keep_their_own_registries() -> None:
    apps = [AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"])) for _ in range(2)]
    plugins = [MetricsPlugin() for _ in apps]
    for app, plugin, runs in zip(apps, plugins, (1, 2), strict=True):
        app.add_plugin(plugin)

        @app.task(name="t")
        async def t() -> None:
            pass

        async with app:
            for _ in range(runs):
                await app.add_task("t", timeout=5)
            with anyio.fail_after(5):
                while plugin.registry.get_sample_value("qtasks_tasks_in_flight") != 0:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
    counts = [
        p.registry.get_sample_value("qtasks_tasks_total", {"task": "t", "outcome": "success"})
        for p in plugins
    ]
    assert counts == [1, 2]
    assert b"qtasks_tasks_total" not in generate_latest()  # nothing in the global registry


def test_entry_point_is_off_without_configuration_and_adds_no_hook() -> None:
    plain = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["metrics", "tracing"]))
    default = AsyncQueueTasks(config=QueueConfig())
    assert isinstance(default.hooks.pm.get_plugin("metrics"), Off)
    assert isinstance(default.hooks.pm.get_plugin("tracing"), Off)
    assert default.hooks.active == plain.hooks.active


def test_entry_point_builds_the_plugin_from_extra_metrics() -> None:
    app = AsyncQueueTasks(config=QueueConfig(extra={"metrics": {"port": 9999, "host": "::1"}}))
    plugin = app.hooks.pm.get_plugin("metrics")
    assert isinstance(plugin, MetricsPlugin)
    assert (plugin.port, plugin.host) == (9999, "::1")
    assert "qtasks_worker_execute_before" in app.hooks.active


def test_metrics_enabled_in_configuration_and_added_in_code_is_refused() -> None:
    app = AsyncQueueTasks(config=QueueConfig(extra={"metrics": {"port": 9999}}))
    with pytest.raises(PluginError) as caught:
        app.add_plugin(MetricsPlugin())
    assert "one qtasks-web metrics plugin per app, and 'metrics' is one already" in str(
        caught.value
    )
    # Metrics off in the configuration: the one added in code is the only one, and counts.
    alone = AsyncQueueTasks(config=QueueConfig())
    alone.add_plugin(MetricsPlugin())
    with pytest.raises(PluginError):
        alone.add_plugin(MetricsPlugin())
    from qtasks_web.tracing import TracingPlugin

    traced = AsyncQueueTasks(config=QueueConfig(extra={"tracing": {"enabled": True}}))
    with pytest.raises(PluginError, match="one qtasks-web tracing plugin per app"):
        traced.add_plugin(TracingPlugin())


def test_enable_metrics_refuses_a_second_plugin_added_in_code() -> None:
    app = AsyncQueueTasks(config=QueueConfig())
    app.add_plugin(MetricsPlugin())
    with pytest.raises(PluginError, match="one qtasks-web metrics plugin per app"):
        enable_metrics(app, 9999)


def test_qtasks_plugins_says_off_and_how_to_switch_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output) if r["kind"] == "plugin"}
    assert (rows["metrics"]["state"], rows["tracing"]["state"]) == ("off", "off")
    assert "--metrics-port" in rows["metrics"]["how"]
    assert "enabled = true" in rows["tracing"]["how"]
    (tmp_path / "qtasks.toml").write_text(
        "[extra.metrics]\nport = 9100\n[extra.tracing]\nenabled = true\n"
    )
    result = runner.invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.output
    lines = [x for x in result.output.splitlines() if x.startswith("plugin")]
    for name in ("metrics", "tracing"):
        line = next(x for x in lines if f" {name} " in x)
        assert line.rstrip().endswith("enabled"), line
    assert " is off: " not in result.output


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"port": "9100"}, "extra.metrics.port must be a port number"),
        ({"port": 70000}, "extra.metrics.port must be a port number"),
        ({"port": True}, "extra.metrics.port must be a port number"),
        ({"port": 9100, "hots": "x"}, "unknown key(s) ['hots']"),
        ({"host": ""}, "extra.metrics.host must be"),
        ("9100", "extra.metrics must be a table"),
    ],
)
def test_bad_metrics_settings_are_refused_when_the_app_is_built(
    section: object, message: str
) -> None:
    with pytest.raises(PluginError) as caught:  # the entry point could not be built
        AsyncQueueTasks(config=QueueConfig(extra={"metrics": section}))
    assert message in str(caught.value)
    assert "plugin 'metrics'" in str(caught.value)


async def test_a_port_in_use_is_logged_and_the_worker_serves_anyway(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    first = MetricsPlugin(port=port)
    one = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"], shutdown_grace=1.0))
    two = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"], shutdown_grace=1.0))
    one.add_plugin(first)
    two.add_plugin(MetricsPlugin(port=port))

    @two.task
    async def ok() -> int:
        return 1

    async with one, two:
        assert first.address is not None
        assert (await ok.add_task(timeout=5)).returning == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in caplog.text


@pytest.mark.timeout(30)  # the hang this guards against fails here
async def test_reading_the_registry_in_the_event_loop_leaves_the_broker_figures_out() -> None:
    # The broker is read in the worker's loop: from the loop's own thread that would wait on
    # itself forever. A scrape from another thread gets them (the tests above).
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"], shutdown_grace=1.0))
    metrics = MetricsPlugin()
    app.add_plugin(metrics)
    async with app:
        text = generate_latest(metrics.registry).decode()
        from_thread = await anyio.to_thread.run_sync(generate_latest, metrics.registry)
    assert "qtasks_worker_up 1.0" in text
    assert "qtasks_dead_letters " not in text
    assert "qtasks_dead_letters 0.0" in from_thread.decode()


async def test_expired_outcome() -> None:
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"]))
    metrics = MetricsPlugin()  # no port: the registry alone
    app.add_plugin(metrics)

    @app.task
    async def late() -> None: ...

    async with app:
        task = await app.add_task("late", delay=0.1, expires=0.05)
        assert (await app.wait(task.uuid, timeout=5)).status is TaskStatus.EXPIRED
    reg = metrics.registry
    assert reg.get_sample_value("qtasks_tasks_total", {"task": "late", "outcome": "expired"}) == 1
    assert reg.get_sample_value("qtasks_task_run_seconds_count", {"task": "late"}) is None


class BeginFails(MemoryStorage):
    """A storage with a bug: every begin fails (not an outage)."""

    async def begin(self, record: TaskRecord, *, generation: int = 0) -> TaskRecord:
        raise RuntimeError("storage bug at begin")

    async def begin_many(self, records: Sequence[TaskRecord]) -> list[TaskRecord]:
        raise RuntimeError("storage bug at begin")


class Rejected:
    """Set when ``qtasks_task_rejected`` has fired, after every other implementation."""

    def __init__(self) -> None:
        self.fired = anyio.Event()

    @hookimpl(trylast=True)
    def qtasks_task_rejected(self) -> None:
        self.fired.set()


async def test_a_message_the_worker_fails_on_max_deliveries_times_counts_as_rejected(
    redis_url: str, prefix: str
) -> None:
    """The give-up of :func:`qtasks.poison.failed` (docs/metrics-and-tracing.md: ``rejected``,
    as ``qtasks_task_rejected`` says), reached for real: a Redis broker, which does not begin
    on claim without a Redis storage, and a storage whose begin fails every time."""
    app = AsyncQueueTasks(
        broker=RedisBroker(redis_url, prefix=prefix),
        storage=BeginFails(),
        config=QueueConfig(
            plugins_disabled=["*"], max_deliveries=2, retry_backoff=0.02, shutdown_grace=1.0
        ),
    )
    metrics = app.hooks.pm.get_plugin(app.add_plugin(MetricsPlugin()))
    assert isinstance(metrics, MetricsPlugin)
    rejected = Rejected()
    app.add_plugin(rejected, name="rejected")

    @app.task
    async def work() -> None:
        pass

    async with app:
        task = await work.add_task()
        with anyio.fail_after(10):
            await rejected.fired.wait()
        record = await app.wait(task.uuid, timeout=10)
        [letter] = await app.broker.dead_letters()
    assert record.status is TaskStatus.ERROR
    assert (record.error or "").startswith("worker failed 2 times: RuntimeError")
    assert letter.reason == record.error
    assert metrics.outcomes == {("work", "rejected"): 1}


def test_the_help_of_tasks_total_names_every_outcome() -> None:
    """``# HELP qtasks_tasks_total`` is what a person reading a scrape learns the outcomes
    from: it names each value the ``outcome`` label takes (``expired`` was left out)."""
    exposed = generate_latest(MetricsPlugin().registry).decode()
    help_line = next(
        line for line in exposed.splitlines() if line.startswith("# HELP qtasks_tasks_total ")
    )
    assert [o for o in OUTCOMES if o not in help_line] == []
