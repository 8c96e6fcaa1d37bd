"""A TCP fault proxy for the reliability tests: put it between a client and a server and change,
at run time, what the network does to every connection through it.

Modes (:attr:`FaultProxy.mode`):

``pass``
    Forward both ways.
``latency``
    Forward both ways, every chunk ``delay`` seconds after it was read. Each direction has a
    queue of ``(release time, chunk)``: chunks keep their order and the delay is not paid once
    per chunk, so throughput is unchanged and a round trip costs ``2 * delay`` more. With
    ``jitter`` each chunk's delay is drawn between ``delay - jitter`` and ``delay + jitter``;
    a chunk is never released before the one read before it (TCP keeps order), so a short
    draw behind a long one waits for it.
``blackhole``
    A network partition: connections are accepted and kept, but nothing is forwarded in either
    direction; what arrives meanwhile (and what was still delayed) is held, in order, and
    delivered when the mode changes back, as TCP does when a partition heals before it gives
    up. Never dropped: a live TCP stream never loses bytes in its middle, and a proxy that did
    would desynchronise the protocol on both ends (a fault no real network makes). A client
    only notices through its own timeouts, and a connection it closed meanwhile delivers what
    it had sent and then ends.
``reset``
    Every open connection is closed with a TCP RST (``SO_LINGER`` 0) on both sides, and every
    new one is reset as soon as it is accepted, until the mode changes.
``slice``
    Forward both ways, in pieces of ``size`` bytes written ``delay`` seconds apart (each piece
    its own write, so the reader meets frames cut anywhere): a parser must wait for the rest.
``close_after``
    Forward both ways, but each connection forwards only a random number of bytes (both
    directions together, drawn between ``low`` and ``high`` when the connection first carries
    bytes in this mode), then is reset on both sides: the last chunk is cut at that byte, so
    a command or a reply ends mid-frame, and whether the server ran a command whose reply was
    cut is unknown to the client. With ``replies_only`` only the server's bytes count, so
    every cut falls in a reply (a command applied, its outcome unknown to the client).

The proxy runs its own event loop in a daemon thread, so a test that blocks its own loop (or
uses a sync client) cannot stall it; the control methods are thread-safe. In a test::

    with FaultProxy(("127.0.0.1", redis_port)) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        proxy.blackhole()
        ...
        proxy.passthrough()

As a program (for a process of its own), it prints the port it listens on, then reads commands
from stdin, one a line: ``pass``, ``latency SECONDS``, ``blackhole``, ``reset``, ``stats``; each
is answered with one line (``ok`` or the counters as JSON)::

    python tests/faultproxy.py --listen 127.0.0.1:0 --upstream 127.0.0.1:6379
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import struct
import sys
import threading
import time
from collections.abc import Coroutine
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeVar

_HOLD_POLL = 0.01
"""Seconds between two looks at the mode while a partition holds a chunk back."""

Mode = Literal["pass", "latency", "blackhole", "reset", "slice", "close_after"]
T = TypeVar("T")

_CHUNK = 65536


@dataclass
class ProxyStats:
    """Counters since the proxy started."""

    connections: int = 0
    """Connections accepted (including those reset at once)."""
    active: int = 0
    """Connections open now."""
    resets: int = 0
    """Connections closed with an RST by the ``reset`` mode."""
    bytes_up: int = 0
    """Bytes forwarded client -> server."""
    bytes_down: int = 0
    """Bytes forwarded server -> client."""
    held: int = 0
    """Bytes held back by the ``blackhole`` mode (both directions), delivered when it ends."""
    cut: int = 0
    """Connections reset by the ``close_after`` mode once their bytes ran out."""


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with an RST: SO_LINGER on with a zero timeout, then close without flushing."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # already closed
    writer.transport.abort()


class _Link:
    """One proxied connection: two directions, each a reader task and a sender task."""

    def __init__(
        self,
        proxy: FaultProxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = False
        self.budget: int | None = None
        """Bytes this link may still forward (``close_after``), drawn when first needed."""

    def start(self) -> None:
        for reader, writer, up in ((self.client[0], self.server[1], True),
                                   (self.server[0], self.client[1], False)):  # fmt: skip
            queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
            self.tasks.append(asyncio.create_task(self._read(reader, queue)))
            self.tasks.append(asyncio.create_task(self._send(queue, writer, up)))

    async def _read(
        self, reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes] | None]
    ) -> None:
        proxy = self.proxy
        last = 0.0  # the release time of the chunk before: none is released before it
        try:
            while data := await reader.read(_CHUNK):
                mode = proxy.mode
                if mode == "blackhole":
                    proxy.stats.held += len(data)
                delay = 0.0
                if mode == "latency":
                    delay = proxy.delay
                    if proxy.jitter:
                        delay += proxy.rng.uniform(-proxy.jitter, proxy.jitter)
                last = max(time.monotonic() + max(delay, 0.0), last)
                queue.put_nowait((last, data))
        except OSError:
            pass
        queue.put_nowait(None)  # end of stream, after what is still queued

    async def _send(
        self,
        queue: asyncio.Queue[tuple[float, bytes] | None],
        writer: asyncio.StreamWriter,
        up: bool,
    ) -> None:
        proxy = self.proxy
        try:
            while (item := await queue.get()) is not None:
                release, data = item
                wait = release - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                while proxy.mode == "blackhole":  # noqa: ASYNC110 - set from another thread
                    await asyncio.sleep(_HOLD_POLL)
                cut = False
                if proxy.mode == "close_after" and not (up and proxy.cut_replies_only):
                    if self.budget is None:
                        self.budget = proxy.rng.randint(*proxy.cut_range)
                    if len(data) >= self.budget:
                        data, cut = data[: self.budget], True
                    self.budget -= len(data)
                await self._write(writer, data, up)
                if cut:
                    proxy.stats.cut += 1
                    self.reset()
                    return
            # One side closed: pass the FIN on (half-close), the other direction goes on.
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            self.close()

    async def _write(self, writer: asyncio.StreamWriter, data: bytes, up: bool) -> None:
        proxy = self.proxy
        size = proxy.slice_size if proxy.mode == "slice" else len(data)
        for at in range(0, len(data), max(size, 1)):
            piece = data[at : at + size]
            if at:
                await asyncio.sleep(proxy.slice_delay)
            # Counted before the write: the reader may act on the bytes before drain()
            # returns here, and must find them counted.
            if up:
                proxy.stats.bytes_up += len(piece)
            else:
                proxy.stats.bytes_down += len(piece)
            writer.write(piece)
            await writer.drain()

    def reset(self) -> None:
        if not self.closed:
            self.proxy.stats.resets += 1
        _rst(self.client[1])
        _rst(self.server[1])
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.proxy.stats.active -= 1
        self.proxy._links.discard(self)
        for _, writer in (self.client, self.server):
            writer.transport.abort()
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()

    async def wait(self) -> None:
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.close()


class FaultProxy:
    """A TCP proxy to ``upstream`` whose faults are switched at run time (module docstring)."""

    def __init__(
        self, upstream: tuple[str, int], listen: tuple[str, int] = ("127.0.0.1", 0)
    ) -> None:
        self.upstream = upstream
        self.listen = listen
        self.mode: Mode = "pass"
        self.delay = 0.0
        self.jitter = 0.0
        self.slice_size = 1
        self.slice_delay = 0.0
        self.cut_range = (1, 1)
        self.cut_replies_only = False
        self.rng = random.Random()
        self.stats = ProxyStats()
        self.port = 0
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---

    def start(self) -> FaultProxy:
        """Listen (in a thread of its own); :attr:`port` is set when this returns."""
        ready = threading.Event()
        failed: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._accept, *self.listen, reuse_address=True)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:
                failed.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=serve, name="faultproxy", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            raise failed[0]
        return self

    def close(self) -> None:
        """Stop listening, close every connection, end the thread."""
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- control (from any thread) ---

    def passthrough(self) -> None:
        """Forward both ways (what is still delayed keeps its release time)."""
        self.mode = "pass"

    def latency(self, seconds: float, jitter: float = 0.0) -> None:
        """Delay every chunk by ``seconds`` in each direction (``2 * seconds`` a round trip),
        give or take up to ``jitter`` seconds drawn per chunk (order kept)."""
        self.delay, self.jitter = seconds, jitter
        self.mode = "latency"

    def slice(self, size: int = 1, delay: float = 0.0) -> None:
        """Forward in pieces of ``size`` bytes, ``delay`` seconds apart."""
        self.slice_size, self.slice_delay = size, delay
        self.mode = "slice"

    def close_after(
        self, low: int, high: int, seed: int | None = None, *, replies_only: bool = False
    ) -> None:
        """Reset each connection once it has forwarded a random number of bytes between
        ``low`` and ``high`` (``seed``: the same draws each run). ``replies_only``: count
        (and cut) only what the server sends, so that every cut falls in a reply: the server
        ran the command, the client does not know it."""
        if seed is not None:
            self.rng.seed(seed)
        self.cut_range = (low, high)
        self.cut_replies_only = replies_only
        self.mode = "close_after"

    def blackhole(self) -> None:
        """Forward nothing, drop everything, keep the connections open."""
        self.mode = "blackhole"

    def reset(self) -> None:
        """RST every open connection, and every new one until the mode changes."""
        self.mode = "reset"
        self._call(self._reset_all())

    def set_mode(self, mode: str, seconds: float = 0.0) -> None:
        """By name: ``pass``, ``latency`` (with ``seconds``), ``blackhole``, ``reset``,
        ``slice`` (1-byte pieces, ``seconds`` apart)."""
        if mode == "pass":
            self.passthrough()
        elif mode == "latency":
            self.latency(seconds)
        elif mode == "blackhole":
            self.blackhole()
        elif mode == "reset":
            self.reset()
        elif mode == "slice":
            self.slice(1, seconds)
        else:
            raise ValueError(f"unknown mode {mode!r}")

    # --- inside the proxy's loop ---

    @property
    def resetting(self) -> bool:
        """In ``reset`` mode (read afresh each time: another thread switches it)."""
        return self.mode == "reset"

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _reset_all(self) -> None:
        for link in list(self._links):
            link.reset()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.close()
        # Closed links end their handlers (not cancelled: asyncio's stream callback would log
        # the CancelledError); the loop stops with no task pending.
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        # And every link's reader and sender, cancelled by close() but not yet ended (a link
        # closed earlier, or its handler gone first): the loop closes next, and a task still
        # pending then is collected later with "Event loop is closed" (a warning in some
        # other test). The loop is the proxy's own, so all its tasks are the proxy's.
        left = asyncio.all_tasks() - {asyncio.current_task()}
        if left:
            await asyncio.wait(left, timeout=5)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._handle(reader, writer)
        finally:
            self._handlers.discard(task)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        if self.resetting:
            self.stats.resets += 1
            _rst(writer)
            return
        try:
            upstream = await asyncio.open_connection(*self.upstream)
        except OSError:
            _rst(writer)  # the server is down: the client sees its connection reset
            return
        if self.resetting:  # switched while we connected
            self.stats.resets += 1
            _rst(writer)
            _rst(upstream[1])
            return
        link = _Link(self, (reader, writer), upstream)
        self._links.add(link)
        self.stats.active += 1
        link.start()
        await link.wait()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=_address, default=("127.0.0.1", 0))
    parser.add_argument("--upstream", type=_address, required=True)
    args = parser.parse_args(argv)
    with FaultProxy(args.upstream, args.listen) as proxy:
        print(proxy.port, flush=True)
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            try:
                if words[0] == "stats":
                    print(json.dumps(asdict(proxy.stats)), flush=True)
                    continue
                proxy.set_mode(words[0], float(words[1]) if len(words) > 1 else 0.0)
            except (ValueError, IndexError) as exc:
                print(f"error {exc}", flush=True)
                continue
            print("ok", flush=True)


if __name__ == "__main__":
    main()
