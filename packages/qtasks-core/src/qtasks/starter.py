"""The default Starter: owns the process for ``run_forever`` (event loop, signals, shutdown)."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

import anyio

from qtasks.components import EarlyProbe, provides
from qtasks.loop import loop_options
from qtasks.waiting import start_when_reachable

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks

log = logging.getLogger("qtasks")


class SignalStarter:
    """Serve an app in a new event loop until ``app.stop()``, SIGINT or SIGTERM, then stop
    gracefully. Signals are watched only on the main thread; on another thread (a server
    thread, say) ``app.stop()`` ends it.

    Graceful means: the worker stops taking messages, hands back the ones it holds but has not
    started, and gives running tasks ``config.shutdown_grace`` seconds before cancelling and
    requeueing them. A second signal during that time cuts it short (``app.stop(now=True)``):
    running tasks are cancelled and handed back at once. Either way the stop waits on the
    backends at most :data:`~qtasks.stopping.STOP_MARGIN` more: what a stalled server did not
    take is left to the leases (one warning says what). Each signal is logged.

    Components whose servers cannot be reached yet are waited for (a warning per attempt, up
    to ``config.start_timeout``; a signal ends the wait): see :mod:`qtasks.waiting`. The
    worker's health probe (``health_port``) answers from before that wait until the app is
    closed (:class:`~qtasks.components.EarlyProbe`).
    """

    def __init__(
        self,
        backend: str = "asyncio",
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
    ) -> None:
        """``loop_factory`` (asyncio only) makes the event loop; by default
        :func:`qtasks.loop.new_event_loop` (asyncio's, with timers that fire on time), unless
        an event-loop policy other than asyncio's default is installed."""
        self.backend = backend
        self.loop_factory = loop_factory

    def run(self, app: AsyncQueueTasks) -> None:
        """Block serving ``app`` in a new event loop in this thread (see :meth:`serve`)."""
        options = loop_options(self.backend, self.loop_factory)
        anyio.run(self.serve, app, backend=self.backend, backend_options=options)

    async def serve(self, app: AsyncQueueTasks) -> None:
        """Serve in the running loop until ``app.stop()`` or, when this loop runs on the main
        thread, SIGINT/SIGTERM (only the main thread can receive signals)."""
        receiver = anyio.open_signal_receiver(*SIGNALS) if on_main_thread() else nullcontext(None)
        # Open before the app starts, so that a signal during start-up stops it gracefully;
        # watched until the app is closed, so that a second one cuts the grace period short.
        failed: Exception | None = None
        with receiver as signals:
            async with anyio.create_task_group() as tg:
                if signals is not None:
                    tg.start_soon(_stop_on_signals, app, signals)
                try:
                    worker = app.worker
                    if provides(worker, EarlyProbe):
                        # Answered while the app waits for its servers, until the app is
                        # closed (the task group's cancel below closes the listener).
                        await tg.start(worker.serve_probe, app)
                    # A worker started before its servers waits for them (qtasks.waiting).
                    if not await start_when_reachable(app):
                        log.info("stopped while waiting for the servers; nothing was taken")
                        await app.wait_for_stop()  # consumes the request
                        tg.cancel_scope.cancel()
                        return
                    async with app:
                        log.info("qtasks app %r serving (worker %s)", app.name, app.worker.id)
                        await app.wait_for_stop()
                except Exception as exc:  # raised below as it is, not in an ExceptionGroup
                    failed = exc
                tg.cancel_scope.cancel()
        if failed is not None:
            raise failed


SIGNALS = (signal.SIGINT, signal.SIGTERM)


def on_main_thread() -> bool:
    """Whether this runs on the interpreter's main thread (the only one signals reach)."""
    return threading.current_thread() is threading.main_thread()


async def _stop_on_signals(app: AsyncQueueTasks, signals: AsyncIterator[int]) -> None:
    stopper = Stopper(app)
    async for signum in signals:
        stopper(signum)


class Stopper:
    """What SIGINT/SIGTERM do to a serving app, counted: the first stops it gracefully,
    saying how long it may wait; the second cuts the grace period short; later ones only say
    that it is stopping already. Each is logged, so a signal never goes unanswered."""

    def __init__(self, app: AsyncQueueTasks) -> None:
        self.app = app
        self.received = 0

    def __call__(self, signum: int) -> None:
        """Answer the signal ``signum`` (from a signal handler or the loop)."""
        self.received += 1
        app, name = self.app, signal.Signals(signum).name
        running = app.worker.running
        if self.received == 1:
            if running:
                log.info(
                    "received %s, stopping: waiting up to %g s for %d running task(s) "
                    "(%s again to hand them back now)",
                    name,
                    app.config.shutdown_grace,
                    running,
                    name,
                )
            else:
                log.info("received %s, stopping", name)
            app.stop()
        elif self.received == 2:
            log.warning(
                "received %s again, stopping now: %d running task(s) cancelled and handed "
                "back to the broker (they run again)",
                name,
                running,
            )
            app.stop(now=True)
        else:
            log.warning("received %s again: stopping now already (SIGKILL ends it at once)", name)


@contextmanager
def stop_on_signals(app: AsyncQueueTasks) -> Iterator[None]:
    """On the main thread, make SIGINT/SIGTERM stop ``app`` while the block runs, as
    :class:`SignalStarter` does (the previous handlers come back after it); on any other thread
    do nothing. For code that waits on the main thread while the app's loop runs in another
    (the sync app's ``run_forever``)."""
    if not on_main_thread():
        yield
        return
    stopper = Stopper(app)

    def handler(signum: int, frame: object) -> None:
        # app.stop() only schedules the stop: safe between any two bytecodes of the main
        # thread; so is the log line, since the main thread does nothing but wait meanwhile.
        stopper(signum)

    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            if old is not None:  # None: installed outside Python, cannot be put back
                signal.signal(sig, old)
