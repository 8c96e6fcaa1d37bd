"""Prometheus metrics: a worker plugin on the qtasks hooks, and cluster-wide gauges for the
dashboard.

:class:`MetricsPlugin` counts what this process's worker does and serves it on an HTTP port of
its own (``qtasks run --metrics-port 9100``, or ``[extra.metrics] port`` in the configuration;
loopback unless ``host`` says otherwise). It is the ``metrics`` entry point of the
``qtasks.plugins`` group: when the configuration enables nothing, the entry point registers an
object without hooks, so it costs nothing. Its metrics live in a registry of its own
(:attr:`MetricsPlugin.registry`), never in prometheus_client's global one, so two apps in one
process do not collide.

:func:`cluster_metrics_app` is an ASGI app serving what every process shares (broker queue depth
per priority, delayed messages, dead letters, live workers from their heartbeats, stored
records by status), read from the app's components at each scrape.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from qtasks import hookimpl
from qtasks.sync import QueueTasks

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from qtasks.app import AsyncQueueTasks
    from qtasks.components import BrokerStats, Delivery
    from qtasks.executor import TaskRun
    from qtasks.record import TaskRecord

log = logging.getLogger("qtasks.web.metrics")

OUTCOMES = ("success", "error", "retry", "cancel", "rejected", "dead_lettered", "expired")
"""The values of the ``outcome`` label of ``qtasks_tasks_total``."""

BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, math.inf),
)
"""Histogram buckets (seconds) of queue wait and run time: 1 ms to 30 min."""

READ_TIMEOUT = 5.0
"""Seconds a scrape waits for the components' figures before leaving them out."""

UNKNOWN_TASK = "(unknown)"
"""The ``task`` label of a rejected message whose task is not declared in the app (any name
would let a sender create label values at will)."""

_STARTED = "qtasks_web.metrics.started"
"""``run.state`` key: ``perf_counter()`` when the run started."""


