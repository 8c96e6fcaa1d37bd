"""Live updates by Server-Sent Events, without a read per browser per second.

:class:`Hub` reads the components at most once per ``refresh`` seconds, whatever the number
of open pages: every event stream asks it for the latest figures, and the first to find them
older than ``refresh`` reads them again while the others wait for that read. The rows of a
Tasks page are read again only when the shared head of the listing changed, once for all the
open pages with the same filters, and cheaply (:meth:`Hub.rows`). The pages of one task share
its record the same way (:meth:`Hub.task`). Generator steps are
followed through :meth:`Storage.steps <qtasks.components.Storage.steps>`, which the storage
wakes (no poll), by each page that shows them (on Redis, a blocking read per such page).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from starlette.types import Receive, Scope, Send

from qtasks.components import RecordPage, RecordQuery
from qtasks.errors import QTasksError
from qtasks_web.data import Charts, attempts, overview, queryable

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks
    from qtasks.record import TaskRecord

log = logging.getLogger("qtasks.web")
Emit = Callable[[str, str], Awaitable[None]]
"""``await emit(event, data)`` sends one event to the browser."""

KEEPALIVE = 15.0
"""Seconds between comment lines on an idle stream (proxies close silent connections)."""
CHECK = 0.25
"""Seconds between checks whether the server is shutting down."""
FULL_ROWS = 30.0
"""Most seconds between two full reads of a Tasks page's rows while the cheap reads in
between find nothing (see :meth:`Hub.rows`)."""
SHOWN = 10.0
"""Most seconds the rows a Tasks page was rendered with wait for its live stream, which
starts from them (see :meth:`Hub.opened`)."""
SHOWN_MOST = 64
"""Most such rows kept at once (pages opened without a stream, by a client without scripts,
are dropped first, the oldest first)."""


@dataclass(slots=True)
class _Shared:
    """What open pages share, and how many of them do."""

    lock: anyio.Lock = field(default_factory=anyio.Lock)
    pages: int = 0


S = TypeVar("S", bound=_Shared)
K = TypeVar("K", bound=Hashable)


@asynccontextmanager
async def _sharing(entries: dict[K, S], key: K, new: Callable[[], S]) -> AsyncIterator[None]:
    """While open, ``entries[key]`` (made by ``new``) is there for the pages that share it;
    the last one to leave drops it."""
    entry = entries.get(key)
    if entry is None:
        entry = entries[key] = new()
    entry.pages += 1
    try:
        yield
    finally:
        entry.pages -= 1
        if not entry.pages and entries.get(key) is entry:
            del entries[key]


@dataclass(slots=True)
class _Followed(_Shared):
    """A task whose page is open: its record as last read, shared by its pages."""

    read_at: float = -float("inf")
    record: TaskRecord | None = None
    earlier: list[TaskRecord] = field(default_factory=list)
    seen: tuple[Any, ...] | None = None


@dataclass(slots=True)
class _Listing(_Shared):
    """The filters of open Tasks pages: their rows as last read, shared by those pages."""

    head: tuple[Any, ...] | None = None
    page: RecordPage | None = None
    full_at: float = -float("inf")


class Hub:
    """The figures shared by every open page of one dashboard, read at most once per
    ``refresh`` seconds."""

    def __init__(self, app: AsyncQueueTasks, refresh: float, window: float) -> None:
        self.app = app
        self.refresh = refresh
        self.charts = Charts(window)
        self._lock = anyio.Lock()
        self._overview: dict[str, Any] | None = None
        self._overview_at = -float("inf")
        self._head: tuple[Any, ...] | None = None
        self._head_at = -float("inf")
        self._tasks: dict[str, _Followed] = {}
        self._listings: dict[RecordQuery, _Listing] = {}
        self._shown: dict[RecordQuery, tuple[float, tuple[Any, ...], RecordPage]] = {}
        """Per query, the rows a Tasks page was just rendered with: when read, the head
        read before them, and the page."""

    async def overview(self) -> dict[str, Any]:
        """The overview's figures, read again when older than ``refresh``."""
        async with self._lock:
            if self._overview is None or time.monotonic() - self._overview_at >= self.refresh:
                self._overview = await overview(self.app, self.charts)
                self._overview_at = time.monotonic()
            return self._overview

    async def head(self) -> tuple[Any, ...]:
        """What changes whenever a record is stored or changes status: the newest records
        (any change of status moves a record to the front) and the counts by status."""
        async with self._lock:
            if self._head is None or time.monotonic() - self._head_at >= self.refresh:
                storage = queryable(self.app)
                newest: tuple[Any, ...] = ()
                if storage is not None:
                    page = await storage.query(RecordQuery(limit=20))
                    newest = tuple((r.uuid, r.status.value, r.steps) for r in page.records)
                counts = tuple(sorted((await self.app.storage.stats()).items()))
                self._head = (newest, counts)
                self._head_at = time.monotonic()
            return self._head

    async def opened(self, query: RecordQuery) -> RecordPage:
        """The rows of a Tasks page being rendered (``query``, its filters), read in full
        and kept a moment (:data:`SHOWN`): the page's live stream opens next and starts from
        them in :meth:`rows` rather than reading them again. The head is read first, so that
        any change after the rows were read moves it, and the stream reads them again."""
        storage = queryable(self.app)
        assert storage is not None, "opened() of a storage that cannot list"
        head = await self.head()
        page = await storage.query(query)
        now = time.monotonic()
        shown = self._shown
        for old in [q for q, (at, _, _) in shown.items() if now - at >= SHOWN]:
            del shown[old]
        shown.pop(query, None)
        while len(shown) >= SHOWN_MOST:
            del shown[next(iter(shown))]
        shown[query] = (now, head, page)
        return page

    def listing(self, query: RecordQuery) -> AbstractAsyncContextManager[None]:
        """While open, :meth:`rows` shares the reads of ``query`` with the other pages that
        show it; the last one to leave drops what was read."""
        return _sharing(self._listings, query, _Listing)

    async def rows(self, query: RecordQuery) -> RecordPage:
        """The page of ``query`` (a Tasks page's filters), read again when the shared
        :meth:`head` changed; inside :meth:`listing`. The first read is the query as the page
        made it; the next ones scan one step only (``scan_budget=0``, no time spent searching
        while nothing matches): a page with a record, or with no cursor, is then the full
        query's. When that step found nothing, the rows read before stand: nothing among the
        newest entries matches, and an older entry changes only by moving to the front. The
        full query runs again after :data:`FULL_ROWS` seconds, for what a step cannot see (more
        writes between two reads than a step looks at, a record shown that stopped matching
        or expired). A stream opened by a page that was just rendered starts from the rows
        it showed (:meth:`opened`)."""
        storage = queryable(self.app)
        assert storage is not None, "rows() of a storage that cannot list"
        head = await self.head()
        entry = self._listings[query]
        async with entry.lock:
            shown = self._shown.pop(query, None)
            if entry.page is None and shown is not None and time.monotonic() - shown[0] < SHOWN:
                entry.full_at, entry.head, entry.page = shown  # as the page showed them
            if entry.page is not None and entry.head == head:
                return entry.page
            page = None
            if entry.page is not None and time.monotonic() - entry.full_at < FULL_ROWS:
                quick = await storage.query(replace(query, scan_budget=0))
                page = entry.page
                if quick.records or quick.cursor is None:  # what the full query gives
                    page, entry.full_at = quick, time.monotonic()
            if page is None:
                page = await storage.query(query)
                entry.full_at = time.monotonic()
            entry.page, entry.head = page, head
            return page

    def follow(self, uuid: str) -> AbstractAsyncContextManager[None]:
        """While open, :meth:`task` shares the reads of ``uuid`` with the other pages that
        follow it; the last one to leave drops what was read."""
        return _sharing(self._tasks, uuid, _Followed)

    async def task(self, uuid: str) -> tuple[TaskRecord | None, list[TaskRecord]]:
        """The record of ``uuid`` (``None`` when there is none) and its earlier attempts,
        read again when older than ``refresh`` (the attempts only when the record changed);
        inside :meth:`follow`."""
        entry = self._tasks[uuid]
        async with entry.lock:
            if time.monotonic() - entry.read_at >= self.refresh:
                record = await self.app.storage.get(uuid)
                seen = None
                if record is not None:
                    seen = (record.status, record.updated_at, record.steps, record.worker)
                    if seen != entry.seen:
                        entry.earlier = await attempts(self.app, record)
                entry.record, entry.seen = record, seen
                entry.read_at = time.monotonic()
            return entry.record, entry.earlier


