"""The default Starter: owns the process for ``run_forever`` (event loop, signals, shutdown)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from qtasks.loop import loop_options

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks

log = logging.getLogger("qtasks")


class SignalStarter:
    """Serve an app in a new event loop until SIGINT or SIGTERM, then stop gracefully.

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
        options = loop_options(self.backend, self.loop_factory)
        anyio.run(self.serve, app, backend=self.backend, backend_options=options)

    async def serve(self, app: AsyncQueueTasks) -> None:
        """Serve in the running loop until a signal arrives."""
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with app:
                log.info("qtasks app %r serving (worker %s)", app.name, app.worker.id)
                async for signum in signals:
                    log.info("received %s, stopping", signal.Signals(signum).name)
                    break
