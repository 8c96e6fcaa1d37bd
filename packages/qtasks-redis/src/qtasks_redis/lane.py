"""The fast lane: a small pipelined RESP2 client for the hot path (scripts, HMGET, BLPOP).

redis-py spends most of a loopback round trip in Python (a connection checked out of a pool per
command, ``asyncio.wait_for`` per write, timeouts, events), and with many concurrent callers
opens one socket each. The lane instead multiplexes every concurrent command of a component on
one connection: the first request of an event-loop tick is sent at once, the tick's later ones
leave together in one ``send`` at its end, and replies are
matched to callers in order (Redis answers a connection's commands in the order sent). Blocking
commands (``BLPOP``, ``BLMOVE``) get connections of their own from a small free list, since they
would hold up everything queued behind them.

It serves ``redis://``, ``rediss://`` (TLS, its context made by redis-py from the URL's
``ssl_*`` options) and ``unix://`` targets whose URL carries no other options than ``db``;
Redis Cluster goes through redis-py (see :func:`lane_for`). Errors are redis-py's
exception classes, so callers handle both paths alike: a lost connection fails every pending
command with ``ConnectionError`` (retried, like redis-py's own retry policy, with jittered
exponential backoff), a command that gets no reply within ``socket_timeout`` aborts the
connection with ``TimeoutError``.

Over ~500 lines: one pipelined connection's protocol handling (RESP parsing, script
calls, blocking calls and their cancellation), which must be read as a whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import anyio
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from qtasks import stopping

if TYPE_CHECKING:
    from qtasks_redis.connection import RedisTarget, Script
    from qtasks_redis.watch import KeyWatch

try:
    import hiredis

    HIREDIS = True
except ImportError:  # pragma: no cover - exercised by the pure-Python parser test
    HIREDIS = False

_IDLE_BLOCKING = 8
"""Blocking connections kept open for reuse (more are opened while needed)."""

log = logging.getLogger("qtasks.redis")


class _ReplyError(Exception):
    """An error reply as parsed; turned into redis-py's exception class by :func:`_error`."""


_ERRORS: dict[str, type[Exception]] = {
    "NOSCRIPT": NoScriptError,
    "WRONGPASS": AuthenticationError,
    "NOAUTH": AuthenticationError,
    "NOPERM": NoPermissionError,
    "LOADING": BusyLoadingError,
    "READONLY": ReadOnlyError,
    "OOM": OutOfMemoryError,
}


def _error(reply: _ReplyError) -> Exception:
    text = str(reply)
    if text.startswith("ERR max number of clients reached"):
        # Written by a full server on accept, before it closes the connection (redis-py's
        # class for it too): an outage, not a refusal of the call.
        return RedisConnectionError(text)
    return _ERRORS.get(text.split(" ", 1)[0], ResponseError)(text)


class _Incomplete(Exception):
    pass


class PyReader:
    """A RESP2 reply parser in Python, used when hiredis is not installed (same interface as
    ``hiredis.Reader``: ``feed`` bytes, ``gets`` a reply or ``False``)."""

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    def gets(self) -> Any:
        try:
            value, pos = self._parse(self._pos)
        except _Incomplete:
            return False
        if pos == len(self._buf):
            self._buf.clear()
            pos = 0
        elif pos > 65536:
            del self._buf[:pos]
            pos = 0
        self._pos = pos
        return value

    def _parse(self, pos: int) -> tuple[Any, int]:
        buf = self._buf
        end = buf.find(b"\r\n", pos)
        if end < 0:
            raise _Incomplete
        kind, line, pos = buf[pos], bytes(buf[pos + 1 : end]), end + 2
        if kind == 36:  # $ bulk string
            size = int(line)
            if size < 0:
                return None, pos
            if len(buf) < pos + size + 2:
                raise _Incomplete
            return bytes(buf[pos : pos + size]), pos + size + 2
        if kind == 58:  # : integer
            return int(line), pos
        if kind == 42:  # * array
            count = int(line)
            if count < 0:
                return None, pos
            items = []
            for _ in range(count):
                item, pos = self._parse(pos)
                items.append(item)
            return items, pos
        if kind == 43:  # + status
            return line, pos
        if kind == 45:  # - error
            return _ReplyError(line.decode("utf-8", "replace")), pos
        raise RedisConnectionError(f"protocol error: unexpected reply type {chr(kind)!r}")


