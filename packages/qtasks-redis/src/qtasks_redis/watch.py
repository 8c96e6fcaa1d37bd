"""Waiting for any number of keys to change over two connections: :class:`KeyWatch`.

A wait for a task's result blocks on the record's wake-up list (``BLMOVE``), one connection
per wait: 2,000 results awaited at once opened 2,000 connections. Past a few such waits
(``redis_wait_connections``), :meth:`RedisStorage.wait <qtasks_redis.RedisStorage.wait>`
waits here instead, on Redis's server-assisted client-side caching (``CLIENT TRACKING``,
Redis 6 and later): one connection reads each wake-up key with tracking on (``OPTIN``: only
the key read right after ``CLIENT CACHING YES`` is tracked), and Redis tells another one,
subscribed to ``__redis__:invalidate`` (``REDIRECT``), when a key read that way changes. A
wait reads its key and the record in one round trip: a record that turns final after that
read pushes its wake-up, which Redis reports; one that turned final before it is read final.

Nothing is lost when a connection is: every wait is woken to read its record again (which
tracks its key again on the new connections), as it is on a flush (an invalidation of every
key). A server that refuses ``CLIENT ID`` or ``CLIENT TRACKING`` (an ACL, an old Redis)
leaves the watch :attr:`~KeyWatch.unavailable`: waits then block as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from qtasks_redis.lane import _Conn, _error, _replies, _ReplyError, pack

if TYPE_CHECKING:
    from qtasks_redis.lane import Lane

log = logging.getLogger("qtasks.redis")

CHANNEL = b"__redis__:invalidate"


class _Feed(_Conn):
    """A connection whose loss is told to ``on_lost``; with ``on_push`` set, its pub/sub
    messages (replies to no command) go there."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float | None) -> None:
        super().__init__(loop, timeout)
        self.on_push: Callable[[Any], None] | None = None
        self.on_lost: Callable[[], None] = _nothing

    def data_received(self, data: bytes) -> None:
        on_push = self.on_push
        if on_push is None:
            super().data_received(data)
            return
        reader = self._reader
        reader.feed(data)
        while True:
            try:
                reply = reader.gets()
            except Exception as exc:  # hiredis.ProtocolError: the stream is unusable
                self._abort(RedisConnectionError(f"protocol error from Redis: {exc}"))
                return
            if reply is False:
                return
            if type(reply) is list and reply and reply[0] == b"message":
                on_push(reply)
            elif not self._pending:  # pragma: no cover - a reply nobody asked for
                self._abort(RedisConnectionError("unexpected reply from Redis"))
                return
            else:
                future, _ = self._pending.popleft()
                if not future.done():
                    if isinstance(reply, _ReplyError):
                        future.set_exception(_error(reply))
                    else:
                        future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.on_lost()


def _nothing() -> None:
    pass


class KeyWatch:
    """Waits for keys to change, as many as needed, over two connections of one lane (see
    the module docstring). One per lane: :func:`key_watch`."""

    def __init__(self, lane: Lane) -> None:
        self._lane = lane
        self._waiters: dict[bytes, set[asyncio.Event]] = {}
        self._feed: _Feed | None = None
        self._reads: _Feed | None = None
        self._opening: asyncio.Lock | None = None
        self.blocking = 0
        """Waits blocking on connections of their own now (counted by their callers)."""
        self.unavailable: Exception | None = None
        """Why the server cannot be watched this way (a refused ``CLIENT ID`` or ``CLIENT
        TRACKING``), once known; ``None`` while it can."""

    async def read(
        self, key: str, commands: Sequence[Sequence[Any]]
    ) -> tuple[asyncio.Event, list[Any]]:
        """Watch ``key`` from now, and run ``commands`` right after reading it, in one round
        trip: their replies, and an event set once ``key`` changes (or the watch can no
        longer tell: a lost connection, a flush). The caller :meth:`forget` s the event."""
        name = key.encode()
        event = asyncio.Event()
        self._waiters.setdefault(name, set()).add(event)
        try:
            reads = await self._connections()
            packed = pack(("CLIENT", "CACHING", "YES")) + pack(("EXISTS", name))
            packed += b"".join(pack(command) for command in commands)
            replies = await _replies(reads.send(packed, 2 + len(commands)))
        except BaseException:
            self.forget(key, event)
            raise
        return event, replies[2:]

    def forget(self, key: str, event: asyncio.Event) -> None:
        """Stop telling ``event`` of ``key``'s changes."""
        name = key.encode()
        events = self._waiters.get(name)
        if events is not None:
            events.discard(event)
            if not events:
                del self._waiters[name]

    @property
    def watched(self) -> int:
        """Keys watched now."""
        return len(self._waiters)

    async def _connections(self) -> _Feed:
        reads = self._reads
        if reads is not None and reads.lost is None:
            return reads
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            reads = self._reads
            if reads is not None and reads.lost is None:
                return reads
            if self.unavailable is not None:  # found out while this call waited its turn
                raise ResponseError(str(self.unavailable))
            self._drop()
            feed = cast(_Feed, await self._lane._open(blocking=True, conn_class=_Feed))
            try:
                if feed.client_id is None:
                    raise ResponseError("CLIENT ID refused")
                feed.on_push = self._pushed
                await feed.send_one(pack(("SUBSCRIBE", CHANNEL)))
                reads = cast(_Feed, await self._lane._open(conn_class=_Feed))
                try:
                    tracking = ("CLIENT", "TRACKING", "ON", "REDIRECT", feed.client_id, "OPTIN")
                    await reads.send_one(pack(tracking))
                except BaseException:
                    reads.close()
                    raise
            except ResponseError as exc:
                feed.close()
                self.unavailable = ResponseError(str(exc))
                log.warning(
                    "Redis at %s does not let this process track keys (%s): each result "
                    "awaited holds a connection of its own while it waits",
                    self._lane.target.where,
                    exc,
                )
                raise
            except BaseException:
                feed.close()
                raise
            # Set last: a loss before both are up wakes nobody (nobody reads through them).
            feed.on_lost = reads.on_lost = self._lost
            self._feed, self._reads = feed, reads
            return reads

    def _pushed(self, reply: Any) -> None:
        """A message on the feed: the keys that changed (``None``: all of them, a flush)."""
        if type(reply) is not list or len(reply) != 3 or reply[0] != b"message":
            return  # a reply to SUBSCRIBE comes as the reply to its command
        keys = reply[2]
        if keys is None:
            self._wake_all()
            return
        for name in keys:
            events = self._waiters.pop(name, None)
            if events is not None:
                for event in events:
                    event.set()

    def _lost(self) -> None:
        """A connection of the watch was lost: what the server tracked for it is gone, so
        every wait reads its record again (on new connections)."""
        self._drop()
        self._wake_all()

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, {}
        for events in waiters.values():
            for event in events:
                event.set()

    def _drop(self) -> None:
        feed, reads, self._feed, self._reads = self._feed, self._reads, None, None
        for conn in (feed, reads):
            if conn is not None:
                conn.on_lost = _nothing
                conn.close()

    def close(self) -> None:
        """Close its connections; the waits still waiting are woken."""
        self._drop()
        self._wake_all()


def key_watch(lane: Lane) -> KeyWatch:
    """The :class:`KeyWatch` of ``lane``, made on first use."""
    watch = lane.watch
    if watch is None:
        watch = lane.watch = KeyWatch(lane)
    return watch
