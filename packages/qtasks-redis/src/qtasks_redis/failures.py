"""What a Redis error means to qtasks: an outage to ride out (:func:`outage`), refused
credentials or a TLS connection that fails its checks (:func:`tls_refused`,
:func:`answers_without_tls`), or a refusal of the call itself; and the error a component
raises for it (:func:`connection_error`, :func:`guarded`), naming the server but never the
password."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TYPE_CHECKING, TypeVar

from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    ClusterDownError,
    InvalidResponse,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from qtasks.errors import (
    BrokerConnectionError,
    CredentialsRefusedError,
    ServerFullError,
    StorageConnectionError,
    StorageCredentialsRefusedError,
    StorageFullError,
)
from qtasks.outage import tls_refused

__all__ = ["tls_refused"]  # qtasks.outage's, used here: importable from here as before

if TYPE_CHECKING:
    from qtasks_redis.connection import RedisTarget

T = TypeVar("T")

_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError, OutOfMemoryError)
_FOR_NOW = (ReadOnlyError, ClusterDownError, TryAgainError)
"""Error replies of a server that cannot take the call for now, whatever the call: a replica
after a failover (``READONLY``; ``MASTERDOWN`` is a ClusterDownError), a cluster resharding."""
_OUTAGES = _UNREACHABLE + _FOR_NOW
_FOR_NOW_CODES = ("BUSY ", "MISCONF ", "NOREPLICAS ", "MASTERDOWN ", "TRYAGAIN ", "CLUSTERDOWN ")
"""The same for replies redis-py has no class for (or the lane leaves a plain ResponseError):
a script running past ``busy-reply-threshold``, a failing snapshot that stops writes, too few
replicas for ``min-replicas-to-write``."""


def outage(exc: BaseException) -> bool:
    """Whether ``exc`` means the server cannot be reached or cannot take calls for now (the
    call wrote nothing; the same call succeeds later), as opposed to refusing the call
    itself (a value over ``proto-max-bulk-len``, a script error): an outage is ridden out
    and retried, a refusal fails its call."""
    if isinstance(exc, _OUTAGES):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(_FOR_NOW_CODES)


def connection_error(
    target: RedisTarget,
    exc: BaseException,
    kind: type[BrokerConnectionError] = BrokerConnectionError,
) -> BrokerConnectionError:
    """A :class:`BrokerConnectionError` naming where, with the cause's class and errno only.

    redis-py's messages do not contain passwords, but the cause may quote a URL in some
    versions, so only the error class (and OS errno text) is kept.
    """
    reason = type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError) and cause.strerror:
        reason = f"{reason}: {cause.strerror}"
    elif isinstance(exc, RedisError):
        text = str(exc).strip(". ")
        if "@" in text or "://" in text:  # may quote a URL: its last sentence only
            text = text.split(". ")[-1].strip(". ")
        if text and "@" not in text and "://" not in text:
            reason = f"{reason}: {text}"
    db = "" if target.socket else f" (db {target.db})"
    if isinstance(exc, OutOfMemoryError):
        full = StorageFullError if issubclass(kind, StorageConnectionError) else ServerFullError
        return full(
            f"Redis at {target.where}{db} is out of memory (maxmemory reached, noeviction): "
            "it refused this call, which wrote nothing; free memory or raise maxmemory"
        )
    refused = (
        StorageCredentialsRefusedError
        if issubclass(kind, StorageConnectionError)
        else CredentialsRefusedError
    )
    if refused_credentials(exc):
        return refused(
            f"Redis at {target.where}{db} refused the credentials (check the user name and "
            f"password of the URL): {reason}"
        )
    if isinstance(exc, ResponseError):
        if outage(exc):  # LOADING, BUSY...: the same call succeeds later
            return kind(f"Redis at {target.where}{db} cannot take calls for now: {reason}")
        # Any other error reply while the connection is set up (a database number past the
        # server's, a refused option): the server answered and no retry mends it, so a
        # worker waiting for its servers at start does not wait on it (qtasks.waiting).
        return refused(
            f"Redis at {target.where}{db} refused the connection's settings (check the URL's "
            f"database and options): {reason}"
        )
    if isinstance(exc, InvalidResponse):
        # Bytes that are not Redis's protocol while connecting: another server listens
        # there (RabbitMQ's port, an HTTP proxy). No retry mends it, so a worker waiting for
        # its servers at start does not wait on it.
        return refused(
            f"the server at {target.where} does not answer as Redis does (check the URL's "
            f"host and port): {reason}"
        )
    if tls_refused(exc) is not None:
        return refused(
            f"the TLS connection to Redis at {target.where}{db} failed its checks (check the "
            f"server's certificate and the client's TLS settings, or the URL's scheme): {reason}"
        )
    return kind(f"cannot reach Redis at {target.where}{db}: {reason}")


def refused_credentials(exc: BaseException) -> bool:
    """Whether ``exc`` is the server refusing the connection's credentials (wrong or missing
    password, unknown user, no permission): a configuration error that no retry mends."""
    if isinstance(exc, AuthenticationError | NoPermissionError):
        return True
    if isinstance(exc, AuthenticationWrongNumberOfArgsError):
        return True
    text = str(exc)
    return isinstance(exc, ResponseError) and (
        text.startswith(("NOAUTH", "WRONGPASS", "NOPERM")) or "password" in text
    )


async def guarded(
    target: RedisTarget,
    call: Awaitable[T],
    kind: type[BrokerConnectionError] = BrokerConnectionError,
) -> T:
    """Await ``call``; turn connection failures (after redis-py's retries) and a server that
    cannot take calls for now (:func:`outage`) into ours (``kind``:
    :class:`~qtasks.errors.StorageConnectionError` for the storage)."""
    try:
        return await call
    except Exception as exc:
        if not outage(exc):
            raise
        raise connection_error(target, exc, kind) from exc


_PLAIN_CHECK = 1.0
"""Seconds :func:`answers_without_tls` waits for a connection and a reply (a Redis answers a
PING in well under a millisecond on a working link)."""


async def answers_without_tls(target: RedisTarget) -> bool:
    """Whether the server of ``target`` answers a PING sent in plain text with a Redis reply
    (``+PONG``, ``-NOAUTH ...``): a Redis that does not speak TLS. Only after a TLS connect
    timed out, so a working connection never pays for it."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(target.host, target.port), _PLAIN_CHECK
        )
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(b"PING\r\n")
        line = await asyncio.wait_for(reader.readline(), _PLAIN_CHECK)
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return line.startswith((b"+", b"-")) and line.endswith(b"\r\n")
