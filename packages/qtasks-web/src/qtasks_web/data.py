"""What the dashboard shows, read from the app's components at each request (or at each
shared refresh, see :mod:`qtasks_web.live`): nothing here outlives a restart except a cache
of closed chart intervals, which is rebuilt from the storage.

Masking: values whose key looks like a secret (``password``, ``token``, ``api_key``...: the
rule of :mod:`qtasks.masking`) are replaced by :data:`MASK` in everything shown (arguments,
results, dead-letter bodies).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from qtasks import masking
from qtasks.components import AttemptLog, DeadLetter, RecordQuery, StorageQuery, provides
from qtasks.health import stalled_past
from qtasks.masking import mask_text, masked_value
from qtasks.record import TaskRecord, TaskStatus

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks

MASK = "••••••"
_FINAL = (TaskStatus.SUCCESS, TaskStatus.ERROR, TaskStatus.CANCEL)
log = logging.getLogger("qtasks.web")

BUCKETS = 30
"""Intervals of the overview's charts (``window / BUCKETS`` seconds each)."""
SAMPLE = 100
"""Records per status and interval whose timings make the percentiles."""
CHILDREN_SHOWN = 1000
"""Most children a task's page lists (newest first)."""


def masked(value: Any) -> Any:
    """``value`` as the dashboard shows it: :func:`qtasks.masking.masked_value` with the
    dashboard's :data:`MASK`."""
    return masked_value(value, MASK)


def shown_text(value: Any) -> str:
    """Text a page shows as it is (an error, a traceback, a cancel or dead-letter reason)
    through :func:`~qtasks.masking.mask_text`; ``""`` for ``None``."""
    return "" if value is None else mask_text(str(value))


def masked_args(app: AsyncQueueTasks, task_name: str, args: list[Any]) -> list[Any]:
    """``args`` masked: a positional argument is masked too when the task, registered in
    ``app``, names its parameter like a secret (``send(user, password)``;
    :func:`qtasks.masking.masked_args`)."""
    task = app.tasks.get(task_name)
    return masking.masked_args(args, task.caller_signature if task else None, MASK)


def pretty(value: Any) -> str:
    """JSON of a masked value, indented (for ``<pre>``); where it is not JSON, its ``repr``,
    masked too."""
    shown = masked(value)
    try:
        return json.dumps(shown, indent=2, ensure_ascii=False, default=_masked_repr)
    except (TypeError, ValueError, RecursionError):
        return _cut(_masked_repr(shown), 10_000)


def _masked_repr(value: Any) -> str:
    return mask_text(repr(value))


PREVIEW_MAX = 64 * 1024
"""Dead-letter bodies larger than this are not decoded for their preview."""


def body_preview(app: AsyncQueueTasks, body: bytes, limit: int = 400) -> str:
    """A dead letter's body for its row: the message as the worker would decode it, secrets
    masked as on the task page (positional ones too), cut at ``limit`` characters. A body
    that is not a message (bytes of any kind, too deep, too large) shows only its size and
    first bytes in hex: raw text could hold anything."""
    if len(body) <= PREVIEW_MAX:
        try:
            message = app.codec.decode(body)
        except Exception:  # not a message: SerializationError, or a codec that fails
            pass
        else:
            shown = {
                "task": message.task_name,
                "args": masked_args(app, message.task_name, message.args),
                "kwargs": masked(message.kwargs),
                "uuid": message.uuid,
                "attempt": message.attempt,
                "headers": masked(message.headers),
            }
            try:
                return _cut(json.dumps(shown, ensure_ascii=False, default=repr), limit)
            except (TypeError, ValueError, RecursionError):
                pass
    return f"({len(body)} bytes, not a readable message) {body[:24].hex(' ')}"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0-100) of ``values``; ``None`` when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def queue_wait(record: TaskRecord) -> float | None:
    """Seconds from when the task could run (created, or its ETA) to when it began."""
    started = began(record)
    if started is None:
        return None
    return max(0.0, started - max(record.created_at, record.eta or 0.0))


def began(record: TaskRecord) -> float | None:
    """When the record's last run began: its ``started_at``, which a storage sets when a run
    begins (the run under way for a ``process`` record; see :attr:`TaskRecord.started_at`)."""
    return record.started_at


def runs(record: TaskRecord, earlier: list[TaskRecord]) -> int:
    """How many runs of the task began, by its stored record and its ``earlier`` attempts
    (:func:`attempts`): each earlier one began, and so did the record's own when it says when
    it began. More than ``record.attempt`` when a worker was lost mid-run (the message is
    delivered again, the attempt runs again: ``attempt`` counts the retries)."""
    return len(earlier) + (record.started_at is not None)


def run_time(record: TaskRecord) -> float | None:
    """Seconds from the beginning of the final attempt to the final status."""
    if record.started_at is None or not record.status.final:
        return None
    return max(0.0, record.updated_at - record.started_at)


def queryable(app: AsyncQueueTasks) -> StorageQuery | None:
    """The app's storage when it can list records, else ``None``."""
    storage = app.storage
    return cast(StorageQuery, storage) if provides(storage, StorageQuery) else None


