"""The ``qtasks`` command line (also ``python -m qtasks``).

Every command finds the app the same way: ``-A/--app module:attribute`` (the attribute may be
an app or a factory returning one; ``module`` alone means ``module:app``), else the ``app`` key
of the configuration, else, for commands that only talk to the components (``add``, ``get``,
``cancel``, ``inspect``, ``dlq``), an app built from configuration alone. The working directory
is put on ``sys.path`` first, so ``-A tasks:app`` finds ``./tasks.py``.

Flags given on the command line override the app's configuration (files and ``QTASKS_*``
variables), except values the code set as keyword arguments of ``from_config``.
Commands contributed by installed distributions (entry-point group ``qtasks.cli``) are added
under their entry-point name.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, fields, replace
from typing import Annotated, Any, ParamSpec, TypeVar

import anyio
import typer

from qtasks.app import AsyncQueueTasks
from qtasks.config import CLI_FLAGS, QueueConfig, check_value, load_config
from qtasks.discovery import build_component, discover_all, load_cli_extensions
from qtasks.errors import ConfigError, QTasksError, TaskTimeoutError
from qtasks.record import TaskRecord, TaskStatus
from qtasks.sync import QueueTasks

P = ParamSpec("P")
T = TypeVar("T")

AnyApp = AsyncQueueTasks | QueueTasks

cli = typer.Typer(
    name="qtasks",
    help="qtasks: run workers, enqueue and inspect tasks, list plugins and configuration.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
dlq = typer.Typer(
    help="List and requeue dead-lettered messages.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
cli.add_typer(dlq, name="dlq")

AppOpt = Annotated[
    str | None,
    typer.Option(
        "--app",
        "-A",
        help="The app as module:attribute (an app or a factory). Default: `app` in config.",
        envvar="QTASKS_APP",
        show_envvar=False,
    ),
]
ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config",
        "-c",
        help="Configuration file (qtasks.toml or pyproject.toml). Default: $QTASKS_CONFIG, "
        "else ./qtasks.toml, else [tool.qtasks] of ./pyproject.toml.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
BrokerOpt = Annotated[
    str | None, typer.Option(help="Broker by entry-point name (memory, redis, ...).")
]
BrokerUrlOpt = Annotated[str | None, typer.Option(help="Broker URL.")]
StorageOpt = Annotated[str | None, typer.Option(help="Storage by entry-point name.")]
StorageUrlOpt = Annotated[str | None, typer.Option(help="Storage URL.")]
GlobalConfigOpt = Annotated[str | None, typer.Option(help="Global config by entry-point name.")]
GlobalConfigUrlOpt = Annotated[str | None, typer.Option(help="Global config URL.")]


def component_flags(
    broker: str | None,
    broker_url: str | None,
    storage: str | None,
    storage_url: str | None,
    global_config: str | None,
    global_config_url: str | None,
) -> dict[str, Any]:
    """The component flags every command accepts, as config keys (``None``: not given)."""
    return {
        "broker": broker,
        "broker_url": broker_url,
        "storage": storage,
        "storage_url": storage_url,
        "global_config": global_config,
        "global_config_url": global_config_url,
    }


def _handle_errors(func: Callable[P, T]) -> Callable[P, T]:
    """Print qtasks errors as one line on stderr and exit 1, instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return func(*args, **kwargs)
        except QTasksError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from exc

    return wrapper


# --- finding and configuring the app --------------------------------------------------------


def import_app(target: str) -> AnyApp:
    """Import ``module:attribute`` (``module`` means ``module:app``); call it if it is a
    factory. The working directory is importable."""
    module_name, _, attr = target.partition(":")
    attr = attr or "app"
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--app {target}: cannot import module {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"--app {target}: module {module_name!r} has no {attr!r}") from None
    if not isinstance(obj, AsyncQueueTasks | QueueTasks) and callable(obj):
        obj = obj()
    if not isinstance(obj, AsyncQueueTasks | QueueTasks):
        raise ConfigError(
            f"--app {target}: expected a QueueTasks or AsyncQueueTasks app (or a factory "
            f"returning one), got {type(obj).__name__}"
        )
    return obj


def _aio(app: AnyApp) -> AsyncQueueTasks:
    return app.aio if isinstance(app, QueueTasks) else app


