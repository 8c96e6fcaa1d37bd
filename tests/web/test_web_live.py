"""Live updates are shared: however many pages follow the overview or one task, the dashboard
reads the components at most once per ``refresh`` interval (no read per browser per second)."""

from __future__ import annotations

import html
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream
from web_helpers import Client

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks.components import RecordPage, RecordQuery
from qtasks.memory import MemoryStorage
from qtasks.record import TaskRecord, TaskStatus
from qtasks_redis import RedisStorage
from qtasks_web import WebSettings, create_app, live
from qtasks_web.live import Hub
from qtasks_web.server import running

pytestmark = pytest.mark.anyio
PAGES, EVENTS, REFRESH = 6, 3, 0.5


async def events(stream: SocketStream, wanted: int) -> int:
    """Read ``wanted`` overview events from an open event stream."""
    received = b""
    while received.count(b"event: overview") < wanted:
        received += await stream.receive()
    return received.count(b"event: overview")


async def test_open_pages_share_one_read_per_interval() -> None:
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"]))
    reads = 0
    async with app:
        original = app.broker.stats

        async def counted() -> Any:
            nonlocal reads
            reads += 1
            return await original()

        app.broker.stats = counted  # type: ignore[method-assign]  # counts the shared reads
        web = create_app(app, settings=WebSettings(refresh=REFRESH))
        async with running(web) as url:
            port = int(url.rsplit(":", 1)[1])
            streams = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(PAGES)]
            started = time.monotonic()
            for stream in streams:
                await stream.send(
                    f"GET /events/overview HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
                )
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    for stream in streams:
                        tg.start_soon(events, stream, EVENTS)
            elapsed = time.monotonic() - started
            for stream in streams:
                await stream.aclose()
    # Each page got EVENTS fresh figures; one read per interval served all of them.
    assert reads <= elapsed / REFRESH + 2, (reads, elapsed)
    assert reads < PAGES * EVENTS


async def test_open_pages_of_one_task_share_its_reads() -> None:
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"]))
    gates = [anyio.Event() for _ in range(3)]

    @app.task
    async def export() -> AsyncIterator[int]:
        for i, gate in enumerate(gates):
            await gate.wait()
            yield i

    reads = 0
    async with app:
        task = await app.enqueue("export", [], {})
        original = app.storage.get

        async def counted(uuid: str) -> Any:
            nonlocal reads
            reads += 1
            return await original(uuid)

        app.storage.get = counted  # type: ignore[method-assign]  # counts the reads
        web = create_app(app, settings=WebSettings(refresh=REFRESH))
        async with running(web) as url:
            port = int(url.rsplit(":", 1)[1])
            streams = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(PAGES)]
            received = [b""] * PAGES
            started = time.monotonic()
            for stream in streams:
                path = f"/events/tasks/{task.uuid}"
                await stream.send(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())

            async def until(i: int, wanted: bytes, times: int) -> None:
                while received[i].count(wanted) < times:
                    received[i] += await streams[i].receive()

            async def everywhere(wanted: bytes, times: int) -> None:
                with anyio.fail_after(10):
                    async with anyio.create_task_group() as tg:
                        for i in range(PAGES):
                            tg.start_soon(until, i, wanted, times)

            await everywhere(b"event: state", 1)
            for i, gate in enumerate(gates):  # each step changes the record every page shows
                gate.set()
                await everywhere(b'event: step\ndata: {"i":%d' % i, 1)
            await everywhere(b"event: end", 1)
            elapsed = time.monotonic() - started
            for stream in streams:
                await stream.aclose()
    # Every page followed the task to its end; one read per interval served all of them (and
    # the first pages' opening reads).
    assert reads <= elapsed / REFRESH + 4, (reads, elapsed)
    assert reads < PAGES * 2, (reads, elapsed)


async def test_open_tasks_pages_share_cheap_reads_of_their_rows() -> None:
    """Tasks pages with the same filters share one read of their rows per change of the
    listing's head. After the first, a read scans one step (``scan_budget=0``): a uuid that
    matches nothing among many records costs no time spent searching at each refresh, and a
    task that comes to match is still shown at once."""
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"]))
    reads: list[RecordQuery] = []
    async with app:
        for i in range(12_000):  # more than one step of the scan
            await app.storage.add(TaskRecord(uuid=f"n{i:07d}", task_name="noop"))
        storage = app.storage
        assert isinstance(storage, MemoryStorage)
        original = storage.query

        async def counted(query: RecordQuery) -> RecordPage:
            if query.uuid_prefix == "ffff":
                reads.append(query)
            return await original(query)

        storage.query = counted  # type: ignore[method-assign]  # counts the pages' reads
        web = create_app(app, settings=WebSettings(refresh=0.1))
        async with running(web) as url:
            port = int(url.rsplit(":", 1)[1])
            streams = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(PAGES)]
            received = [b""] * PAGES
            for stream in streams:
                path = "/events/tasks?uuid=ffff"
                await stream.send(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())

            async def until(i: int, wanted: bytes) -> None:
                while wanted not in received[i]:
                    received[i] += await streams[i].receive()

            async def everywhere(wanted: bytes) -> None:
                with anyio.fail_after(10):
                    async with anyio.create_task_group() as tg:
                        for i in range(PAGES):
                            tg.start_soon(until, i, wanted)

            await everywhere(b"event: rows")
            for i in range(3):  # the head changes: the rows are read again, cheaply
                done = len(reads)
                await storage.add(TaskRecord(uuid=f"m{i}", task_name="noop"))
                with anyio.fail_after(5):
                    while len(reads) == done:  # noqa: ASYNC110 - the read is the event
                        await anyio.sleep(0.01)
            await storage.add(TaskRecord(uuid="ffff-late", task_name="noop"))
            await everywhere(b'data-uuid="ffff-late"')
            for stream in streams:
                await stream.aclose()
    assert [query.scan_budget for query in reads[:1]] == [None], "the first read is the page's"
    assert {query.scan_budget for query in reads[1:]} == {0}, reads
    assert len(reads) <= 1 + 4 + 2, f"{len(reads)} reads for {PAGES} pages and 4 changes"