_COUNTED = (*_FINAL, TaskStatus.PROCESS, TaskStatus.RETRY)
"""The status indexes the charts count."""


@dataclass(slots=True)
class Interval:
    """One interval of the overview's charts."""

    end: float
    started: int = 0
    finished: int = 0
    failed: int = 0
    wait_p50: float | None = None
    wait_p95: float | None = None
    run_p50: float | None = None
    run_p95: float | None = None
    counts: dict[TaskStatus, int] = field(default_factory=dict)
    """The count of each of :data:`_COUNTED` in the interval, as read."""

    def as_json(self, length: float) -> dict[str, Any]:
        return {
            "t": self.end,
            "started": self.started / length,
            "finished": self.finished / length,
            "failure_rate": self.failed / self.finished if self.finished else None,
            "wait_p50": self.wait_p50,
            "wait_p95": self.wait_p95,
            "run_p50": self.run_p50,
            "run_p95": self.run_p95,
        }


async def read_interval(
    storage: StorageQuery, start: float, end: float, before: Interval | None = None
) -> Interval:
    """Counts and timing percentiles of the records whose index time is in ``[start, end)``.

    Started: the records that began in it and still run, plus those that ended in it
    (finished or retried), so a task counts once, at its end when it ended. The percentiles
    of ``before`` (this interval as read earlier) are kept when its success and error counts
    did not change."""
    point = Interval(end)
    counts = point.counts
    for status in _COUNTED:
        counts[status] = await storage.count(status, start, end)
    point.finished = sum(counts[s] for s in _FINAL)
    point.failed = counts[TaskStatus.ERROR]
    point.started = point.finished + counts[TaskStatus.PROCESS] + counts[TaskStatus.RETRY]
    sampled = (TaskStatus.SUCCESS, TaskStatus.ERROR)
    if before is not None and all(before.counts.get(s) == counts[s] for s in sampled):
        point.wait_p50, point.wait_p95 = before.wait_p50, before.wait_p95
        point.run_p50, point.run_p95 = before.run_p50, before.run_p95
        return point
    waits: list[float] = []
    runs: list[float] = []
    for status in sampled:
        if not counts[status]:
            continue
        page = await storage.query(RecordQuery(status=status, since=start, until=end, limit=SAMPLE))
        for record in page.records:
            wait, ran = queue_wait(record), run_time(record)
            if wait is not None:
                waits.append(wait)
            if ran is not None:
                runs.append(ran)
    point.wait_p50, point.wait_p95 = percentile(waits, 50), percentile(waits, 95)
    point.run_p50, point.run_p95 = percentile(runs, 50), percentile(runs, 95)
    return point


@dataclass(slots=True)
class Charts:
    """The overview's chart intervals. Closed intervals are kept between reads, the last two
    read again at each refresh. A closed interval still changes: a task that was running (or
    waiting to retry) leaves the PROCESS (RETRY) index of the interval it began in when it
    ends, and records expire. Records enter an index only at the current time, so a closed
    interval's counts only fall: one count per status over the kept intervals tells whether
    any of them changed, and then they are read again (so every dashboard shows the same
    figures, whenever it was opened)."""

    window: float
    closed: dict[int, Interval] = field(default_factory=dict)
    """Closed intervals by number: interval ``k`` is ``[(k - 1) * length, k * length)``, the
    same floats at every read."""

    @property
    def length(self) -> float:
        return self.window / BUCKETS

    async def read(self, storage: StorageQuery, now: float) -> list[dict[str, Any]]:
        length = self.length
        current = math.floor(now / length) + 1
        numbers = range(current - BUCKETS + 1, current + 1)
        for k in [k for k in self.closed if k < numbers[0]]:
            del self.closed[k]
        await self._check_kept(storage)
        out = []
        for k in numbers:
            fresh = k >= current - 1  # the current interval and the one before
            point = None if fresh else self.closed.get(k)
            if point is None:
                point = await read_interval(storage, (k - 1) * length, k * length)
                if not fresh:
                    self.closed[k] = point
            out.append(point.as_json(min(length, max(now - (k - 1) * length, 1e-3))))
        return out

    async def _check_kept(self, storage: StorageQuery) -> None:
        """Read the kept intervals again when their records changed since they were read."""
        if not self.closed:
            return
        length = self.length
        first, last = min(self.closed), max(self.closed)
        if len(self.closed) != last - first + 1:  # not one run (never so): read them all anew
            self.closed.clear()
            return
        for status in _COUNTED:
            kept = sum(point.counts[status] for point in self.closed.values())
            if await storage.count(status, (first - 1) * length, last * length) != kept:
                break
        else:
            return
        for k, point in sorted(self.closed.items()):
            self.closed[k] = await read_interval(storage, (k - 1) * length, k * length, point)