def apply_flags(app: AnyApp, flags: dict[str, Any]) -> None:
    """Apply command-line ``flags`` (config keys; ``None`` = not given) to an app that has
    not started: the config is replaced, and components whose name or URL changed are rebuilt
    through discovery. Keys the code set through ``from_config`` keyword arguments win."""
    aio = _aio(app)
    given: dict[str, Any] = {}
    for key, value in flags.items():
        if value is None:
            continue
        flag = CLI_FLAGS.get(key, "--" + key.replace("_", "-"))
        if aio.config_sources.get(key) == "code":
            logging.getLogger("qtasks.cli").warning(
                "%s ignored: the app sets %s in code, which takes precedence", flag, key
            )
            continue
        given[key] = check_value(key, value, f"cli {flag}")
        aio.config_sources[key] = f"cli {flag}"
    if not given:
        return
    if aio.started:
        raise ConfigError("command-line flags cannot change an app that already started")
    aio.config = replace(aio.config, **given)
    for kind in ("broker", "storage", "global_config"):
        if kind in given or f"{kind}_url" in given:
            setattr(aio, kind, build_component(kind, getattr(aio.config, kind), aio.config))
    if "max_tasks_process" in given:
        aio.thread_limiter.total_tokens = aio.config.max_tasks_process


def resolve_app(
    target: str | None, config_path: str | None, flags: dict[str, Any], *, need_tasks: bool
) -> AnyApp:
    """The app a command works on (see the module docstring)."""
    if config_path is not None:
        # So that an app module calling from_config() reads the same file.
        os.environ["QTASKS_CONFIG"] = config_path
    if target is None:
        target = load_config(config_path).config.app
    if target is None:
        if need_tasks:
            raise ConfigError(
                'no app given: pass -A module:app or set `app = "module:app"` in the '
                "configuration ([tool.qtasks] or qtasks.toml)"
            )
        return AsyncQueueTasks.from_config(config_path, cli=flags)
    app = import_app(target)
    apply_flags(app, flags)
    return app


def run_on(app: AnyApp, func: Callable[[AsyncQueueTasks], Awaitable[T]]) -> T:
    """Run ``func(async_app)`` in the app's loop; an app this call started is closed after.

    A sync app runs it through its own portal, so the CLI also works on an app that a
    surrounding program (or a test) is serving in the same process."""
    aio = _aio(app)
    was_started = aio.started
    if isinstance(app, QueueTasks):
        try:
            return app.portal.call(func, aio)
        finally:
            if not was_started:
                app.close()

    async def main() -> T:
        try:
            return await func(aio)
        finally:
            if not was_started:
                await aio.aclose()

    return anyio.run(main)


# --- output ---------------------------------------------------------------------------------


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _record_dict(record: TaskRecord) -> dict[str, Any]:
    data = {f.name: getattr(record, f.name) for f in fields(TaskRecord)}
    data["status"] = record.status.value
    data.pop("token", None)
    return data


def _print_record(record: TaskRecord, as_json: bool) -> None:
    data = _record_dict(record)
    if as_json:
        typer.echo(_json(data))
        return
    for key, value in data.items():
        if value in (None, [], {}) and key not in ("returning",):
            continue
        shown = json.dumps(value, default=str) if isinstance(value, list | dict) else value
        typer.echo(f"{key}: {shown}")