def _reader() -> Any:
    if HIREDIS:
        return hiredis.Reader(replyError=_ReplyError)
    return PyReader()  # pragma: no cover - see the parser test


def _data(value: Any) -> bytes:
    """The bytes Redis gets for one argument."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(value).encode()
    raise TypeError(f"cannot send {type(value).__name__} to Redis")


def _observed(future: asyncio.Future[Any]) -> None:
    """Mark ``future``'s error as retrieved, now or when it is set.

    For reply futures nobody will await any more: the replies after one that failed (a lost
    connection fails them all with the error already raised to the caller; after a failed
    ``AUTH`` the rest are its follow-ups), or those of a caller that left. Their errors were
    handled with the first one; unmarked, asyncio would log each as "Future exception was never
    retrieved" when it is collected."""
    if not future.done():
        future.add_done_callback(_observed)
    elif not future.cancelled():
        future.exception()


async def _replies(futures: Sequence[asyncio.Future[Any]]) -> list[Any]:
    """Await ``futures`` in order; if one fails (or the caller is cancelled), the others are
    :func:`_observed` before the error propagates."""
    try:
        return [await future for future in futures]
    except BaseException:
        for future in futures:
            _observed(future)
        raise


def _bulks(args: Sequence[Any]) -> bytes:
    """``args`` as RESP bulk strings (``$<len>``, the data, each line ended by CRLF). Bulk
    calls send thousands: the common types are tested first, and each argument's data is
    joined in once rather than copied into a part of its own."""
    parts: list[bytes] = []
    add = parts.append
    for value in args:
        kind = type(value)
        if kind is str:
            value = value.encode()
        elif kind is not bytes:
            value = _data(value)
        add(b"$%d" % len(value))
        add(value)
    add(b"")
    return b"\r\n".join(parts)


def pack(args: Sequence[Any]) -> bytes:
    """One command in RESP: ``*<n>`` then each argument as a bulk string."""
    return b"*%d\r\n%s" % (len(args), _bulks(args))


