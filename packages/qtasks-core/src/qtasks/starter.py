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

from qtasks.loop import loop_options

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks

log = logging.getLogger("qtasks")


class SignalStarter:
    """Serve an app in a new event loop until ``app.stop()``, SIGINT or SIGTERM, then stop
    gracefully. Signals are watched only on the main thread; on another thread (a server
    thread, say) ``app.stop()`` ends it.

    Graceful means: the worker stops taking messages, hands back the ones it holds but has not
    started, and gives running tasks ``config.shutdown_grace`` seconds before cancelling and
    requeueing them. A second signal during that time does not cut it short (send SIGKILL to
    stop at once; the broker redelivers after the lease).
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
        # Open before the app starts, so that a signal during start-up stops it gracefully.
        with receiver as signals:
            async with app:
                log.info("qtasks app %r serving (worker %s)", app.name, app.worker.id)
                async with anyio.create_task_group() as tg:
                    if signals is not None:
                        tg.start_soon(_stop_on_signal, app, signals)
                    await app.wait_for_stop()
                    tg.cancel_scope.cancel()


SIGNALS = (signal.SIGINT, signal.SIGTERM)


def on_main_thread() -> bool:
    """Whether this runs on the interpreter's main thread (the only one signals reach)."""
    return threading.current_thread() is threading.main_thread()


async def _stop_on_signal(app: AsyncQueueTasks, signals: AsyncIterator[int]) -> None:
    async for signum in signals:
        log.info("received %s, stopping", signal.Signals(signum).name)
        app.stop()
        return


@contextmanager
def stop_on_signals(stop: Callable[[], object]) -> Iterator[None]:
    """On the main thread, make SIGINT/SIGTERM call ``stop`` while the block runs (the previous
    handlers come back after it); on any other thread do nothing. For code that waits on the
    main thread while the app's loop runs in another (the sync app's ``run_forever``)."""
    if not on_main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        stop()  # only schedules the stop: safe between any two bytecodes of the main thread

    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            if old is not None:  # None: installed outside Python, cannot be put back
                signal.signal(sig, old)
