"""Connecting to Redis: URL parsing, client construction, Lua scripts (what an error means,
and the error raised for it, are in :mod:`qtasks_redis.failures`).

Every component builds its client here, so they share one policy: bounded command retries with
jittered exponential backoff, errors re-raised as :mod:`qtasks.errors` with the host and port but
never the password, and scripts run by SHA with a fallback to ``EVAL`` (which also works on a
cluster node or a restarted server that has not cached the script yet).

Over ~500 lines: that one policy, and the range of every Redis option it reads (``RANGES``),
checked once where each component is built; the scripts' runner is in
:mod:`qtasks_redis.lane`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    NoScriptError,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from qtasks.errors import (
    BrokerConnectionError,
    ComponentNotStartedError,
    ConfigError,
    CredentialsRefusedError,
)
from qtasks.masking import mask_text, mask_url, masked_entry
from qtasks_redis.failures import answers_without_tls, connection_error, guarded
from qtasks_redis.lane import Lane, lane_for
from qtasks_redis.lua_unused import without_unused

log = logging.getLogger("qtasks.redis")

DEFAULT_URL = "redis://127.0.0.1:6379/0"
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

Client = aioredis.Redis | RedisCluster
T = TypeVar("T")

OPTIONS: dict[str, type] = {
    "redis_queue": str,
    "redis_prefix": str,
    "redis_cluster": bool,
    "redis_retries": int,
    "redis_retry_cap": float,
    "redis_socket_timeout": float,
    "redis_connect_timeout": float,
    "redis_health_check_interval": int,
    "redis_fast_lane": bool,
    "redis_wait_connections": int,
}
"""Every ``redis_*`` key the Redis components read from ``config.extra``, with its type."""

RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    # A socket timeout of 0 turns every call non-blocking (calls then hang past their own
    # timeouts); a connect timeout of 0 fails every connect as "cannot reach Redis".
    "redis_socket_timeout": (lambda v: math.isfinite(v) and v > 0, "a number of seconds above 0"),
    "redis_connect_timeout": (lambda v: math.isfinite(v) and v > 0, "a number of seconds above 0"),
    # redis-py's clients read -1 as "retry for ever", the fast lane as "never": neither is
    # what a typo meant.
    "redis_retries": (lambda v: v >= 0, "0 or more"),
    # Below 0, the backoff is no wait: lost connections are retried in a tight loop.
    "redis_retry_cap": (lambda v: math.isfinite(v) and v >= 0, "a number of seconds of 0 or more"),
    # 0 turns the check off; below 0, redis-py pings before every command.
    "redis_health_check_interval": (lambda v: v >= 0, "a number of seconds of 0 or more"),
    # An empty name makes keys such as {qtasks:}:ready, which nothing else would use.
    "redis_queue": (lambda v: v != "", "a non-empty queue name"),
    # 0 sends every wait through the shared watch; below 0 is no count of connections.
    "redis_wait_connections": (lambda v: v >= 0, "0 or more"),
}
"""The options whose value must also be in a range (the predicate), with what is allowed."""


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """Return ``options`` once every ``redis_*`` key in it is known and of the right type.

    Keys without the ``redis_`` prefix belong to other components or plugins and are left
    alone; an unknown ``redis_*`` key (a typo such as ``redis_socket_timout``) raises
    :class:`~qtasks.errors.ConfigError` listing the valid ones, rather than being ignored, and
    so does a value out of its range (:data:`RANGES`: a timeout not above 0, a negative retry
    count, retry cap, health-check interval or number of wait connections, an empty queue
    name)."""
    for key, value in options.items():
        if not key.startswith("redis_"):
            continue
        kind = OPTIONS.get(key)
        if kind is None:
            raise ConfigError(f"unknown option extra.{key} (known: {', '.join(sorted(OPTIONS))})")
        accepted = (int, float) if kind is float else (kind,)  # 5 is a fine float
        if not isinstance(value, accepted) or (isinstance(value, bool) and kind is not bool):
            shown = masked_entry(key, value)  # quoted: a misplaced URL keeps its password out
            raise ConfigError(f"extra.{key} expects {kind.__name__}, got {shown!r}")
        allowed = RANGES.get(key)
        if allowed is not None and not allowed[0](value):
            raise ConfigError(f"extra.{key} must be {allowed[1]}, got {value!r}")
    return options


@dataclass(slots=True, frozen=True)
class RedisTarget:
    """Where a URL points, safe to print: its ``repr`` shows no user name or password (the
    URL, which may hold them, is left out of it)."""

    url: str = field(repr=False)
    cluster: bool
    host: str
    port: int | None
    db: int
    socket: str | None

    @property
    def server(self) -> tuple[object, ...]:
        """Server, database, scheme, credentials and options: equal for two targets that one
        connection can serve (the password is compared, never shown)."""
        parts = urlsplit(self.url)
        return (
            parts.scheme,
            parts.username,
            parts.password,
            self.host,
            self.port,
            self.db,
            self.socket,
            parts.query,
            self.cluster,
        )

    @property
    def where(self) -> str:
        """``host:port`` (or the socket path), for messages."""
        if self.socket is not None:
            return f"unix socket {self.socket}"
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, url: str | None, *, cluster: bool = False) -> RedisTarget:
        """Split ``url``; ``redis+cluster://`` (or ``cluster=True``) selects Redis Cluster. A
        URL the client could not use (not a str, another scheme, a port that is no number or
        past 65535, a database that is no number, an option redis-py cannot read, a host it
        cannot split) raises :class:`~qtasks.errors.ConfigError` in one line, never holding
        the password: the components parse their URL in their constructor, so a bad one is a
        configuration error when they are built, as RabbitMQ's is."""
        url = given = url or DEFAULT_URL
        if not isinstance(url, str):
            raise ConfigError(f"the Redis URL must be a str, got {type(url).__name__}")
        try:
            parts = urlsplit(url)
        except ValueError as exc:  # an IPv6 host not closed, say (no URL in its text)
            raise ConfigError(f"bad Redis URL {mask_url(given)}: {mask_text(str(exc))}") from None
        scheme = parts.scheme
        if scheme in CLUSTER_SCHEMES:
            cluster = True
            url = CLUSTER_SCHEMES[scheme] + url[len(scheme) :]
            scheme = CLUSTER_SCHEMES[scheme]
        if scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(
                f"unsupported Redis URL scheme {scheme!r}: use redis://, rediss://, unix:// "
                "or redis+cluster://"
            )
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"bad port in Redis URL for host {parts.hostname!r}") from None
        try:  # redis-py's reading of the URL's options (?socket_timeout=...), as connect() will
            parse_url(url)
        except ValueError as exc:
            shown = f"{mask_url(given)}: {mask_text(str(exc))}"
            raise ConfigError(f"bad Redis URL {shown}") from None
        if scheme == "unix":
            return cls(url, False, "localhost", None, 0, parts.path)
        db = 0
        path = parts.path.strip("/")
        if path:
            if not path.isdigit():
                raise ConfigError(f"bad database number {path!r} in Redis URL")
            db = int(path)
        return cls(url, cluster, parts.hostname or "127.0.0.1", port or 6379, db, None)


