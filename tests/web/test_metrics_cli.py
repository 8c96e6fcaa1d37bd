"""``qtasks run --metrics-port``: a real worker process on Redis serves its metrics over HTTP,
scraped and parsed after a known workload; and the option's errors when the metrics plugin is
missing or disabled."""

from __future__ import annotations

import os
import signal
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import anyio
import pytest
from obs_helpers import Samples, free_port, get, scrape_until, spawn, value
from typer.testing import CliRunner

from qtasks import AsyncQueueTasks, QueueConfig, TaskStatus, discovery
from qtasks.cli import cli
from qtasks.cli.serve import enable_metrics
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage
from qtasks_web.metrics import UNKNOWN_TASK, MetricsPlugin

TASKS = """
import anyio
from qtasks import AsyncQueueTasks, QueueConfig
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

URL, PREFIX = {url!r}, {prefix!r}
app = AsyncQueueTasks(
    broker=RedisBroker(URL, prefix=PREFIX, queue="metrics"),
    storage=RedisStorage(URL, prefix=PREFIX),
    global_config=RedisGlobalConfig(URL, prefix=PREFIX),
    config=QueueConfig(max_tasks_process=4, heartbeat_interval=0.5, shutdown_grace=1.0),
)
failed_once: set[str] = set()


@app.task
async def ok(x: int) -> int:
    return x


@app.task
async def bad() -> None:
    raise ValueError("bad")


@app.task(retry=1, retry_backoff=0)
async def flaky(key: str) -> str:
    if key not in failed_once:
        failed_once.add(key)
        raise ValueError("first time")
    return "ok"


@app.task
async def waits() -> None:
    await anyio.sleep(30)
"""


def producer(url: str, prefix: str) -> AsyncQueueTasks:
    return AsyncQueueTasks(
        broker=RedisBroker(url, prefix=prefix, queue="metrics"),
        storage=RedisStorage(url, prefix=prefix),
        global_config=RedisGlobalConfig(url, prefix=prefix),
        config=QueueConfig(plugins_disabled=["*"]),
    )


@pytest.mark.anyio
@pytest.mark.timeout(90)
async def test_qtasks_run_metrics_port_serves_the_workers_metrics(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    (tmp_path / "tasks.py").write_text(TASKS.format(url=redis_url, prefix=prefix))
    port = free_port()
    argv = ["-m", "qtasks", "run", "-A", "tasks:app", "--metrics-port", str(port)]
    server = spawn(argv, tmp_path, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/metrics"
    app = producer(redis_url, prefix)
    try:
        for i in range(5):
            assert (await app.add_task("ok", i, timeout=20)).status is TaskStatus.SUCCESS
        for _ in range(2):
            assert (await app.add_task("bad", timeout=10)).status is TaskStatus.ERROR
        assert (await app.add_task("flaky", "k", timeout=10)).returning == "ok"
        waiting = await app.add_task("waits")
        # Running, not only begun: its record says process from its claim on (broker and
        # storage on one server), and a cancel before its run starts drops it unstarted, with
        # no queue wait to count. The run's start is what puts it in flight.
        await scrape_until(url, lambda s: value(s, "qtasks_tasks_in_flight") == 1)
        await app.cancel(waiting.uuid, "enough")
        await app.enqueue("no_such_task")

        def finished(s: Samples) -> bool:
            return (
                value(s, "qtasks_tasks_total", task="waits", outcome="cancel") == 1
                and value(s, "qtasks_tasks_total", task=UNKNOWN_TASK, outcome="rejected") == 1
                and value(s, "qtasks_tasks_in_flight") == 0
            )

        samples = await scrape_until(url, finished)
        status, content_type, _ = await anyio.to_thread.run_sync(get, url)
    finally:
        await app.aclose()
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=30)
    assert server.returncode == 0, out
    assert f"serving Prometheus metrics on http://127.0.0.1:{port}/metrics" in out
    assert (status, content_type.split(";")[0]) == (200, "text/plain")
    counted = {
        (dict(labels)["task"], dict(labels)["outcome"]): n
        for (name, labels), n in samples.items()
        if name == "qtasks_tasks_total"
    }
    assert counted == {
        ("ok", "success"): 5,
        ("bad", "error"): 2,
        ("flaky", "retry"): 1,
        ("flaky", "success"): 1,
        ("waits", "cancel"): 1,
        (UNKNOWN_TASK, "rejected"): 1,
    }
    for task, runs in (("ok", 5), ("bad", 2), ("flaky", 2), ("waits", 1)):
        assert value(samples, "qtasks_task_queue_wait_seconds_count", task=task) == runs, task
        assert value(samples, "qtasks_task_run_seconds_count", task=task) == runs, task
    assert value(samples, "qtasks_worker_up") == 1
    # The broker's figures, read in the worker at the scrape: the rejected message is the one
    # dead letter, nothing waits.
    assert value(samples, "qtasks_dead_letters") == 1
    assert value(samples, "qtasks_queue_delayed") == 0
    assert value(samples, "qtasks_queue_in_flight") == 0


# --- the option's errors ----------------------------------------------------------------

APP = """
from qtasks import AsyncQueueTasks, QueueConfig
app = AsyncQueueTasks(config=QueueConfig(plugins_disabled={disabled!r}))
"""


def run_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, disabled: list[str]) -> Any:
    module = f"metrics_cli_app_{len(disabled)}_{os.getpid()}"
    (tmp_path / f"{module}.py").write_text(APP.format(disabled=disabled))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return CliRunner().invoke(cli, ["run", "-A", f"{module}:app", "--metrics-port", "9"])


def without_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if qtasks-web were not installed: no ``metrics`` entry point."""
    real = discovery.entry_points  # type: ignore[attr-defined]  # the name discovery imports

    def fake(*, group: str) -> Any:
        found: list[EntryPoint] = list(real(group=group))
        return [ep for ep in found if not (group == "qtasks.plugins" and ep.name == "metrics")]

    monkeypatch.setattr(discovery, "entry_points", fake)


def test_metrics_port_without_the_plugin_installed_fails_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    without_metrics(monkeypatch)
    result = run_cli(tmp_path, monkeypatch, [])
    assert result.exit_code == 1
    assert "--metrics-port needs the metrics plugin of qtasks-web" in result.output
    assert "pip install qtasks-web" in result.output
    assert "no plugin named 'metrics' is installed" in result.output


def test_metrics_port_with_the_plugin_disabled_fails_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_cli(tmp_path, monkeypatch, ["metrics"])
    assert result.exit_code == 1
    assert "--metrics-port: the metrics plugin is disabled by plugins_disabled" in result.output


def test_enable_metrics_replaces_the_off_plugin_with_one_on_the_port() -> None:
    app = AsyncQueueTasks(config=QueueConfig(extra={"metrics": {"host": "127.0.0.2"}}))
    assert not isinstance(app.hooks.pm.get_plugin("metrics"), MetricsPlugin)
    enable_metrics(app, 9100)
    plugin = app.hooks.pm.get_plugin("metrics")
    assert isinstance(plugin, MetricsPlugin)
    assert (plugin.port, plugin.host) == (9100, "127.0.0.2")
    assert app.config.extra["metrics"] == {"host": "127.0.0.2", "port": 9100}
    assert app.config_sources["extra.metrics.port"] == "cli --metrics-port"
    assert "qtasks_task_succeeded" in app.hooks.active