async def overview(app: AsyncQueueTasks, charts: Charts) -> dict[str, Any]:
    """The overview's figures, JSON-ready."""
    now = time.time()
    stats = await app.broker.stats()
    workers = await app.global_config.workers()
    storage = queryable(app)
    series = await charts.read(storage, now) if storage is not None else None
    return {
        "at": now,
        "queue": {
            "ready_by_priority": {str(p): n for p, n in sorted(stats.ready_by_priority.items())},
            "ready": sum(stats.ready_by_priority.values()),
            "delayed": stats.delayed,
            "in_flight": stats.in_flight,
            "dead_letters": stats.dead_letters,
        },
        "workers": len(workers),
        "running": sum(int(w.get("running", 0) or 0) for w in workers.values()),
        "records_by_status": dict(sorted((await app.storage.stats()).items())),
        "series": series,
        "interval": charts.length,
    }


@dataclass(slots=True)
class WorkerRow:
    """One worker on the Workers page."""

    id: str
    live: bool
    host: str = ""
    pid: int | None = None
    concurrency: int | None = None
    running: int = 0
    processed: int | None = None
    beat_at: float | None = None
    started_at: float | None = None
    held: list[str] = field(default_factory=list)
    stalled: float | None = None
    """Seconds its consumer had gone unanswered at its last heartbeat, when past the worker's
    ``health_stall_limit`` (alive but not consuming: :mod:`qtasks.health`); else ``None``."""


async def workers(app: AsyncQueueTasks) -> list[WorkerRow]:
    """Live workers (heartbeats in the global config) and lost ones: workers named on
    records still ``process`` that no longer beat (their tasks come back when their lease
    runs out)."""
    rows: dict[str, WorkerRow] = {}
    for worker_id, info in sorted((await app.global_config.workers()).items()):
        rows[worker_id] = WorkerRow(
            id=worker_id,
            live=True,
            host=str(info.get("host", "")),
            pid=info.get("pid"),
            concurrency=info.get("concurrency"),
            running=int(info.get("running", 0) or 0),
            processed=info.get("processed"),
            beat_at=info.get("beat_at"),
            started_at=info.get("started_at"),
            stalled=stalled_past(info.get("consume_stalled"), info.get("stall_limit")),
        )
    storage = queryable(app)
    if storage is not None:
        page = await storage.query(RecordQuery(status=TaskStatus.PROCESS, limit=500))
        for record in page.records:
            if not record.worker:
                continue
            row = rows.get(record.worker)
            if row is None:
                row = rows[record.worker] = WorkerRow(id=record.worker, live=False)
            row.held.append(record.uuid)
    return sorted(rows.values(), key=lambda r: (not r.live, r.id))


async def attempts(app: AsyncQueueTasks, record: TaskRecord) -> list[TaskRecord]:
    """The earlier attempts of ``record``, oldest first, when the storage keeps them
    (:class:`~qtasks.components.AttemptLog`); ``[]`` otherwise, or when it fails to say."""
    storage = app.storage
    if not provides(storage, AttemptLog):
        return []
    try:
        return await cast(AttemptLog, storage).attempts(record.uuid)
    except Exception:
        log.warning("the attempts of %s could not be read", record.uuid, exc_info=True)
        return []


async def children(app: AsyncQueueTasks, record: TaskRecord) -> tuple[list[TaskRecord], bool]:
    """The records whose ``parent_uuid`` is ``record``'s (the storage's index of children),
    newest first, at most :data:`CHILDREN_SHOWN`; and whether that is all of them."""
    storage = queryable(app)
    if storage is None:
        return [], False
    found: list[TaskRecord] = []
    cursor = None
    while len(found) < CHILDREN_SHOWN:
        page = await storage.query(RecordQuery(parent_uuid=record.uuid, limit=500, cursor=cursor))
        found += page.records
        cursor = page.cursor
        if cursor is None:
            return found, True
    return found[:CHILDREN_SHOWN], False


async def timers(app: AsyncQueueTasks) -> list[dict[str, Any]] | None:
    """The app's timers (qtasks-timer) with their last claimed tick, or ``None`` when
    qtasks-timer is not installed or the app has no timer."""
    try:
        from qtasks_timer import AsyncTimer
        from qtasks_timer.plugin import TimerPlugin
        from qtasks_timer.settings import TimerSettings
        from qtasks_timer.timer import CLAIMS
    except ImportError:
        return None
    timers = [
        plugin.timer
        for plugin in app.hooks.pm.get_plugins()
        if isinstance(plugin, TimerPlugin) and plugin.timer is not None
    ]
    if timers:
        timer = timers[0]
    elif TimerSettings.declared(app.config):
        # The configuration's timers, as the worker would make them; unbound: a page never
        # adds a plugin to the app (which would make it the app's timer).
        timer = AsyncTimer(app, bind=False)
    else:
        return None
    rows = await timer.describe()
    claims = await app.global_config.get_all(CLAIMS)
    for row in rows:
        mine = f"{row['id']}:"
        ticks = [key[len(mine) :] for key in claims if key.startswith(mine)]
        row["last_run"] = max(ticks) if ticks else None
    return rows


async def dead_letters(app: AsyncQueueTasks, limit: int = 200) -> list[DeadLetter]:
    """The broker's dead letters, oldest first."""
    return await app.broker.dead_letters(limit)


STATUSES = [status.value for status in TaskStatus]
