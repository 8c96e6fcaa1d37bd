"""docs/metrics-and-tracing.md: its Python blocks run in order in one namespace (as a reader
pastes them), the cluster metrics service they build answers a scrape, and its configuration
block enables both plugins."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from obs_helpers import get, parse, serving, value

from qtasks import AsyncQueueTasks
from qtasks_web.metrics import MetricsPlugin
from qtasks_web.tracing import TracingPlugin

PAGE = Path(__file__).resolve().parents[2] / "docs" / "metrics-and-tracing.md"
BLOCK = re.compile(r"^(<!-- fragment[^\n]*-->\n)?```(\w*)\n(.*?)^```$", re.M | re.S)


def blocks(lang: str) -> list[str]:
    return [
        code for frag, kind, code in BLOCK.findall(PAGE.read_text()) if kind == lang and not frag
    ]


async def scrape_service(service: Any) -> tuple[int, str]:
    async with serving(service) as url:
        status, _, body = await anyio.to_thread.run_sync(get, url)
    return status, body


def test_the_python_blocks_run_and_the_cluster_service_answers() -> None:
    namespace: dict[str, Any] = {"__name__": "metrics_docs"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for code in blocks("python"):
            exec(compile(code, str(PAGE), "exec"), namespace)
    assert "add: 3 succeeded, 3 queue waits observed" in out.getvalue()
    assert "one trace: True" in out.getvalue()
    # The Starlette service of the page, served for real: /metrics answers (the app's
    # components start again in the server's loop).
    status, body = anyio.run(scrape_service, namespace["service"])
    assert status == 200, body
    samples = parse(body)
    # The page's worker stopped cleanly: it took its heartbeat off (HeartbeatEnd), so no
    # worker is live (a stale last beat used to count it for a heartbeat's lifetime).
    assert value(samples, "qtasks_workers_live") == 0
    # Per-worker figures are of live workers only (tests/web/test_cluster_metrics.py has them).
    assert not [name for name, _ in samples if name == "qtasks_worker_processed_total"]
    assert value(samples, "qtasks_tasks_stored", status="success") == 3


@pytest.mark.parametrize("code", blocks("toml"))
def test_the_configuration_block_enables_both_plugins(code: str, tmp_path: Path) -> None:
    name = code.splitlines()[0].removeprefix("# file: ")
    (tmp_path / name).write_text(code)
    app = AsyncQueueTasks.from_config(tmp_path / name)
    metrics = app.hooks.pm.get_plugin("metrics")
    assert isinstance(metrics, MetricsPlugin)
    assert (metrics.port, metrics.host) == (9100, "127.0.0.1")
    assert isinstance(app.hooks.pm.get_plugin("tracing"), TracingPlugin)


def test_the_outcomes_say_where_a_message_given_up_after_worker_failures_counts() -> None:
    """A message a component or plugin failed on ``max_deliveries`` times fires
    ``qtasks_task_rejected`` (tests/web/test_metrics.py counts it for real): the table says
    ``rejected`` for it, not ``dead_lettered``, the outcome of deliveries that ran out."""
    [row] = [
        line for line in PAGE.read_text().splitlines() if line.startswith("| `qtasks_tasks_total`")
    ]
    rejected = row[row.index("`rejected` (") : row.index("`dead_lettered` (")]
    dead_lettered = row[row.index("`dead_lettered` (") : row.index("`expired` (")]
    assert "a component or plugin failed on it `max_deliveries` times" in rejected
    assert "failed on it" not in dead_lettered