async def test_rows_a_cheap_read_cannot_see_are_read_again_in_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A record shown from deep down the listing that stops matching (cancelled, on a page
    of new tasks) moves to the front where the one-step read finds nothing that matches: the
    rows read before stand until the full read, at most ``FULL_ROWS`` seconds later."""
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"]))
    async with app:
        await app.storage.add(TaskRecord(uuid="ffff-deep", task_name="noop"))
        for i in range(12_000):
            await app.storage.add(TaskRecord(uuid=f"n{i:07d}", task_name="noop"))
        hub = Hub(app, refresh=0.0, window=60.0)
        query = RecordQuery(uuid_prefix="ffff", status=TaskStatus.NEW)
        async with hub.listing(query):
            assert [r.uuid for r in (await hub.rows(query)).records] == ["ffff-deep"]
            await app.storage.cancel("ffff-deep", "not wanted")
            stale = await hub.rows(query)
            assert [r.uuid for r in stale.records] == ["ffff-deep"]  # read one step: kept
            monkeypatch.setattr(live, "FULL_ROWS", 0.0)
            await app.storage.add(TaskRecord(uuid="m1", task_name="noop"))  # the head moves
            assert (await hub.rows(query)).records == []


async def test_a_task_page_shows_where_a_run_starts_over() -> None:
    """Review r19 #7: the task page's step events carry the ``StepsRestarted`` marker (as
    ``{"i": n, "restart": run}``) between the failed run's steps and the retry's."""
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"]))
    runs = 0

    @app.task(retry=1, retry_backoff=0)
    async def export() -> AsyncIterator[int]:
        nonlocal runs
        runs += 1
        yield 0
        if runs == 1:
            raise ConnectionError("the first run fails after its first step")
        yield 1

    async with app:
        task = await app.add_task("export", timeout=10)
        web = create_app(app, settings=WebSettings(refresh=REFRESH))
        async with running(web) as url:
            port = int(url.rsplit(":", 1)[1])
            stream = await anyio.connect_tcp("127.0.0.1", port)
            path = f"/events/tasks/{task.uuid}"
            await stream.send(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            received = b""
            with anyio.fail_after(10):
                while b"event: end" not in received:
                    received += await stream.receive()
            await stream.aclose()
    steps = [line for line in received.split(b"\n") if line.startswith(b'data: {"i":')]
    assert steps == [
        b'data: {"i":0,"value":0}',
        b'data: {"i":1,"restart":2}',
        b'data: {"i":2,"value":0}',
        b'data: {"i":3,"value":1}',
    ], received


async def test_opening_a_tasks_page_reads_its_rows_once(redis_url: str, prefix: str) -> None:
    """Item 2: a Tasks page read its rows (the full query of its filters) to render them,
    and its live stream, opened next by the page, read them again at once. The stream now
    starts from the rows the page showed, as long as the listing's head did not move."""
    storage = RedisStorage(redis_url, prefix=prefix)
    app = AsyncQueueTasks(storage=storage, config=QueueConfig(plugins_disabled=["*"]))
    reads: list[RecordQuery] = []
    async with app:
        for i in range(3):
            await storage.add(TaskRecord(uuid=f"t{i}", task_name="noop"))
        original = storage.query

        async def counted(query: RecordQuery) -> RecordPage:
            reads.append(query)
            return await original(query)

        storage.query = counted  # type: ignore[method-assign]  # counts the page's reads
        web = create_app(app, settings=WebSettings(refresh=60))
        async with running(web) as url:
            port = int(url.rsplit(":", 1)[1])
            shown = await Client(web).get("/tasks?name=noop")
            assert shown.status == 200 and 'data-uuid="t2"' in shown.text
            live_url = re.search(r'data-live="([^"]+)"', shown.text)
            assert live_url is not None
            stream = await anyio.connect_tcp("127.0.0.1", port)
            path = html.unescape(live_url.group(1))
            await stream.send(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            received = b""
            with anyio.fail_after(10):
                while b'data-uuid="t2"' not in received:
                    received += await stream.receive()
            await stream.aclose()
    page_reads = [query for query in reads if query.task_name == "noop"]
    assert page_reads == [RecordQuery(task_name="noop")], reads