class MetricsPlugin:
    """Prometheus metrics of one app's worker (see the module docstring).

    ``port``: serve them over HTTP on ``host`` while the worker serves (``0``: any free port,
    see :attr:`address`; ``None``: only collect them into :attr:`registry`, e.g. to expose
    them yourself).
    """

    name = "qtasks-web.metrics"
    qtasks_unique = "qtasks-web metrics"
    """One per app (see :meth:`qtasks.plugins.Hooks.register`): the entry point enabled by the
    configuration and one added in code would count every task twice."""

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.port = port
        self.host = host
        self.registry = registry if registry is not None else CollectorRegistry()
        """Every metric of this plugin (its own registry, never the global one)."""
        # The hooks update plain counters (one event loop thread: no lock, a few hundred
        # nanoseconds per task); the collectors turn them into metric families at a scrape.
        self.outcomes: dict[tuple[str, str], int] = {}
        """Task executions ended, by ``(task, outcome)``."""
        self.queue_wait: dict[str, _Histogram] = {}
        self.run_time: dict[str, _Histogram] = {}
        self.in_flight = 0
        self.worker_up = 0
        self.registry.register(_WorkerCollector(self))
        self.registry.register(_BrokerCollector(self))
        self._app: AsyncQueueTasks | None = None
        self._token: Any = None
        self._loop_thread: int | None = None
        self._server: WSGIServer | None = None

    @property
    def address(self) -> tuple[str, int] | None:
        """``(host, port)`` the metrics are served on now, ``None`` when not serving."""
        if self._server is None:
            return None
        return self.host, int(self._server.server_port)

    # --- serving ------------------------------------------------------------------------

    def _listen(self) -> None:
        assert self.port is not None
        try:
            self._server, _ = start_http_server(self.port, self.host, registry=self.registry)
        except OSError as exc:
            log.error("cannot serve metrics on %s:%s: %s", self.host, self.port, exc)
            return
        port = self._server.server_port  # the one bound, when 0 asked for any free one
        log.info("serving Prometheus metrics on http://%s:%s/metrics", self.host, port)

    async def _close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            # shutdown() waits for the server's poll loop (up to half a second): not in the loop.
            await anyio.to_thread.run_sync(server.shutdown)
            server.server_close()

    def _broker_stats(self) -> BrokerStats | None:
        """The broker's figures, read in the worker's event loop from the scraping thread."""
        app, token = self._app, self._token
        if app is None or token is None or threading.get_ident() == self._loop_thread:
            return None  # not serving, or read in the loop's own thread: it cannot wait on itself
        try:
            stats: BrokerStats = anyio.from_thread.run(_timed, app.broker.stats, token=token)
        except Exception as exc:  # an outage or a stopped loop: the scrape goes on without
            log.warning("metrics: broker stats unavailable: %r", exc)
            return None
        return stats

    # --- hooks --------------------------------------------------------------------------

    @hookimpl
    def qtasks_component_started(self, app: AsyncQueueTasks, kind: str) -> None:
        """The worker serves: ``qtasks_worker_up`` is 1, and the HTTP server starts."""
        if kind != "worker":
            return
        self._app, self._token = app, anyio.lowlevel.current_token()
        self._loop_thread = threading.get_ident()
        self.worker_up = 1
        if self.port is not None and self._server is None:
            self._listen()

    @hookimpl
    async def qtasks_component_stopped(self, kind: str) -> None:
        """The worker stopped: ``qtasks_worker_up`` is 0, and the HTTP server stops."""
        if kind != "worker":
            return
        self.worker_up = 0
        self._token = None
        await self._close()

    @hookimpl
    async def qtasks_app_stopped(self) -> None:
        await self._close()

    @hookimpl
    def qtasks_worker_execute_before(self, record: TaskRecord, run: TaskRun) -> None:
        """Queue wait: from when the task was due to now; the run's start is kept in it."""
        ready = record.created_at
        eta = record.eta
        if eta is not None and eta > ready:
            ready = eta  # a retry or a delayed task: waiting for its time is not queueing
        waited = time.time() - ready
        histogram = self.queue_wait.get(record.task_name)
        if histogram is None:
            histogram = self.queue_wait[record.task_name] = _Histogram()
        histogram.observe(waited if waited > 0.0 else 0.0)
        run.state[_STARTED] = time.perf_counter()
        self.in_flight += 1

    @hookimpl
    def qtasks_worker_execute_after(self, record: TaskRecord, run: TaskRun) -> None:
        started = run.state.pop(_STARTED, None)
        if started is None:
            return
        self.in_flight -= 1
        histogram = self.run_time.get(record.task_name)
        if histogram is None:
            histogram = self.run_time[record.task_name] = _Histogram()
        histogram.observe(time.perf_counter() - started)

    @hookimpl
    def qtasks_task_succeeded(self, record: TaskRecord) -> None:
        self._count(record.task_name, "success")

    @hookimpl
    def qtasks_task_failed(self, record: TaskRecord) -> None:
        self._count(record.task_name, "error")

    @hookimpl
    def qtasks_worker_task_retry(self, record: TaskRecord) -> None:
        self._count(record.task_name, "retry")

    @hookimpl
    def qtasks_task_cancelled(self, record: TaskRecord) -> None:
        self._count(record.task_name, "cancel")

    @hookimpl
    def qtasks_task_dead_lettered(self, record: TaskRecord) -> None:
        self._count(record.task_name, "dead_lettered")

    @hookimpl
    def qtasks_task_expired(self, record: TaskRecord) -> None:
        self._count(record.task_name, "expired")

    @hookimpl
    def qtasks_task_rejected(self, app: AsyncQueueTasks, delivery: Delivery) -> None:
        try:  # a rare path: decoding again costs nothing that matters
            name = app.codec.decode(delivery.body).task_name
        except Exception:
            name = UNKNOWN_TASK
        self._count(name if name in app.tasks else UNKNOWN_TASK, "rejected")

    def _count(self, task: str, outcome: str) -> None:
        key = (task, outcome)
        outcomes = self.outcomes
        outcomes[key] = outcomes.get(key, 0) + 1


class _Histogram:
    """Observations per bucket of :data:`BUCKETS` (not cumulative) and their sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(BUCKETS, value)] += 1  # the first bound >= value: "le"
        self.sum += value


def _histogram_family(
    name: str, documentation: str, histograms: dict[str, _Histogram]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=("task",))
    for task, histogram in list(histograms.items()):  # a copy: the loop may add a task
        counts, total = list(histogram.counts), histogram.sum
        cumulative, buckets = 0, []
        for bound, count in zip(_LE, counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        family.add_metric((task,), buckets, total)
    return family


_LE = ["+Inf" if math.isinf(bound) else repr(bound) for bound in BUCKETS]
"""The ``le`` label of each bucket, as prometheus_client writes it."""


class _WorkerCollector:
    """This worker's figures, read from the plugin's counters at each scrape."""

    def __init__(self, plugin: MetricsPlugin) -> None:
        self._plugin = plugin

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        plugin = self._plugin
        tasks = CounterMetricFamily(
            "qtasks_tasks",
            f"Task executions ended on this worker, by task and outcome ({', '.join(OUTCOMES)}).",
            labels=("task", "outcome"),
        )
        for (task, outcome), count in sorted(plugin.outcomes.items()):
            tasks.add_metric((task, outcome), count)
        in_flight = GaugeMetricFamily("qtasks_tasks_in_flight", "Tasks running on this worker now.")
        in_flight.add_metric((), plugin.in_flight)
        up = GaugeMetricFamily("qtasks_worker_up", "1 while this worker serves.")
        up.add_metric((), plugin.worker_up)
        return [
            tasks,
            _histogram_family(
                "qtasks_task_queue_wait_seconds",
                "Seconds from when a task was due (enqueued, or its retry or eta time) to its "
                "start.",
                plugin.queue_wait,
            ),
            _histogram_family(
                "qtasks_task_run_seconds",
                "Seconds from a task's start to its settling (final record stored, message acked).",
                plugin.run_time,
            ),
            in_flight,
            up,
        ]


async def _timed(read: Callable[[], Awaitable[Any]]) -> Any:
    with anyio.fail_after(READ_TIMEOUT):
        return await read()


class _BrokerCollector:
    """Queue depth, delayed messages and dead letters, read from the broker at each scrape
    (nothing is polled between scrapes)."""

    def __init__(self, plugin: MetricsPlugin) -> None:
        self._plugin = plugin

    def describe(self) -> Iterable[Metric]:
        return broker_families(None)

    def collect(self) -> Iterable[Metric]:
        stats = self._plugin._broker_stats()
        return broker_families(stats) if stats is not None else []


def broker_families(stats: BrokerStats | None) -> list[Metric]:
    """The broker's figures as metric families (empty ones when ``stats`` is ``None``)."""
    depth = GaugeMetricFamily(
        "qtasks_queue_depth", "Messages ready to run, by priority.", labels=("priority",)
    )
    delayed = GaugeMetricFamily("qtasks_queue_delayed", "Messages waiting for their time.")
    unsettled = GaugeMetricFamily(
        "qtasks_queue_in_flight", "Messages delivered to workers and not settled yet."
    )
    dead = GaugeMetricFamily("qtasks_dead_letters", "Messages in the dead-letter queue.")
    if stats is not None:
        for priority, count in sorted(stats.ready_by_priority.items()):
            depth.add_metric((str(priority),), count)
        delayed.add_metric((), stats.delayed)
        unsettled.add_metric((), stats.in_flight)
        dead.add_metric((), stats.dead_letters)
    return [depth, delayed, unsettled, dead]