def make_client(target: RedisTarget, extra: dict[str, Any]) -> Client:
    """A client with qtasks' retry policy; options in ``extra`` prefixed ``redis_`` tune it."""
    retry = Retry(
        ExponentialWithJitterBackoff(cap=float(extra.get("redis_retry_cap", 1.0)), base=0.05),
        int(extra.get("redis_retries", 8)),
    )
    options: dict[str, Any] = {
        "retry": retry,
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        "socket_timeout": float(extra.get("redis_socket_timeout", 30.0)),
        "socket_connect_timeout": float(extra.get("redis_connect_timeout", 5.0)),
        "health_check_interval": int(extra.get("redis_health_check_interval", 15)),
        "decode_responses": False,
    }
    if target.cluster:
        options.pop("retry_on_error")
        options.pop("health_check_interval")
        return RedisCluster.from_url(target.url, **options)
    return aioredis.Redis.from_url(target.url, **options)


async def connect(stack: AsyncExitStack, target: RedisTarget, extra: dict[str, Any]) -> Client:
    """Open a client, check it with PING, and close it when ``stack`` unwinds."""
    client = make_client(target, extra)
    stack.push_async_callback(_close, client)
    try:
        if not target.cluster:
            await _probe(target, extra)
        await _ping(client)
    except BrokerConnectionError:
        raise  # ours already: _probe found a server that answers without TLS
    except (RedisError, OSError) as exc:
        raise connection_error(target, exc) from None
    if not target.cluster:
        await _check_eviction(client, target)
    return client


_EVICTION_WARNED: set[tuple[str, str]] = set()


