"""``qtasks run``: serve the app's tasks until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Annotated

import typer

from qtasks.app import AsyncQueueTasks
from qtasks.cli.group import cli, command
from qtasks.cli.options import Components, MetricsPortOpt
from qtasks.cli.resolve import aio_of, resolve_app
from qtasks.discovery import instantiate_plugin, load
from qtasks.errors import ConfigError
from qtasks.serving_log import checked_level, log_to_stderr, say_serving


def enable_metrics(app: AsyncQueueTasks, port: int) -> None:
    """Serve the worker's metrics on ``port``: ``extra.metrics.port`` is set in the app's
    configuration and the ``metrics`` plugin (``qtasks.plugins`` entry point, shipped by
    qtasks-web; imported here, never by the core at import time) is built again from it.

    Raises :class:`ConfigError` when the plugin is not installed, or disabled by
    ``plugins_disabled``."""
    disabled = set(app.config.plugins_disabled)
    if disabled & {"metrics", "*"}:
        raise ConfigError(
            "--metrics-port: the metrics plugin is disabled by plugins_disabled "
            f"({sorted(disabled)}); remove it from there to serve metrics"
        )
    try:
        factory = load("plugin", "metrics")
    except ConfigError as exc:
        raise ConfigError(
            f"--metrics-port needs the metrics plugin of qtasks-web (pip install qtasks-web): {exc}"
        ) from None
    extra = dict(app.config.extra)
    extra["metrics"] = {**(extra.get("metrics") or {}), "port": port}
    app.config = replace(app.config, extra=extra)
    app.config_sources["extra.metrics.port"] = "cli --metrics-port"
    old = app.hooks.pm.get_plugin("metrics")
    if old is not None:
        app.hooks.unregister(old)
    app.hooks.register(instantiate_plugin(factory, app.config), "metrics")


@command(cli)
def run(
    *,
    where: Components,
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Tasks run at once (max_tasks_process).")
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="DEBUG, INFO, WARNING or ERROR (default: config).")
    ] = None,
    metrics_port: MetricsPortOpt = None,
    health_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="Serve the health probe (/livez, /readyz) on this port (health_port; "
            "health_host, loopback by default, says where).",
        ),
    ] = None,
    start_timeout: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Seconds to wait for servers not reachable at start, trying again with "
            "back-off (start_timeout; default: config, else without limit; 0: fail at once).",
        ),
    ] = None,
) -> None:
    """Serve tasks until SIGINT/SIGTERM, then stop gracefully.

    A broker or storage not reachable yet is waited for (a warning per attempt) for up to
    start_timeout seconds; refused credentials and configuration errors fail at once.

    On SIGINT/SIGTERM the worker takes no new messages, hands waiting ones back to the broker
    and gives running tasks shutdown_grace seconds before cancelling and requeueing them; a
    second signal requeues them at once.
    """
    flags = {
        **where.flags(),
        "max_tasks_process": concurrency,
        "log_level": log_level,
        "start_timeout": start_timeout,
        "health_port": health_port,
    }
    # Logging first, so that what configuration decides (a storage following the broker, a
    # default address) is shown; the configured level applies once the app is known.
    early = (log_level or "INFO").upper()
    log_to_stderr(early if early in logging.getLevelNamesMapping() else "INFO")
    the_app = resolve_app(where.app, where.config, flags, need_tasks=True)
    aio = aio_of(the_app)
    logging.getLogger().setLevel(checked_level(aio.config.log_level))
    if getattr(aio.broker, "local", False):
        # Most often no configuration was found (qtasks run started in another directory):
        # the worker would wait for tasks no other process can send it.
        logging.getLogger("qtasks.cli").warning(
            "the broker is in memory (%s): only tasks this process enqueues (its timers, "
            "its own code) reach this worker, none from another process; name a shared one "
            "(--broker redis --broker-url URL, or broker and broker_url in qtasks.toml or "
            "[tool.qtasks] of pyproject.toml; qtasks config shows what was read)",
            type(aio.broker).__name__,
        )
    if metrics_port is not None:
        enable_metrics(aio, metrics_port)
    say_serving(aio)
    aio.run_forever()
    logging.getLogger("qtasks.cli").info("stopped")
    # Python's exit does not wait for threads of sync task code given up on: qtasks.threads.