# --- cluster-wide -----------------------------------------------------------------------


async def cluster_families(app: AsyncQueueTasks) -> list[Metric]:
    """What every process of ``app`` shares, read from its components now: broker stats,
    live workers (heartbeats in the global config) and stored records by status."""
    async with anyio.create_task_group() as tg:
        results: dict[str, Any] = {}

        async def read(key: str, call: Callable[[], Awaitable[Any]]) -> None:
            results[key] = await _timed(call)

        tg.start_soon(read, "broker", app.broker.stats)
        tg.start_soon(read, "workers", app.global_config.workers)
        tg.start_soon(read, "storage", app.storage.stats)
    families = broker_families(results["broker"])
    workers: dict[str, dict[str, Any]] = results["workers"]
    live = GaugeMetricFamily("qtasks_workers_live", "Workers whose heartbeat has not expired.")
    live.add_metric((), len(workers))
    per_worker = {
        key: GaugeMetricFamily(f"qtasks_worker_{key}", text, labels=("worker",))
        for key, text in (
            ("running", "Tasks running on the worker (last heartbeat)."),
            ("waiting", "Messages waiting in the worker's local queue (last heartbeat)."),
            ("concurrency", "Tasks the worker runs at once at most."),
        )
    }
    processed = CounterMetricFamily(
        "qtasks_worker_processed",
        "Tasks the worker handled since it started (last heartbeat).",
        labels=("worker",),
    )
    for worker_id, info in sorted(workers.items()):
        for key, family in per_worker.items():
            if isinstance(info.get(key), int | float):
                family.add_metric((worker_id,), info[key])
        if isinstance(info.get("processed"), int | float):
            processed.add_metric((worker_id,), info["processed"])
    stored = GaugeMetricFamily(
        "qtasks_tasks_stored", "Task records in the storage, by status.", labels=("status",)
    )
    for status, count in sorted(results["storage"].items()):
        stored.add_metric((status,), count)
    return [*families, live, *per_worker.values(), processed, stored]


class _Families:
    """A collector of families already read (``generate_latest`` takes any collector)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]


def cluster_metrics_app(app: AsyncQueueTasks | QueueTasks) -> ASGIApp:
    """An ASGI app serving ``app``'s cluster-wide gauges in the Prometheus text format at any
    path (mount it at ``/metrics``). The app's components are started on the first scrape
    if they are not yet; a component that cannot be read answers 503."""
    from starlette.responses import PlainTextResponse, Response

    aio = app.aio if isinstance(app, QueueTasks) else app

    async def asgi(
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        response: Response
        if scope["method"] not in ("GET", "HEAD"):
            response = PlainTextResponse("method not allowed", 405, {"Allow": "GET, HEAD"})
        else:
            try:
                await aio.start()
                families = await cluster_families(aio)
            except Exception as exc:
                log.warning("cluster metrics unavailable: %r", exc)
                response = PlainTextResponse(f"qtasks components unavailable: {exc!r}\n", 503)
            else:
                body = generate_latest(_Families(families))
                response = Response(body, media_type=CONTENT_TYPE_LATEST)
        await response(scope, receive, send)

    return asgi


async def _lifespan(
    receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]
) -> None:
    """Served alone (``uvicorn``), nothing to start: components start on the first scrape."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
