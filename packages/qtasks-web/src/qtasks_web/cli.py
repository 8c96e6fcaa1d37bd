"""``qtasks web``: the dashboard from the command line (entry point ``qtasks.cli``)."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

import typer

from qtasks.cli.options import AppOpt, ConfigOpt, chosen
from qtasks.cli.resolve import aio_of, resolve_app
from qtasks.config import load_config
from qtasks.errors import QTasksError
from qtasks_web.server import serve
from qtasks_web.settings import EXTRA_KEY, WebSettings


def web(
    ctx: typer.Context,
    app: AppOpt = None,
    config: ConfigOpt = None,
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

    On loopback by default; any other address needs a token or users in [extra.web].
    """
    try:
        target, config_path = chosen(ctx, app, config)
        the_app = aio_of(resolve_app(target, config_path, {}, need_tasks=False))
        # [extra.web] of the configuration file; an app built in code may carry its own.
        loaded = load_config(config_path).config
        settings = WebSettings.from_config(loaded if EXTRA_KEY in loaded.extra else the_app.config)
        settings = replace(
            settings,
            host=host if host is not None else settings.host,
            port=port if port is not None else settings.port,
            read_only=read_only or settings.read_only,
        ).checked()
        serve(the_app, settings)
    except QTasksError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