async def _check_eviction(client: Client, target: RedisTarget) -> None:
    """Warn when the server evicts keys once full (a ``maxmemory-policy`` other than
    ``noeviction``): it would drop queued messages and records without a word. With
    ``noeviction`` a full server refuses writes instead (:class:`ServerFullError`). A server
    that does not let ``CONFIG GET`` be called (managed Redis, ACLs) is not checked."""
    try:
        reply = await client.config_get("maxmemory-policy")
    except (RedisError, OSError):
        return
    value = reply.get("maxmemory-policy", "noeviction")
    policy = value.decode() if isinstance(value, bytes) else str(value)
    if policy != "noeviction" and (target.where, policy) not in _EVICTION_WARNED:
        _EVICTION_WARNED.add((target.where, policy))  # once per server, not per component
        log.warning(
            "Redis at %s has maxmemory-policy %s: once full it evicts keys, and queued tasks, "
            "records and results are lost without an error; set maxmemory-policy noeviction "
            "(a full server then refuses writes, and qtasks says so)",
            target.where,
            policy,
        )


async def _probe(target: RedisTarget, extra: dict[str, Any]) -> None:
    """One PING on a connection of its own, not retried: an unreachable URL or refused
    credentials fail at once (the client's retry budget, meant for outages while serving,
    took 4-40 s to give up on them). A server still loading its dataset (``LOADING``) is
    asked again for up to ``redis_connect_timeout`` seconds."""
    timeout = float(extra.get("redis_connect_timeout", 5.0))
    probe = aioredis.Redis.from_url(
        target.url,
        retry=Retry(NoBackoff(), 0),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                await probe.ping()
                return
            except BusyLoadingError:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(min(0.1, max(deadline - time.monotonic(), 0)))
    except RedisTimeoutError:
        # A Redis without TLS takes the TLS handshake for a command and never answers it:
        # the connect times out as for a server that is down. A URL to fix, not an outage.
        if urlsplit(target.url).scheme == "rediss" and await answers_without_tls(target):
            raise CredentialsRefusedError(
                f"Redis at {target.where} (db {target.db}) answers without TLS, and the URL "
                "says rediss://: use redis://, or turn TLS on at the server"
            ) from None
        raise
    finally:
        await _close(probe)


async def _ping(client: Client) -> None:
    if isinstance(client, RedisCluster):
        await client.initialize()
    await client.ping()


async def _close(client: Client) -> None:
    try:
        await client.aclose()
    except (RedisError, OSError):  # pragma: no cover - closing a dead connection
        pass


def glob_escape(text: str) -> str:
    """``text`` matched literally in a SCAN ``MATCH`` pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


async def delete_matching(target: RedisTarget, client: Any, pattern: str) -> int:
    """UNLINK every key matching ``pattern`` (SCAN, on every node of a cluster); return how
    many. Used by ``flush`` (``app.flush_all``), never on a hot path."""

    async def run() -> int:
        count = 0
        batch: list[Any] = []
        async for key in client.scan_iter(match=pattern, count=500):
            batch.append(key)
            if len(batch) >= 500:
                count += sum([await client.unlink(k) for k in batch])
                batch = []
        if batch:
            count += sum([await client.unlink(k) for k in batch])
        return count

    return await guarded(target, run())


class Script:
    """A Lua script run with EVALSHA, loaded by EVAL when the server does not know it.

    ``source`` is the script as composed (other scripts are built from it); ``code``, what
    the server runs: ``source`` without the functions it never calls (see
    :mod:`~qtasks_redis.lua_unused`)."""

    __slots__ = ("code", "sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.code = without_unused(source)
        self.sha = hashlib.sha1(self.code.encode()).hexdigest()

    async def __call__(
        self, client: Client | Lane, keys: Sequence[str], args: Sequence[Any], dynamic: int = 0
    ) -> Any:
        """Run with ``keys`` and ``args``; ``keys[:dynamic]`` change from call to call (see
        :meth:`Lane.script`)."""
        if isinstance(client, Lane):
            return await client.script(self, keys, args, dynamic=dynamic)
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(self.code, len(keys), *keys, *args)

    def packed(
        self, client: Client | Lane, keys: Sequence[str], args: Sequence[Any], dynamic: int = 0
    ) -> Callable[[], Awaitable[Any]]:
        """This call, run when the function returned is awaited; on a lane it is packed now
        (see :meth:`Lane.packed`)."""
        if isinstance(client, Lane):
            return client.packed(self, keys, args, dynamic=dynamic)
        return functools.partial(self, client, keys, args, dynamic)


_INHERITED: list[object] = []
"""A forked child's connections of its parent (see :meth:`SharedClient._forget_stopped_loops`)."""


@dataclass(slots=True, eq=False)
class _Session:
    """The connections of a :class:`SharedClient` in one event loop, and how many stacks
    that started it there have not unwound yet; ``pid``: the process that opened them."""

    client: Client
    lane: Lane | None
    stack: AsyncExitStack
    users: int = 0
    pid: int = field(default_factory=os.getpid)


class SharedClient:
    """The client of one component, reference-counted across ``start`` calls.

    Several apps in one process may share a component; it connects on the first ``start`` and
    disconnects when the last stack that started it unwinds. Connections belong to the event
    loop they were opened in, so each running loop the component is started in gets its own,
    counted apart: two sync apps (each serving in its portal's loop) or an async app and a
    sync app share it side by side. A loop no longer running (closed without closing its
    connections) is forgotten at the next start, without touching it.
    """

    __slots__ = ("_connecting", "_owner", "_sessions", "_wants_lane", "target")

    def __init__(self, target: RedisTarget, owner: str, *, lane: bool = True) -> None:
        self.target = target
        self._owner = owner
        self._wants_lane = lane
        self._sessions: dict[asyncio.AbstractEventLoop, _Session] = {}
        self._connecting: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}

    async def acquire(self, stack: AsyncExitStack, options: dict[str, Any]) -> Client:
        check_options(options)
        loop = asyncio.get_running_loop()
        self._forget_stopped_loops()
        lock = self._connecting.get(loop)
        if lock is None:
            lock = self._connecting[loop] = asyncio.Lock()
        # Apps sharing this component that start at once in one loop connect once: the
        # others wait.
        async with lock:
            session = self._sessions.get(loop)
            if session is None:
                session = await self._connect(options)
                self._sessions[loop] = session
            session.users += 1
        stack.push_async_callback(self._release, session)
        return session.client

    async def _connect(self, options: dict[str, Any]) -> _Session:
        inner = AsyncExitStack()
        try:
            client = await connect(inner, self.target, options)
            lane = lane_for(self.target, options) if self._wants_lane else None
            if lane is not None:
                inner.callback(lane.close)
                try:
                    await lane.check()
                except (RedisError, OSError) as exc:
                    raise connection_error(self.target, exc) from None
        except BaseException:
            await inner.aclose()
            raise
        return _Session(client, lane, inner)

    def _forget_stopped_loops(self) -> None:
        """Forget the connections of loops no longer running, without touching them (nothing
        runs there any more; their sockets go with them). Their stacks' releases become
        no-ops. A loop running in another thread keeps its connections."""
        for loop in [loop for loop in list(self._sessions) if not loop.is_running()]:
            session = self._sessions.pop(loop, None)
            if session is not None and session.pid != os.getpid():
                # A forked child's copy of its parent's: finalized here, a connection would
                # close its transport, taking the socket out of the epoll the two processes
                # share, and the parent would wait on it for ever. Kept, unused.
                _INHERITED.append(session)
            elif session is not None and session.lane is not None:
                session.lane.abandon()
        for loop in [loop for loop in list(self._connecting) if loop.is_closed()]:
            self._connecting.pop(loop, None)

    async def _release(self, session: _Session) -> None:
        loop = asyncio.get_running_loop()
        if self._sessions.get(loop) is not session:
            return  # a stack of a loop already forgotten (see _forget_stopped_loops)
        session.users -= 1
        if session.users == 0:
            del self._sessions[loop]
            await session.stack.aclose()

    def _session(self) -> _Session | None:
        try:
            return self._sessions.get(asyncio.get_running_loop())
        except RuntimeError:  # no loop running in this thread
            return None

    def get(self) -> Client:
        """The redis-py client of the running event loop."""
        session = self._session()
        if session is None:
            raise ComponentNotStartedError(
                f"{self._owner} used before start() in this event loop or after stop"
            )
        return session.client

    def fast(self) -> Client | Lane:
        """The lane of the running event loop when the target has one (the hot path), else
        its redis-py client."""
        session = self._session()
        if session is not None and session.lane is not None:
            return session.lane
        return self.get()

    @property
    def lane(self) -> Lane | None:
        """The lane of the running event loop, or ``None`` (TLS, cluster, or not started)."""
        session = self._session()
        return None if session is None else session.lane


def common_options(extra: dict[str, Any]) -> dict[str, Any]:
    """The constructor keywords every Redis component reads from ``config.extra``:
    ``prefix`` (``redis_prefix``), ``cluster`` (``redis_cluster``) and the client options.
    Raises :class:`~qtasks.errors.ConfigError` for an unknown or ill-typed ``redis_*`` key."""
    check_options(extra)
    return {
        "prefix": str(extra.get("redis_prefix", "qtasks")),
        "cluster": bool(extra.get("redis_cluster", False)),
        "options": extra,
    }
