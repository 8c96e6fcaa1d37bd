"""A worker started before its servers waits for them instead of crashing.

``run_forever``, ``serve`` and ``qtasks run`` start the components through
:func:`start_when_reachable`: while a component's start fails because its server cannot be
reached (a :class:`ConnectionError`, :class:`OSError` or :class:`TimeoutError`, such as
:class:`~qtasks.errors.BrokerConnectionError` "cannot reach Redis"), the start is tried again
with capped exponential back-off (0.1 s doubling up to :data:`START_RETRY_CAP`, jittered), one
warning per attempt naming the component and the error (whose URLs are masked), for up to
``config.start_timeout`` seconds (``None``: without limit; ``0``: not at all, the error is
raised at once). A stop (``app.stop()``, SIGINT/SIGTERM) ends the wait at once, an attempt
under way included; nothing was taken from the broker, so nothing is handed back.

A configuration error is not waited on: refused credentials or a connection whose TLS fails
its checks (:class:`~qtasks.errors.CredentialsRefusedError`), a bad URL or option
(:class:`~qtasks.errors.ConfigError`), any other error: they are raised at once.

Each failed attempt is closed before the next (:meth:`AsyncQueueTasks.start` unwinds what it
started, a cancelled attempt too), so a broker connected while the storage was not is not
left open. Plugins see one start: ``qtasks_app_configured`` fires before the first attempt
only, ``qtasks_app_started`` once the components started. Producers (``add_task`` starting
the components on first use, ``app.start()``, ``async with app``) do not wait: a caller such
as a web request gets the error at once.
"""

from __future__ import annotations

import logging
import math
import random
from typing import TYPE_CHECKING

import anyio

from qtasks.errors import ConfigError, CredentialsRefusedError
from qtasks.masking import mask_text

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks

log = logging.getLogger("qtasks")

START_RETRY_FIRST = 0.1
"""Seconds before the second attempt; each later pause doubles, up to :data:`START_RETRY_CAP`."""
START_RETRY_CAP = 5.0
"""Longest pause, in seconds, between two attempts: a worker serves at most this long after
its servers are up."""


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc``, raised by a component's start, means that its server cannot be reached
    (yet), which waiting may mend, as opposed to a configuration error, which it does not."""
    if isinstance(exc, CredentialsRefusedError | ConfigError):
        return False
    return isinstance(exc, OSError)  # ConnectionError, TimeoutError, socket.gaierror...


def pause(failures: int) -> float:
    """Seconds to wait after the ``failures``-th failed attempt in a row (1, 2...): the
    capped exponential back-off, jittered down by up to a quarter so that workers started
    together do not all knock at once."""
    base = min(START_RETRY_CAP, START_RETRY_FIRST * 2.0 ** min(failures - 1, 32))
    return base * (0.75 + random.random() / 4)


async def start_when_reachable(app: AsyncQueueTasks) -> bool:
    """Start ``app``'s components, waiting for their servers as the module says. Return
    ``True`` once started, ``False`` if a stop was requested first (nothing is started then;
    the request is left for :meth:`~qtasks.app.AsyncQueueTasks.wait_for_stop`)."""
    timeout = app.config.start_timeout
    began = anyio.current_time()
    failures = 0
    while True:
        try:
            if not await _start_unless_stopped(app):
                return False
        except Exception as exc:
            waited = anyio.current_time() - began
            if not unreachable(exc) or timeout == 0:
                raise
            if timeout is not None and waited >= timeout:
                log.error(
                    "gave up waiting for the servers after %.1f s (start_timeout = %g)",
                    waited,
                    timeout,
                )
                raise
            failures += 1
            delay = pause(failures)
            if timeout is None:
                left = "start_timeout: no limit"
            else:
                left = f"{timeout - waited:.1f} s left of start_timeout {timeout:g}"
                delay = min(delay, max(timeout - waited, 0.0))
            log.warning(
                "%s cannot start: %s; trying again in %.1f s (attempt %d; %s)",
                _which(app),
                mask_text(str(exc)) or type(exc).__name__,
                delay,
                failures,
                left,
            )
            if await app.stop_requested_within(delay):
                return False
            continue
        if failures:
            log.info(
                "components started after %d failed attempt(s) in %.1f s: the servers are "
                "reachable",
                failures,
                anyio.current_time() - began,
            )
        return True


def _which(app: AsyncQueueTasks) -> str:
    """``storage RedisStorage``: the component whose start failed, or the app's name."""
    kind = app.starting
    if kind is None:
        return f"app {app.name!r}"
    return f"{kind} {type(getattr(app, kind)).__name__}"


async def _start_unless_stopped(app: AsyncQueueTasks) -> bool:
    """``await app.start()``, cancelled if a stop is requested meanwhile (an attempt may
    take up to a connect timeout on a host that does not answer). ``False``: stopped.

    A stop requested before the attempt does not cancel it: ``run_forever`` after a
    ``stop()`` starts and stops at once, as documented (if the servers are reachable)."""
    if await app.stop_requested_within(0):
        await app.start()
        return True
    started = False
    failed: Exception | None = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            if await app.stop_requested_within(math.inf):
                tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            await app.start()
            started = True
        except Exception as exc:  # raised below as it is, not in an ExceptionGroup
            failed = exc
        tg.cancel_scope.cancel()
    if failed is not None:
        raise failed
    return started