def _parse_arg(raw: str) -> Any:
    """A positional CLI argument: JSON when it parses (``5``, ``"x"``, ``[1,2]``), else text."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


# --- commands -------------------------------------------------------------------------------


@cli.command()
@_handle_errors
def run(
    app: AppOpt = None,
    config: ConfigOpt = None,
    broker: BrokerOpt = None,
    broker_url: BrokerUrlOpt = None,
    storage: StorageOpt = None,
    storage_url: StorageUrlOpt = None,
    global_config: GlobalConfigOpt = None,
    global_config_url: GlobalConfigUrlOpt = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Tasks run at once (max_tasks_process).")
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="DEBUG, INFO, WARNING or ERROR (default: config).")
    ] = None,
) -> None:
    """Serve tasks until SIGINT/SIGTERM, then stop gracefully.

    On SIGINT/SIGTERM the worker takes no new messages, hands waiting ones back to the broker
    and gives running tasks shutdown_grace seconds before cancelling and requeueing them.
    """
    flags = {
        **component_flags(
            broker, broker_url, storage, storage_url, global_config, global_config_url
        ),
        "max_tasks_process": concurrency,
        "log_level": log_level,
    }
    the_app = resolve_app(app, config, flags, need_tasks=True)
    aio = _aio(the_app)
    level = aio.config.log_level.upper()
    if level not in logging.getLevelNamesMapping():
        raise ConfigError(f"log_level: unknown level {aio.config.log_level!r}")
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("qtasks.cli").info(
        "serving %r: %d tasks, broker %s, storage %s, concurrency %d",
        aio.name,
        len(aio.tasks),
        type(aio.broker).__name__,
        type(aio.storage).__name__,
        aio.config.max_tasks_process,
    )
    aio.run_forever()
    logging.getLogger("qtasks.cli").info("stopped")


@cli.command()
@_handle_errors
def add(
    task: Annotated[str, typer.Argument(help="Task name.")],
    args: Annotated[
        list[str] | None,
        typer.Argument(help="Positional arguments; each is JSON if it parses, else text."),
    ] = None,
    kwargs: Annotated[
        str | None, typer.Option("--kwargs", help="Keyword arguments as a JSON object.")
    ] = None,
    priority: Annotated[int | None, typer.Option(help="Lower runs first.")] = None,
    delay: Annotated[float | None, typer.Option(help="Run after this many seconds.")] = None,
    wait: Annotated[
        float | None, typer.Option(help="Wait up to SECONDS for the result and print it.")
    ] = None,
    app: AppOpt = None,
    config: ConfigOpt = None,
    broker: BrokerOpt = None,
    broker_url: BrokerUrlOpt = None,
    storage: StorageOpt = None,
    storage_url: StorageUrlOpt = None,
    global_config: GlobalConfigOpt = None,
    global_config_url: GlobalConfigUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Enqueue a task and print its uuid.

    With --wait, print its final record instead; the exit code is 1 if the task ended in
    error or was cancelled, or did not finish in time.
    """
    parsed_kwargs: dict[str, Any] = {}
    if kwargs is not None:
        try:
            parsed_kwargs = json.loads(kwargs)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--kwargs: not valid JSON: {exc}") from exc
        if not isinstance(parsed_kwargs, dict):
            raise ConfigError("--kwargs: expected a JSON object")
    positional = [_parse_arg(a) for a in args or []]
    the_app = resolve_app(
        app,
        config,
        component_flags(broker, broker_url, storage, storage_url, global_config, global_config_url),
        need_tasks=False,
    )

    async def go(aio: AsyncQueueTasks) -> TaskRecord:
        record = await aio.enqueue(task, positional, parsed_kwargs, priority=priority, delay=delay)
        if wait is None:
            return record
        try:
            return await aio.wait(record.uuid, wait)
        except TaskTimeoutError:
            typer.echo(record.uuid)
            raise

    record = run_on(the_app, go)
    if wait is None:
        typer.echo(_json(_record_dict(record)) if as_json else record.uuid)
        return
    _print_record(record, as_json)
    if record.status is not TaskStatus.SUCCESS:
        raise typer.Exit(1)


