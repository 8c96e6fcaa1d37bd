"""Serving the dashboard with uvicorn: from the command line (:func:`serve`), or inside a
running event loop next to the app's worker (:func:`running`, used by the tests and the
screenshot script)."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from types import FrameType
from typing import TYPE_CHECKING

import anyio
import uvicorn

from qtasks.errors import ConfigError
from qtasks.report import components_line
from qtasks_web.settings import WebSettings, is_loopback

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from qtasks.app import AsyncQueueTasks

log = logging.getLogger("qtasks.web")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def check_bind(settings: WebSettings) -> None:
    """Refuse (:class:`~qtasks.errors.ConfigError`) to bind a non-loopback address without
    authentication: a dashboard can cancel tasks and purge dead letters."""
    if not is_loopback(settings.host) and not settings.auth.enabled:
        raise ConfigError(
            f"qtasks web: binding {settings.host!r}, which is not a loopback address, needs "
            "authentication: set a token or users in [extra.web] (token = "
            '"env:QTASKS_WEB_TOKEN" reads it from the environment), or bind 127.0.0.1'
        )


def _config(web: ASGIApp, host: str, port: int) -> uvicorn.Config:
    # No access log: it would be the only place a URL typed by a person is written; the
    # dashboard logs its actions itself, never a credential.
    return uvicorn.Config(
        web,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
        lifespan="off",
    )


def serve(app: AsyncQueueTasks, settings: WebSettings) -> None:
    """Serve the dashboard of ``app`` until SIGINT/SIGTERM (``qtasks web``)."""
    from qtasks_web.app import create_app

    check_bind(settings)
    web = create_app(app, settings=settings)
    log.warning(
        "qtasks web: serving %r on http://%s:%d (%s%s); %s",
        app.name,
        settings.host,
        settings.port,
        "authentication on" if settings.auth.enabled else "no authentication: loopback only",
        ", read-only" if settings.read_only else "",
        components_line(app),
    )
    _Closing(_config(web, settings.host, settings.port)).run()


class _Closing(uvicorn.Server):
    """Ends the dashboard's event streams when a signal asks the server to stop, and exits
    normally afterwards (uvicorn raises the signal again once stopped: exit code -15)."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        from qtasks_web.app import close

        close(self.config.app)
        super().handle_exit(sig, frame)


class _Embedded(uvicorn.Server):
    """A server inside someone else's event loop: the signals are theirs."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@asynccontextmanager
async def running(web: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve ``web`` in the current event loop (port 0: a free one) while the block runs;
    yields its base URL."""
    server = _Embedded(_config(web, host, port))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn exposes no event for it
                await anyio.sleep(0.01)
        bound = server.servers[0].sockets[0].getsockname()
        try:
            yield f"http://{host}:{bound[1]}"
        finally:
            from qtasks_web.app import close

            close(web)
            server.should_exit = True
