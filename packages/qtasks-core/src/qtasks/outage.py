"""Riding out a backend outage: retry with back-off, one warning per outage, not one per call."""

from __future__ import annotations

import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from qtasks.errors import ServerFullError

T = TypeVar("T")

_TLS_FOR_NOW = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)
"""TLS errors of a connection closed mid-handshake (a server going down): an outage."""


def tls_refused(exc: BaseException) -> ssl.SSLError | None:
    """The TLS failure behind ``exc`` (itself or a cause) that no retry mends, for any
    backend: a certificate that does not verify (``ssl.SSLCertVerificationError``), a
    handshake the server answered in something else than TLS (``WRONG_VERSION_NUMBER``: a
    plain server), no protocol or cipher in common; ``None`` for anything else, a connection
    closed mid-handshake too."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ssl.SSLError) and not isinstance(cause, _TLS_FOR_NOW):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


RETRY_CAP = 2.0
"""Longest pause, in seconds, between two tries of a call made during an outage."""


class Outage:
    """The state of one backend link as one worker sees it: the first failure of an outage
    logs a warning, the first success after it logs that the link is back, and the calls in
    between log nothing (an outage of seconds used to log a traceback per task)."""

    __slots__ = ("_down", "_log", "_what")

    def __init__(self, log: logging.Logger, what: str) -> None:
        self._log = log
        self._what = what
        self._down = False

    @property
    def down(self) -> bool:
        """Whether the last call failed for want of a connection."""
        return self._down

    def failed(self, exc: BaseException) -> None:
        if not self._down:
            self._down = True
            what = "refuses writes" if isinstance(exc, ServerFullError) else "unreachable"
            self._log.warning("%s %s (%s); retrying", self._what, what, exc)

    def ok(self) -> None:
        if self._down:
            self._down = False
            self._log.warning("%s reachable again", self._what)


async def retrying(
    call: Callable[[], Awaitable[T]], outage: Outage, give_up: Callable[[], bool]
) -> T:
    """``await call()``, tried again with jittered exponential back-off for as long as it fails
    with a :class:`ConnectionError` and ``give_up()`` is false; then the error is raised."""
    failures = 0
    while True:
        try:
            result = await call()
        except ConnectionError as exc:
            outage.failed(exc)
            if give_up():
                raise
            failures += 1
            await anyio.sleep(min(RETRY_CAP, 0.05 * 2**failures) * (0.5 + random.random() / 2))
            continue
        outage.ok()
        return result
