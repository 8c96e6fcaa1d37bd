"""Live updates are shared: however many pages follow the overview or one task, the dashboard
reads the components at most once per ``refresh`` interval (no read per browser per second)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks_web import WebSettings, create_app
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
