"""``qtasks web``: the dashboard from the command line (entry point ``qtasks.cli``)."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

import typer

from qtasks.cli.group import shared_options
from qtasks.cli.options import Components
from qtasks.cli.resolve import aio_of, refuse_local, resolve_app
from qtasks.config import load_config
from qtasks_web.server import check_bind, serve
from qtasks_web.settings import EXTRA_KEY, WebSettings


@shared_options
def web(
    *,
    where: Components,
    host: Annotated[
        str | None,
        typer.Option(help="Address to bind (default: [extra.web] host, else 127.0.0.1)."),
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port (default: [extra.web] port, else 8000).")
    ] = None,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="Show everything, refuse every action.")
    ] = False,
) -> None:
    """Serve the live dashboard of the app until Ctrl-C.

    On loopback by default; any other address needs a token or users in [extra.web]. The
    component flags (--broker, --broker-url, ...) work as for `qtasks inspect`; in-memory
    components are refused, since no worker shares them with this process.
    """
    the_app = aio_of(resolve_app(where.app, where.config, where.flags(), need_tasks=False))
    # [extra.web] of the configuration file; an app built in code may carry its own.
    loaded = load_config(where.config).config
    settings = WebSettings.from_config(loaded if EXTRA_KEY in loaded.extra else the_app.config)
    settings = replace(
        settings,
        host=host if host is not None else settings.host,
        port=port if port is not None else settings.port,
        read_only=read_only or settings.read_only,
    ).checked()
    check_bind(settings)
    refuse_local(the_app, "web", ("broker", "storage", "global_config"))
    serve(the_app, settings)