class _Conn(asyncio.Protocol):
    """One connection: requests go out in order, replies resolve their futures in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float | None) -> None:
        self._loop = loop
        self._timeout = timeout
        self._reader = _reader()
        self._pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._transport: asyncio.Transport | None = None
        self._writable: asyncio.Future[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self.lost: Exception | None = None
        self.serial = 0
        """Its place in the order the lane's connections were made (see :meth:`Lane._open`)."""
        self.client_id: int | None = None
        """The server's id of this connection (for ``CLIENT UNBLOCK``), on blocking ones."""
        self.unblocking: asyncio.Future[Any] | None = None
        """A ``CLIENT UNBLOCK`` sent for this connection whose reply has not been seen."""

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if self._timeout is not None:
            self._watchdog = self._loop.call_later(1.0, self._watch)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        pending = self._pending
        reader.feed(data)
        while True:
            try:
                reply = reader.gets()
            except Exception as exc:  # hiredis.ProtocolError: the stream is unusable
                self._abort(RedisConnectionError(f"protocol error from Redis: {exc}"))
                return
            if reply is False:
                return
            if not pending:  # pragma: no cover - a reply nobody asked for
                self._abort(RedisConnectionError("unexpected reply from Redis"))
                return
            future, _ = pending.popleft()
            if not future.done():  # a cancelled caller's reply is dropped, order is kept
                if isinstance(reply, _ReplyError):
                    future.set_exception(_error(reply))
                else:
                    future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost is None:
            reason = f": {exc.strerror or exc}" if isinstance(exc, OSError) else ""
            self.lost = RedisConnectionError(f"connection to Redis lost{reason}")
        if self._watchdog is not None:
            self._watchdog.cancel()
        while self._pending:
            future, _ = self._pending.popleft()
            if not future.done():
                future.set_exception(self.lost)
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # --- requests ---

    def _watch(self) -> None:
        if self._pending and self._pending[0][1] < time.monotonic():
            self._abort(RedisTimeoutError("Redis did not answer in time"))
            return
        self._watchdog = self._loop.call_later(1.0, self._watch)

    def _abort(self, exc: Exception) -> None:
        self.lost = exc
        if self._transport is not None:
            self._transport.abort()  # connection_lost fails what is pending

    def close(self) -> None:
        if self._transport is not None and self.lost is None:
            self.lost = RedisConnectionError("connection closed")
            self._transport.close()

    @property
    def idle(self) -> bool:
        return not self._pending and self.lost is None

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self._transport is not None and self.lost is None:
            data = b"".join(self._out)
            self._out.clear()
            self._transport.write(data)

    def send(self, packed: bytes, count: int = 1, block: float = 0.0) -> list[asyncio.Future[Any]]:
        """Queue ``count`` commands already packed into ``packed``; their reply futures."""
        if self.lost is not None:
            raise self.lost
        deadline = (
            float("inf") if self._timeout is None else time.monotonic() + block + self._timeout
        )
        futures = [self._loop.create_future() for _ in range(count)]
        self._pending.extend((f, deadline) for f in futures)
        self._write(packed)
        return futures

    def send_one(self, packed: bytes) -> asyncio.Future[Any]:
        """:meth:`send` of one command."""
        if self.lost is not None:
            raise self.lost
        deadline = float("inf") if self._timeout is None else time.monotonic() + self._timeout
        future = self._loop.create_future()
        self._pending.append((future, deadline))
        self._write(packed)
        return future

    def _write(self, packed: bytes) -> None:
        """Send ``packed``: at once when it is the first request of this turn of the loop
        (none waits to be coalesced with it: an idle caller's request is on the wire a turn
        sooner); the turn's later ones are joined and leave together at its end."""
        if self._flush_scheduled or self._transport is None:
            self._out.append(packed)
        else:
            self._transport.write(packed)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    @property
    def paused(self) -> bool:
        """Whether the transport asked us to stop writing for now."""
        return self._writable is not None

    async def drained(self) -> None:
        """Wait until the transport takes writes again. The future is every waiter's: each
        waits through a shield, so a cancelled caller cancels only its own wait."""
        if self._writable is not None:
            await asyncio.shield(self._writable)


