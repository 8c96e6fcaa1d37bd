"""``qtasks plugins`` and ``qtasks config``: what is installed and what is configured."""

from __future__ import annotations

import json
from dataclasses import fields

import typer

from qtasks.clash import other_qtasks
from qtasks.cli.group import cli, command
from qtasks.cli.options import ConfigOpt, JsonOpt, Place, ShowSecretsOpt, chosen
from qtasks.cli.output import table, to_json, warn_secrets_shown
from qtasks.cli.resolve import aio_of, import_app, warn_unread_config
from qtasks.config import QueueConfig, config_file, follow_broker, load_config
from qtasks.discovery import Discovered, check_plugins, discover_all, load
from qtasks.errors import ConfigError
from qtasks.masking import masked


@command(cli)
def plugins(ctx: typer.Context, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List installed components, plugins and CLI extensions.

    Each entry point of the qtasks.* groups with its distribution and version. A plugin's
    state is enabled, off (it loads but its own settings leave it off, e.g. metrics without
    a port; how to switch it on follows the table), disabled (plugins_disabled of the
    configuration file) or failed: it does not import, cannot be built, or names an unknown
    hook. A component or CLI extension is ok, or failed: it does not import (or a CLI
    extension is neither a typer.Typer nor a function). The reasons of failures follow the
    table and the exit code is 1. (-A is accepted but not needed: plugins load by entry
    point.) A warning names each name of plugins_disabled that
    is not an installed plugin (a typo leaves the plugin loaded), and the unrelated 'qtasks'
    distribution when it is installed here too.
    """
    _, config = chosen(ctx, None, config)
    loaded = load_config(config).config
    disabled = set(loaded.plugins_disabled)
    check = check_plugins(loaded)
    problems = check.problems
    broken: dict[tuple[str, str], str] = {}
    rows = []
    for item in discover_all():
        if item.kind == "plugin":
            state = "disabled" if item.name in disabled or "*" in disabled else "enabled"
            state = "off" if item.name in check.off else state
            state = "failed" if item.name in problems else state
        else:
            failure = _failure(item)
            state = "ok" if failure is None else "failed"
            if failure is not None:
                broken[item.kind, item.name] = failure
        row = {
            "kind": item.kind,
            "name": item.name,
            "distribution": item.distribution,
            "version": item.version,
            "object": item.value,
            "state": state,
        }
        if item.kind == "plugin" and item.name in problems:
            row["error"] = problems[item.name]
        if (item.kind, item.name) in broken:
            row["error"] = broken[item.kind, item.name]
        if state == "off":
            row["how"] = check.off[item.name]
        rows.append(row)
    if as_json:
        typer.echo(to_json(rows))
    else:
        headers = ["kind", "name", "distribution", "version", "object", "state"]
        typer.echo(table(headers, [[r[h] for h in headers] for r in rows]))
        for name, how in sorted(check.off.items()):
            if name not in problems:
                typer.echo(f"{name} is off: {how}")
        for name, problem in sorted(problems.items()):
            typer.echo(
                f"error: {problem}; fix or uninstall it, or add {name!r} to plugins_disabled",
                err=True,
            )
        for _, problem in sorted(broken.items()):
            typer.echo(f"error: {problem}; fix or uninstall it", err=True)
    for problem in check.unknown_disabled.values():
        typer.echo(f"warning: {problem}", err=True)
    clash = other_qtasks()
    if clash:
        typer.echo(f"warning: {clash}", err=True)
    if problems or broken:
        raise typer.Exit(1)


def _failure(item: Discovered) -> str | None:
    """Why the component or CLI extension ``item`` cannot be used, masked as :func:`load`
    masks it (a failed import often quotes a DSN); ``None`` when it loads. Commands and apps
    fail on it only when they use it (``--broker NAME``, ``qtasks NAME``), so this is where a
    half-installed distribution shows."""
    try:
        obj = load(item.kind, item.name)
    except ConfigError as exc:
        return str(exc)
    if item.kind == "cli" and not callable(obj):  # what the CLI skips without a word
        return (
            f"CLI extension {item.name!r} ({item.value}) is a {type(obj).__name__}, neither a "
            "typer.Typer nor a function: no command is added for it"
        )
    return None


@command(cli, "config")
def show_config(
    *,
    where: Place,
    as_json: JsonOpt = False,
    show_secrets: ShowSecretsOpt = False,
) -> None:
    """Show the effective configuration and where each value came from.

    Sources: default, the file, an environment variable, a cli flag, code, or "follows broker"
    (a storage or global config left unset follows a remote broker). With -A, or an app
    named in the configuration (`app = "module:app"`), the configuration of that app (its
    module imported with -c's file, as every command does); without either, the file's.
    Passwords in URLs and values of secret-named keys (password, token, api_key...) are
    shown as ***, unless --show-secrets is given.
    """
    # -A, or the app the configuration names, as every other command takes it.
    target = where.app if where.app is not None else load_config(where.config).config.app
    if target is not None:
        with config_file(where.config):
            aio = aio_of(import_app(target))
            warn_unread_config(aio, target, where.config)
        shown = aio.config
        sources = {
            f.name: aio.config_sources.get(f.name, "app (constructor)") for f in fields(shown)
        }
    else:
        loaded = follow_broker(load_config(where.config))
        shown, sources = loaded.config, loaded.sources
    # Output that ends up in issues and CI logs: passwords and secret-named values masked,
    # unless asked for by name.
    values = {f.name: getattr(shown, f.name) for f in fields(QueueConfig)}
    warn_secrets_shown(show_secrets)
    if not show_secrets:
        values = {key: masked(value) for key, value in values.items()}
    if as_json:
        typer.echo(to_json({k: {"value": v, "source": sources[k]} for k, v in values.items()}))
        return
    rows = [[k, json.dumps(v, default=str), sources[k]] for k, v in values.items()]
    typer.echo(table(["key", "value", "source"], rows))