@cli.command()
@_handle_errors
def get(
    uuid: Annotated[str, typer.Argument(help="Task uuid.")],
    app: AppOpt = None,
    config: ConfigOpt = None,
    broker: BrokerOpt = None,
    broker_url: BrokerUrlOpt = None,
    storage: StorageOpt = None,
    storage_url: StorageUrlOpt = None,
    global_config: GlobalConfigOpt = None,
    global_config_url: GlobalConfigUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the stored record of a task (exit code 1 if there is none)."""
    the_app = resolve_app(
        app,
        config,
        component_flags(broker, broker_url, storage, storage_url, global_config, global_config_url),
        need_tasks=False,
    )

    async def go(aio: AsyncQueueTasks) -> TaskRecord | None:
        return await aio.get(uuid)

    record = run_on(the_app, go)
    if record is None:
        typer.echo(f"error: no task record for uuid {uuid!r}", err=True)
        raise typer.Exit(1)
    _print_record(record, as_json)


@cli.command()
@_handle_errors
def cancel(
    uuid: Annotated[str, typer.Argument(help="Task uuid.")],
    reason: Annotated[str, typer.Option(help="Stored as cancel_reason.")] = "cancelled",
    app: AppOpt = None,
    config: ConfigOpt = None,
    broker: BrokerOpt = None,
    broker_url: BrokerUrlOpt = None,
    storage: StorageOpt = None,
    storage_url: StorageUrlOpt = None,
    global_config: GlobalConfigOpt = None,
    global_config_url: GlobalConfigUrlOpt = None,
) -> None:
    """Cancel a task and print its resulting status.

    A queued task never runs, a running one is stopped; a finished task keeps its status.
    """
    the_app = resolve_app(
        app,
        config,
        component_flags(broker, broker_url, storage, storage_url, global_config, global_config_url),
        need_tasks=False,
    )

    async def go(aio: AsyncQueueTasks) -> TaskRecord | None:
        return await aio.cancel(uuid, reason)

    record = run_on(the_app, go)
    if record is None:
        typer.echo(f"error: no task record for uuid {uuid!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{record.uuid}: {record.status.value}")


@cli.command()
@_handle_errors
def inspect(
    app: AppOpt = None,
    config: ConfigOpt = None,
    broker: BrokerOpt = None,
    broker_url: BrokerUrlOpt = None,
    storage: StorageOpt = None,
    storage_url: StorageUrlOpt = None,
    global_config: GlobalConfigOpt = None,
    global_config_url: GlobalConfigUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show tasks, queue depth, dead letters, workers and records by status.

    Registered tasks with their options; queue depth per priority, delayed, in-flight and
    dead-lettered counts (broker); workers alive (global config heartbeats); records by status
    (storage); plus what plugins add through the qtasks_inspect hook.
    """
    the_app = resolve_app(
        app,
        config,
        component_flags(broker, broker_url, storage, storage_url, global_config, global_config_url),
        need_tasks=False,
    )
    report = run_on(the_app, AsyncQueueTasks.inspect)
    if as_json:
        typer.echo(_json(report))
        return
    typer.echo(f"app: {report['app']}")
    typer.echo("components: " + ", ".join(f"{k}={v}" for k, v in report["components"].items()))
    typer.echo(f"\ntasks ({len(report['tasks'])}):")
    if report["tasks"]:
        rows = [
            [name, t["kind"], t["priority"], t["retry"], t["max_time"], ",".join(t["tags"])]
            for name, t in report["tasks"].items()
        ]
        typer.echo(_table(["name", "kind", "priority", "retry", "max_time", "tags"], rows))
    queue = report["queue"]
    ready = ", ".join(f"p{p}={n}" for p, n in queue["ready_by_priority"].items()) or "empty"
    typer.echo(
        f"\nqueue: ready {ready}; delayed {queue['delayed']}; in flight "
        f"{queue['in_flight']}; dead letters {queue['dead_letters']}"
    )
    by_status = ", ".join(f"{s}={n}" for s, n in report["records_by_status"].items()) or "none"
    typer.echo(f"records: {by_status}")
    workers = report["workers"]
    typer.echo(f"\nworkers alive ({len(workers)}):")
    if workers:
        rows = [
            [wid, w.get("running"), w.get("waiting"), w.get("processed"), w.get("concurrency")]
            for wid, w in sorted(workers.items())
        ]
        typer.echo(_table(["id", "running", "waiting", "processed", "concurrency"], rows))
    typer.echo(f"\nplugins: {', '.join(report['plugins'])}")
    known = {"app", "components", "tasks", "queue", "workers", "records_by_status", "plugins"}
    for key in sorted(set(report) - known):
        typer.echo(f"{key}: {json.dumps(report[key], default=str, sort_keys=True)}")


@dlq.command("list")
@_handle_errors
def dlq_list(
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many.")] = 100,
    app: AppOpt = None,
    config: ConfigOpt = None,
    broker: BrokerOpt = None,
    broker_url: BrokerUrlOpt = None,
    storage: StorageOpt = None,
    storage_url: StorageUrlOpt = None,
    global_config: GlobalConfigOpt = None,
    global_config_url: GlobalConfigUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the oldest dead letters: id, priority, deliveries and reason."""
    the_app = resolve_app(
        app,
        config,
        component_flags(broker, broker_url, storage, storage_url, global_config, global_config_url),
        need_tasks=False,
    )

    async def go(aio: AsyncQueueTasks) -> list[Any]:
        return list(await aio.dead_letters(limit))

    letters = run_on(the_app, go)
    if as_json:
        rows = []
        for letter in letters:
            data = asdict(letter)
            data["body"] = letter.body.decode("utf-8", "replace")
            rows.append(data)
        typer.echo(_json(rows))
        return
    if not letters:
        typer.echo("no dead letters")
        return
    typer.echo(
        _table(
            ["id", "priority", "deliveries", "reason"],
            [[d.id, d.priority, d.deliveries, d.reason] for d in letters],
        )
    )


@dlq.command("requeue")
@_handle_errors
def dlq_requeue(
    ids: Annotated[
        list[str] | None, typer.Argument(help="Dead-letter ids (default: all of them).")
    ] = None,
    app: AppOpt = None,
    config: ConfigOpt = None,
    broker: BrokerOpt = None,
    broker_url: BrokerUrlOpt = None,
    storage: StorageOpt = None,
    storage_url: StorageUrlOpt = None,
    global_config: GlobalConfigOpt = None,
    global_config_url: GlobalConfigUrlOpt = None,
) -> None:
    """Publish dead letters again (all, or the given IDS) and print how many.

    Their records are reset to status new, so a worker runs them again.
    """
    the_app = resolve_app(
        app,
        config,
        component_flags(broker, broker_url, storage, storage_url, global_config, global_config_url),
        need_tasks=False,
    )

    async def go(aio: AsyncQueueTasks) -> int:
        return await aio.requeue_dead_letters(list(ids) if ids else None)

    typer.echo(f"requeued {run_on(the_app, go)}")


@cli.command()
@_handle_errors
def plugins(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List installed components, plugins and CLI extensions.

    Each entry point of the qtasks.* groups with its distribution and version; plugins
    disabled in the configuration (plugins_disabled) are marked.
    """
    disabled = set(load_config(config).config.plugins_disabled)
    found = discover_all()
    rows = []
    for item in found:
        state = ""
        if item.kind == "plugin":
            state = "disabled" if item.name in disabled or "*" in disabled else "enabled"
        rows.append(
            {
                "kind": item.kind,
                "name": item.name,
                "distribution": item.distribution,
                "version": item.version,
                "object": item.value,
                "state": state,
            }
        )
    if as_json:
        typer.echo(_json(rows))
        return
    headers = ["kind", "name", "distribution", "version", "object", "state"]
    typer.echo(_table(headers, [[r[h] for h in headers] for r in rows]))


@cli.command("config")
@_handle_errors
def show_config(app: AppOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Show the effective configuration and where each value came from.

    Sources: default, the file, an environment variable, a cli flag, or code. With -A, the
    configuration of that app.
    """
    if app is not None:
        aio = _aio(import_app(app))
        values = {f.name: getattr(aio.config, f.name) for f in fields(QueueConfig)}
        sources = {k: aio.config_sources.get(k, "app (constructor)") for k in values}
    else:
        loaded = load_config(config)
        values = {f.name: getattr(loaded.config, f.name) for f in fields(QueueConfig)}
        sources = loaded.sources
    if as_json:
        typer.echo(_json({k: {"value": v, "source": sources[k]} for k, v in values.items()}))
        return
    rows = [[k, json.dumps(v, default=str), sources[k]] for k, v in values.items()]
    typer.echo(_table(["key", "value", "source"], rows))


def _add_extensions(target: typer.Typer) -> None:
    builtin = {c.name for c in target.registered_commands} | {
        g.name for g in target.registered_groups
    }
    for name, obj in load_cli_extensions():
        if name in builtin:
            logging.getLogger("qtasks.cli").warning(
                "CLI extension %r skipped: it would replace a built-in command", name
            )
        elif isinstance(obj, typer.Typer):
            target.add_typer(obj, name=name)
        elif callable(obj):
            target.command(name=name)(obj)


_add_extensions(cli)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``qtasks`` script."""
    cli(args=argv, prog_name="qtasks")
