"""Helpers of the metrics and tracing tests: scraping and parsing Prometheus text, and a
test-only span exporter that a worker process uses to hand its spans to the test."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import redis
import uvicorn
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from prometheus_client.parser import text_string_to_metric_families

from qtasks import AsyncQueueTasks
from qtasks.task import TaskDef

ASGIApp = Any

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""Every sample of a scrape: ``(name, sorted labels) -> value``."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn(args: Sequence[str], path: Path, cwd: Path | None = None) -> subprocess.Popen[str]:
    """``python args...`` in a process of its own (output piped) with ``path`` importable, the
    caller's ``PYTHONPATH`` after it (a worktree's sources, which must win over the installed
    checkout's), and no ``QTASKS_*`` variables of the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
    paths = [str(path), *filter(None, [os.environ.get("PYTHONPATH")])]
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env={**env, "PYTHONPATH": os.pathsep.join(paths)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def parse(text: str) -> Samples:
    """The samples of a Prometheus text exposition, parsed by prometheus_client's parser."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The value of one sample, ``None`` when the scrape has no such sample."""
    return samples.get((name, tuple(sorted(labels.items()))))


def get(url: str, method: str = "GET") -> tuple[int, str, str]:
    """``(status, content type, body)`` of one HTTP request (blocking)."""
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read().decode()
            return response.status, response.headers.get("Content-Type", ""), body
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


async def scrape(url: str) -> Samples:
    status, _, body = await anyio.to_thread.run_sync(get, url)
    assert status == 200, body
    return parse(body)


async def scrape_until(url: str, done: Callable[[Samples], bool], timeout: float = 20) -> Samples:
    """Scrape ``url`` until ``done(samples)`` (the worker's hooks run after the records a
    producer waits on are stored), failing at the deadline with the last scrape."""
    samples: Samples = {}
    try:
        with anyio.fail_after(timeout):
            while True:
                try:
                    samples = await scrape(url)
                except OSError:  # the server is not listening yet
                    samples = {}
                if done(samples):
                    return samples
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(
            f"metrics never satisfied the condition; last scrape: {samples}"
        ) from None


def span_dict(span: ReadableSpan) -> dict[str, Any]:
    """What the tests check of a span, as JSON-able values (ids as hex)."""
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent is not None else None,
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
        "description": span.status.description,
        "events": [{"name": e.name, "attributes": dict(e.attributes or {})} for e in span.events],
    }


class RedisListExporter(SpanExporter):
    """Test only: appends each finished span, as :func:`span_dict` JSON, to a Redis list, so
    a test can read the spans of a worker process."""

    def __init__(self, url: str, key: str) -> None:
        self._client = redis.Redis.from_url(url)
        self._key = key

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._client.rpush(self._key, *(json.dumps(span_dict(s)) for s in spans))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._client.close()


@asynccontextmanager
async def serving(asgi: ASGIApp) -> AsyncIterator[str]:
    """``asgi`` served by uvicorn on a free loopback port; yields its URL."""
    port = free_port()
    config = uvicorn.Config(asgi, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn offers no event to wait on
                await anyio.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{port}/metrics"
        finally:
            server.should_exit = True


def fails_once(app: AsyncQueueTasks) -> TaskDef[[], Coroutine[Any, Any, str]]:
    """Declare ``flaky``: raises on its first run, is retried once (at once), returns "ok"."""
    attempts: list[int] = []

    @app.task(retry=1, retry_backoff=0)
    async def flaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise ValueError("first time")
        return "ok"

    return flaky


def runs_until_cancelled(
    app: AsyncQueueTasks,
) -> tuple[TaskDef[[], Coroutine[Any, Any, None]], anyio.Event]:
    """Declare ``waits`` (runs for 30 s) and the event it sets once it runs."""
    started = anyio.Event()

    @app.task
    async def waits() -> None:
        started.set()
        await anyio.sleep(30)

    return waits, started