_LINES = re.compile(r"\r\n|\r|\n")


def sse(event: str, data: str) -> bytes:
    """One Server-Sent Event (each line of ``data`` prefixed, as the format requires)."""
    # A browser ends a line at "\r" too: split as it does, or a "\r" in the data (a task
    # name, say) would start a field of its own.
    lines = "".join(f"data: {line}\n" for line in _LINES.split(data))
    return f"event: {event}\n{lines}\n".encode()


class EventStream:
    """An ASGI response that runs ``producer(emit)`` until the browser goes away (then it is
    cancelled), sending what it emits as Server-Sent Events."""

    def __init__(
        self, producer: Callable[[Emit], Awaitable[None]], closing: Callable[[], bool]
    ) -> None:
        self.producer = producer
        self.closing = closing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-store"),
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )
        lock = anyio.Lock()
        last_sent = time.monotonic()

        async def write(payload: bytes) -> None:
            nonlocal last_sent
            async with lock:
                await send({"type": "http.response.body", "body": payload, "more_body": True})
                last_sent = time.monotonic()

        async def emit(event: str, data: str) -> None:
            await write(sse(event, data))

        async def until_gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        async def keepalive() -> None:
            # Also ends the stream when the server shuts down: an open stream would otherwise
            # hold the server until its graceful-shutdown timeout.
            while not self.closing():
                await anyio.sleep(CHECK)
                if time.monotonic() - last_sent >= KEEPALIVE:
                    await write(b": keepalive\n\n")

        try:
            async with anyio.create_task_group() as tg:

                async def produce() -> None:
                    try:
                        await self.producer(emit)
                        await write(sse("end", "{}"))
                    except QTasksError as exc:
                        # No "end" event: the browser reconnects by itself a moment later.
                        log.warning("live updates stopped: %s", exc)
                    tg.cancel_scope.cancel()

                async def watch() -> None:
                    await until_gone()
                    tg.cancel_scope.cancel()

                async def until_closing() -> None:
                    await keepalive()
                    tg.cancel_scope.cancel()

                tg.start_soon(produce)
                tg.start_soon(watch)
                tg.start_soon(until_closing)
        except OSError:  # the connection went away while writing
            return
        with anyio.move_on_after(1, shield=True):
            try:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                pass


def as_json(value: Any) -> str:
    """Compact JSON for an event (non-JSON values as their ``repr``)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=repr)