class Lane:
    """Pipelined access to one Redis server for one component (see the module docstring)."""

    def __init__(
        self,
        target: RedisTarget,
        *,
        password: str | None,
        username: str | None,
        db: int,
        options: dict[str, Any],
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.target = target
        self._tls = tls
        self._password = password
        self._username = username
        self._db = db
        self._connect_timeout = float(options.get("redis_connect_timeout", 5.0))
        socket_timeout = options.get("redis_socket_timeout", 30.0)
        self._timeout = None if socket_timeout is None else float(socket_timeout)
        self._retries = int(options.get("redis_retries", 8))
        self._retry_cap = float(options.get("redis_retry_cap", 1.0))
        self._main: _Conn | None = None
        self._opening: asyncio.Future[_Conn] | None = None
        self._idle: list[_Conn] = []
        self._heads: dict[tuple[str, int], bytes] = {}
        self._tails: dict[tuple[str, ...], bytes] = {}
        self._closed = False
        self._made = 0  # connections made so far (each one's serial)
        self._unblock_refused = False  # CLIENT UNBLOCK got an error reply (ACL: no @admin)
        self.watch: KeyWatch | None = None
        """Its :class:`~qtasks_redis.watch.KeyWatch`, once a wait needed it."""

    async def _open(self, *, blocking: bool = False, conn_class: type[_Conn] = _Conn) -> _Conn:
        if self._closed:
            raise RedisConnectionError("the lane is closed")
        loop = asyncio.get_running_loop()
        conn = conn_class(loop, self._timeout)
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self.target.socket is not None:
                    await loop.create_unix_connection(lambda: conn, self.target.socket)
                else:
                    port = self.target.port or 6379
                    await loop.create_connection(
                        lambda: conn, self.target.host, port, ssl=self._tls
                    )
                # Numbered once connected: a connection made after another one reached the
                # server the address named at that later time (see :meth:`_send_unblock`).
                self._made += 1
                conn.serial = self._made
                await self._handshake(conn, blocking=blocking)
        except TimeoutError:
            conn.close()
            raise RedisTimeoutError("timed out connecting to Redis") from None
        except OSError as exc:
            conn.close()
            raise RedisConnectionError(f"cannot connect to Redis: {exc.strerror or exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    async def _handshake(self, conn: _Conn, *, blocking: bool) -> None:
        """One round trip on a new connection before any caller's command is written on it:
        ``AUTH`` and ``SELECT`` as the URL asks, else ``PING``; ``CLIENT ID`` on a blocking
        connection. Without it a server that accepted and never answered (stalled, or full:
        it writes ``-ERR max number of clients reached`` and closes) would get the caller's
        command in its backlog, each retry another copy, or the caller would take that reply
        for its own.

        An error reply to ``AUTH``, or a ``NOPERM``, is raised as it is (the credentials);
        any other one is a ``ConnectionError`` (an outage: retried, ridden out). An error
        reply to ``CLIENT ID`` (an ACL without it) leaves the connection without an id, and
        ``CLIENT ID`` is not asked again: blocks end by their own timeout (see
        :meth:`_refuse_unblock`)."""
        setup: list[list[Any]] = []
        if self._password is not None:
            auth: list[Any] = ["AUTH", self._password]
            if self._username:
                auth.insert(1, self._username)
            setup.append(auth)
        if self._db:
            setup.append(["SELECT", self._db])
        if not setup:
            setup.append(["PING"])
        asks_id = blocking and not self._unblock_refused
        if asks_id:
            setup.append(["CLIENT", "ID"])
        futures = conn.send(b"".join(pack(cmd) for cmd in setup), len(setup))
        first = futures[:-1] if asks_id else futures
        try:
            await _replies(first)
        except ResponseError as exc:
            if isinstance(exc, NoPermissionError) or (
                self._password is not None and first[0].done() and first[0].exception() is exc
            ):
                raise
            raise RedisConnectionError(f"Redis refused the connection: {exc}") from None
        finally:
            if len(futures) > len(first):
                _observed(futures[-1])
        if asks_id:
            try:
                conn.client_id = int(await futures[-1])
            except ResponseError as exc:  # an ACL without CLIENT ID: no UNBLOCK for it
                self._refuse_unblock("CLIENT ID", exc)

    async def _connection(self) -> _Conn:
        conn = self._main
        if conn is not None and conn.lost is None:
            return conn
        # One opener at a time; concurrent callers wait for the same connection.
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
            # Its callers take its error through a shield each; if all of them were cancelled
            # first, nobody is left to (and nobody needs to) see it.
            _observed(self._opening)
        opening = self._opening
        try:
            conn = await asyncio.shield(opening)
        finally:
            if opening.done():
                self._opening = None
        if self._closed:  # closed while it was opening: nobody would close it
            conn.close()
            raise RedisConnectionError("the lane is closed")
        self._main = conn
        return conn

    async def _retrying(self, packed: bytes, count: int) -> list[Any]:
        failures = 0
        while True:
            try:
                conn = await self._connection()
                futures = conn.send(packed, count)
                try:
                    await conn.drained()
                except BaseException:
                    for future in futures:
                        _observed(future)
                    raise
                return await _replies(futures)
            except (RedisConnectionError, RedisTimeoutError):
                failures += 1
                if not self.retries_left(failures):
                    raise
                await asyncio.sleep(self.backoff(failures))

    def retries_left(self, failures: int) -> bool:
        """Whether a call that failed ``failures`` times in a row on a lost connection is
        tried again (``redis_retries``, as redis-py's clients retry; never once closed)."""
        return failures <= self._retries and not self._closed

    def backoff(self, failures: int) -> float:
        """Seconds to wait before the next try: jittered, doubling, capped by
        ``redis_retry_cap``."""
        return random.uniform(0, min(self._retry_cap, 0.05 * 2**failures))

    async def _one(self, packed: bytes) -> Any:
        conn = self._main
        if conn is None or conn.lost is not None or conn.paused:
            return (await self._retrying(packed, 1))[0]
        # The common case in one frame: connected and writable.
        try:
            return await conn.send_one(packed)
        except (RedisConnectionError, RedisTimeoutError):
            if self._closed:
                raise
            return (await self._retrying(packed, 1))[0]

    async def command(self, *args: Any) -> Any:
        """Run one command on the shared connection."""
        return await self._one(pack(args))

    async def script(
        self, script: Script, keys: Sequence[str], args: Sequence[Any], *, dynamic: int = 0
    ) -> Any:
        """``EVALSHA`` (``EVAL`` when the server lacks the script) with ``keys`` and ``args``.

        ``keys[dynamic:]`` repeat from call to call (a queue's keys, a storage's indexes):
        they are packed once and kept; only the first ``dynamic`` keys and the arguments are
        packed per call."""
        try:
            return await self._one(self._evalsha(script, keys, args, dynamic))
        except NoScriptError:
            return await self.command("EVAL", script.code, len(keys), *keys, *args)

    def packed(
        self, script: Script, keys: Sequence[str], args: Sequence[Any], *, dynamic: int = 0
    ) -> Callable[[], Awaitable[Any]]:
        """:meth:`script` packed now, sent when the function returned is awaited: a caller
        packs a large call while it waits for its turn to send it (see
        :meth:`qtasks_redis.RedisBroker.publish_new_many`)."""
        packed = self._evalsha(script, keys, args, dynamic)

        async def send() -> Any:
            try:
                return await self._one(packed)
            except NoScriptError:
                return await self.command("EVAL", script.code, len(keys), *keys, *args)

        return send

    def _evalsha(
        self, script: Script, keys: Sequence[str], args: Sequence[Any], dynamic: int
    ) -> bytes:
        """``EVALSHA`` of ``script`` packed, the parts that repeat taken from a cache (see
        :meth:`script`)."""
        nkeys = len(keys)
        head = self._heads.get((script.sha, nkeys))
        if head is None:
            head = _bulks(("EVALSHA", script.sha, nkeys))
            if len(self._heads) < 256:
                self._heads[(script.sha, nkeys)] = head
        fixed = tuple(keys[dynamic:])
        tail = self._tails.get(fixed)
        if tail is None:
            tail = _bulks(fixed)
            if len(self._tails) < 64:
                self._tails[fixed] = tail
        return b"*%d\r\n%s%s%s%s" % (
            3 + nkeys + len(args),
            head,
            _bulks(keys[:dynamic]),
            tail,
            _bulks(args),
        )

    async def blocking(self, block: float, *commands: Sequence[Any]) -> list[Any]:
        """Run ``commands`` in order on a connection of their own (the first may block up to
        ``block`` seconds); return their replies. Raises the first error reply. Not retried
        here: a caller with a deadline retries it (:meth:`retries_left`, :meth:`backoff`)
        with what is left of its time."""
        packed = b"".join(pack(cmd) for cmd in commands)
        conn = await self._blocking_conn()
        done = False
        try:
            futures = conn.send(packed, len(commands), block)
            replies = await _replies(futures)
            done = True
            return replies
        finally:
            # A connection is reused only when every reply came back; otherwise (cancelled
            # while blocked, lost) a late reply could reach the next user: drop it.
            if done and conn.idle and len(self._idle) < _IDLE_BLOCKING and not self._closed:
                self._idle.append(conn)
            else:
                conn.close()

    async def _blocking_conn(self) -> _Conn:
        main = self._main
        while self._idle:
            conn = self._idle.pop()
            if conn.lost is None and (main is None or main.serial < conn.serial):
                return conn
            # Lost, or older than the main connection (which was made again): no CLIENT
            # UNBLOCK would be sent for it (:meth:`_send_unblock`).
            conn.close()
        # The main connection first (if it is not up): CLIENT UNBLOCK goes only through one
        # made before the blocking connection.
        await self._connection()
        return await self._open(blocking=True)

    async def block_then_script(
        self,
        block: float,
        blocking: Sequence[Any],
        script: Script,
        keys: Sequence[str],
        args: Sequence[Any],
        orphan: Callable[[Any], object],
        *,
        exact: bool = True,
    ) -> Any:
        """Run the blocking command ``blocking`` then ``script`` right after it, in one round
        trip on a connection of their own; return the script's reply.

        With ``exact``, the block ends on time: Redis ends a blocking command's timeout only
        at its next ``hz`` tick (every 100 ms by default), so a loop timer ends it at ``block``
        with ``CLIENT UNBLOCK`` (the command's own timeout stays, a safety net). Pass
        ``exact=False`` for a bound that is not due at a moment (a safety wake): no timer
        then. The timer is not armed either once the server refused ``CLIENT UNBLOCK`` (an
        ACL without ``@admin``), which is logged once.

        A script that changes state must not have its reply lost: if the caller is cancelled
        while waiting, the blocking command is cut short (``CLIENT UNBLOCK``), the script's
        reply is still awaited (bounded, shielded) and handed to ``orphan``."""
        packed = pack(blocking) + self._evalsha(script, keys, args, 0)
        conn = await self._blocking_conn()
        first, second = conn.send(packed, 2, block)
        if exact and not self._unblock_refused:
            timer = asyncio.get_running_loop().call_later(block, self._unblock, conn, first)
            second.add_done_callback(lambda _: timer.cancel())
        # Every path below either awaits a reply or gives it up on purpose (the first's:
        # whatever it is, even an error, the script's comes after it; both, when the
        # connection is lost; a reply still pending as the caller leaves). A cancelled shield
        # no longer watches its future, so mark both as observed here rather than on each path.
        _observed(first)
        _observed(second)
        try:
            # Shielded: cancelling the caller must not cancel (and drop) the script's reply.
            reply = await asyncio.shield(second)
        except NoScriptError:
            self._keep(conn)
            with anyio.CancelScope(shield=True):
                return await self.script(script, keys, args)
        except BaseException:
            if second.done():
                # The reply came in the turn the caller was cancelled: hand it on all the same.
                if not second.cancelled() and second.exception() is None:
                    with contextlib.suppress(Exception):  # as below: its lease brings it back
                        orphan(second.result())
            elif conn.lost is None:
                with stopping.shield("a claim's reply", 2):
                    if not first.done():
                        self._send_unblock(conn)  # if not sent, the block ends by itself
                    try:
                        orphan(await second)
                    except Exception:  # lost anyway: its lease brings it back
                        pass
            conn.close()
            raise
        self._keep(conn)
        return reply

    def _unblock(self, conn: _Conn, blocked: asyncio.Future[Any]) -> None:
        """End ``conn``'s blocking command now, if it still blocks (the timer of
        :meth:`block_then_script`)."""
        if blocked.done() or conn.lost is not None:
            return
        conn.unblocking = self._send_unblock(conn)

    def _send_unblock(self, conn: _Conn) -> asyncio.Future[Any] | None:
        """Send ``CLIENT UNBLOCK`` for ``conn``'s blocking command; the future of its reply,
        or ``None`` when not sent (then the command's own timeout ends the block).

        Sent only on the main connection as it is, never on one opened for it nor retried,
        and only when that connection is older than ``conn``: client ids are numbered per
        server, and a connection made later (after a failover behind the same address) may
        reach another server, where ``conn``'s id is some other client's."""
        main = self._main
        if (
            self._unblock_refused
            or conn.client_id is None
            or main is None
            or main.lost is not None
            or main.serial > conn.serial
        ):
            return None
        sent = main.send_one(pack(("CLIENT", "UNBLOCK", conn.client_id)))
        sent.add_done_callback(self._unblock_answered)
        return sent

    def _unblock_answered(self, sent: asyncio.Future[Any]) -> None:
        # Retrieves the error of every UNBLOCK sent: a lost one is handled by ``_keep``.
        error = None if sent.cancelled() else sent.exception()
        if isinstance(error, ResponseError):
            self._refuse_unblock("CLIENT UNBLOCK", error)

    def _refuse_unblock(self, command: str, error: ResponseError) -> None:
        """The server refused ``command`` (``CLIENT UNBLOCK``, or ``CLIENT ID`` that it needs):
        it will every time, so blocks end at its hz tick from now on. Logged once."""
        if self._unblock_refused:
            return
        self._unblock_refused = True
        reason = "the server's ACL" if isinstance(error, NoPermissionError) else "the server"
        log.warning(
            "%s refused by %s: delayed messages may start up to 1/hz late (Redis at %s: %s)",
            command,
            reason,
            self.target.where,
            error,
        )

    def _keep(self, conn: _Conn) -> None:
        unblocking = conn.unblocking
        if unblocking is not None and not unblocking.done():
            # Not reused while our CLIENT UNBLOCK may still come: it would cut the next
            # block short. Its reply says the server has it.
            unblocking.add_done_callback(lambda _: self._keep(conn))
            return
        conn.unblocking = None
        if unblocking is not None and (
            unblocking.cancelled() or not isinstance(unblocking.exception(), ResponseError | None)
        ):
            # Lost or timed out: whether the server got it is unknown. (An error reply says
            # it got it and refused it: it will never unblock anything.)
            conn.close()
            return
        if conn.idle and len(self._idle) < _IDLE_BLOCKING and not self._closed:
            self._idle.append(conn)
        else:
            conn.close()

    async def check(self) -> None:
        """Connect now (and fail now on a bad address or password)."""
        await self._connection()

    def abandon(self) -> None:
        """Stop using the connections of an event loop that is gone, without calling into it
        (closing a transport schedules a callback on its loop)."""
        self._closed = True
        self._main, self._opening = None, None
        self._idle.clear()
        self.watch = None

    def close(self) -> None:
        self._closed = True
        if self.watch is not None:
            self.watch.close()
        if self._main is not None:
            self._main.close()
            self._main = None
        for conn in self._idle:
            conn.close()
        self._idle.clear()


def lane_for(target: RedisTarget, options: dict[str, Any]) -> Lane | None:
    """A lane for ``target``, or ``None`` when redis-py must serve it (Redis Cluster, URL
    options other than ``db`` and, for ``rediss://``, redis-py's ``ssl_*`` ones, or
    ``redis_fast_lane=False`` in the options)."""
    if target.cluster or not options.get("redis_fast_lane", True):
        return None
    parts = urlsplit(target.url)
    if parts.scheme not in ("redis", "unix", "rediss"):
        return None
    query = parse_qs(parts.query)
    tls = parts.scheme == "rediss"
    if {key for key in query if key != "db" and not (tls and key.startswith("ssl_"))}:
        return None
    context = tls_context(target.url) if tls else None
    if tls and context is None:
        return None
    db = target.db
    if "db" in query:
        try:
            db = int(query["db"][-1])
        except ValueError:
            return None
    return Lane(
        target,
        password=None if parts.password is None else unquote(parts.password),
        username=None if parts.username is None else unquote(parts.username),
        db=db,
        options=options,
        tls=context,
    )


def tls_context(url: str) -> ssl.SSLContext | None:
    """The TLS context redis-py makes of a ``rediss://`` URL and its ``ssl_*`` options
    (``ssl_ca_certs``, ``ssl_cert_reqs``, ``ssl_check_hostname``, a client certificate...),
    made by redis-py itself so that both paths check the server alike; ``None`` when redis-py
    cannot make one (it then raises its own error where it connects)."""
    from redis.asyncio.connection import SSLConnection, parse_url

    try:
        kwargs = parse_url(url)
        kwargs.pop("connection_class", None)
        context: ssl.SSLContext = SSLConnection(**kwargs).ssl_context.get()
    except Exception:
        return None
    return context
