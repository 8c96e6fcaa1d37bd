"""The ``qtasks`` command line (also ``python -m qtasks``).

Every command finds the app the same way: ``-A/--app module:attribute`` (the attribute may be
an app or a factory returning one; ``module`` alone means ``module:app``), else the ``app`` key
of the configuration, else, for commands that only talk to the components (``add``, ``get``,
``cancel``, ``inspect``, ``dlq``), an app built from configuration alone. The working directory
is put on ``sys.path`` first, so ``-A tasks:app`` finds ``./tasks.py``. ``-A`` and
``-c/--config`` go before the command (``qtasks -A tasks:app run``, as with QTasks and Celery)
or after it.

Flags given on the command line override the app's configuration (files and ``QTASKS_*``
variables), except values the code set as keyword arguments of ``from_config``.
Commands contributed by installed distributions (entry-point group ``qtasks.cli``) are added
under their entry-point name.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime
from typing import Annotated, Any, ParamSpec, TypeVar

import anyio
import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from qtasks.app import AsyncQueueTasks
from qtasks.clash import other_qtasks
from qtasks.config import (
    CLI_FLAGS,
    LoadedConfig,
    QueueConfig,
    check_value,
    follow_broker,
    load_config,
    mask_url,
)
from qtasks.discovery import (
    Kind,
    build_component,
    check_plugins,
    discover_all,
    load_cli_extensions,
)
from qtasks.errors import ConfigError, QTasksError, TaskTimeoutError
from qtasks.plugins import hookimpl
from qtasks.record import TaskRecord, TaskStatus
from qtasks.sync import QueueTasks

P = ParamSpec("P")
T = TypeVar("T")

AnyApp = AsyncQueueTasks | QueueTasks


def _plain_flags(params: Sequence[Any]) -> None:
    """Typer prints a flag's Python type in help (``--json <bool>``) though a flag takes no
    value; an empty metavar leaves that column blank."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""


class _Command(TyperCommand):
    """A command whose help shows flags without a value type."""

    def get_params(self, ctx: Any) -> list[Any]:
        params: list[Any] = super().get_params(ctx)
        _plain_flags(params)
        return params


class _Group(TyperGroup):
    """A command group whose help, and that of every command it resolves (extensions
    included), shows flags without a value type."""

    def get_params(self, ctx: Any) -> list[Any]:
        params: list[Any] = super().get_params(ctx)
        _plain_flags(params)
        return params

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _plain_flags(command.get_params(ctx))
        return command


cli = typer.Typer(
    name="qtasks",
    cls=_Group,
    help="qtasks: run workers, enqueue and inspect tasks, list plugins and configuration.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
dlq = typer.Typer(
    cls=_Group,
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
        help="The app as module:attribute (an app or a factory). Default: `app` in config. "
        "Also accepted before the command.",
    ),
]
ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config",
        "-c",
        help="Configuration file (qtasks.toml or pyproject.toml). Default: $QTASKS_CONFIG, "
        "else ./qtasks.toml, else [tool.qtasks] of ./pyproject.toml. Also accepted before "
        "the command.",
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


@dataclass(slots=True, frozen=True)
class Before:
    """``-A`` and ``-c`` given before the command (``qtasks -A tasks:app run``)."""

    app: str | None = None
    config: str | None = None


def _version(value: bool) -> None:
    if value:
        name = "qtasks-core"
        typer.echo(f"{name} {importlib.metadata.version(name)}")
        raise typer.Exit()


@cli.callback()
def main_options(
    ctx: typer.Context,
    app: AppOpt = None,
    config: ConfigOpt = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """qtasks: run workers, enqueue and inspect tasks, list plugins and configuration."""
    ctx.obj = Before(app, config)


def _targets(
    ctx: typer.Context, app: str | None, config: str | None
) -> tuple[str | None, str | None]:
    """The app and configuration file of a command, given before or after it.

    Both places with different values is an error rather than a silent pick."""
    before = ctx.obj if isinstance(ctx.obj, Before) else Before()
    chosen = []
    for flag, early, late in (
        ("-A/--app", before.app, app),
        ("-c/--config", before.config, config),
    ):
        if early is not None and late is not None and early != late:
            raise ConfigError(
                f"{flag} given twice with different values: {early!r} before the command and "
                f"{late!r} after it"
            )
        chosen.append(late if late is not None else early)
    return chosen[0], chosen[1]


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
    through discovery. Keys the code set through ``from_config`` keyword arguments win.

    A storage or global config that neither the flags nor the app's configuration set, and
    that the app holds in memory, follows a remote broker (:func:`~qtasks.config.follow_broker`);
    a component object the app's code built stays."""
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
    old = aio.config
    sources = dict(aio.config_sources)
    for kind in ("storage", "global_config"):
        if not getattr(getattr(aio, kind), "local", False):
            sources.setdefault(kind, "app (constructor)")  # built in code: it stays
    followed = follow_broker(LoadedConfig(replace(old, **given), sources))
    aio.config = followed.config
    for key in ("storage", "storage_url", "global_config", "global_config_url"):
        source = followed.sources.get(key, "default")
        if source.startswith("follows "):
            aio.config_sources[key] = source
        elif source == "default":
            aio.config_sources.pop(key, None)
    kinds: tuple[Kind, ...] = ("broker", "storage", "global_config")
    for kind in kinds:
        url = f"{kind}_url"
        changed = (getattr(aio.config, kind), getattr(aio.config, url)) != (
            getattr(old, kind),
            getattr(old, url),
        )
        if kind in given or url in given or changed:
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


_KIND_LABEL = {"broker": "broker", "storage": "storage", "global_config": "global config"}


def run_on(
    app: AnyApp,
    func: Callable[[AsyncQueueTasks], Awaitable[T]],
    *,
    command: str = "",
    uses: Sequence[str] = (),
) -> T:
    """Run ``func(async_app)`` in the app's loop; an app this call started is closed after.

    A sync app runs it through its own portal, so the CLI also works on an app that a
    surrounding program (or a test) is serving in the same process. An app that is not
    running yet and holds one of the components ``uses`` in process memory is refused with a
    :class:`ConfigError`: ``command`` would work on a queue or records that exist only for
    the lifetime of this command."""
    aio = _aio(app)
    was_started = aio.started
    local = [kind for kind in uses if getattr(getattr(aio, kind), "local", False)]
    if local and not was_started:
        labels = [f"{_KIND_LABEL[k]} ({type(getattr(aio, k)).__name__})" for k in local]
        names = " and ".join([", ".join(labels[:-1]), labels[-1]] if len(labels) > 1 else labels)
        raise ConfigError(
            f"qtasks {command} cannot work with the {names}: in-memory components live only "
            f"in this command's process, so what it sees or writes disappears when it exits "
            f"and no worker shares it. Name a shared backend, e.g. --broker redis --broker-url "
            f"redis://HOST:6379/0 (or broker and broker_url in the configuration)"
        )
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


def _local_time(timestamp: float) -> str:
    """A unix timestamp as ISO 8601 in local time, with its UTC offset."""
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="milliseconds")


def _print_record(record: TaskRecord, as_json: bool) -> None:
    """``key: value`` lines (times in local ISO 8601), or JSON (times as unix seconds)."""
    data = _record_dict(record)
    if as_json:
        typer.echo(_json(data))
        return
    for key, value in data.items():
        if value in (None, [], {}) and key not in ("returning",):
            continue
        if key.endswith("_at") and isinstance(value, int | float):
            shown: Any = _local_time(value)
        elif isinstance(value, list | dict):
            shown = json.dumps(value, default=str)
        else:
            shown = value
        typer.echo(f"{key}: {shown}")


def _parse_arg(raw: str) -> Any:
    """A positional CLI argument: JSON when it parses (``5``, ``"x"``, ``[1,2]``), else text."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


# --- commands -------------------------------------------------------------------------------


class _ServingLog:
    """Logs "serving ..." once the worker listens, so a component that cannot start (Redis
    unreachable) is never preceded by a claim that the app serves."""

    @hookimpl
    def qtasks_broker_listening(self, app: AsyncQueueTasks) -> None:
        logging.getLogger("qtasks.cli").info(
            "serving %r: %d tasks, concurrency %d; broker %s%s, storage %s%s, global config %s%s",
            app.name,
            len(app.tasks),
            app.config.max_tasks_process,
            *_where(app, "broker"),
            *_where(app, "storage"),
            *_where(app, "global_config"),
        )


def _where(app: AsyncQueueTasks, kind: str) -> tuple[str, str]:
    """A component's class and, when remote and configured, its URL (password masked)."""
    component = getattr(app, kind)
    url = None if getattr(component, "local", False) else getattr(app.config, f"{kind}_url")
    return type(component).__name__, f" at {mask_url(url)}" if url else ""


@cli.command(cls=_Command)
@_handle_errors
def run(
    ctx: typer.Context,
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
    app, config = _targets(ctx, app, config)
    flags = {
        **component_flags(
            broker, broker_url, storage, storage_url, global_config, global_config_url
        ),
        "max_tasks_process": concurrency,
        "log_level": log_level,
    }
    # Logging first, so that what configuration decides (a storage following the broker, a
    # default address) is shown; the configured level applies once the app is known.
    early = (log_level or "INFO").upper()
    logging.basicConfig(
        level=early if early in logging.getLevelNamesMapping() else "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    the_app = resolve_app(app, config, flags, need_tasks=True)
    aio = _aio(the_app)
    level = aio.config.log_level.upper()
    if level not in logging.getLevelNamesMapping():
        raise ConfigError(f"log_level: unknown level {aio.config.log_level!r}")
    logging.getLogger().setLevel(level)
    aio.add_plugin(_ServingLog(), "qtasks.cli")
    aio.run_forever()
    logging.getLogger("qtasks.cli").info("stopped")


@cli.command(cls=_Command)
@_handle_errors
def add(
    ctx: typer.Context,
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
    app, config = _targets(ctx, app, config)
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

    record = run_on(the_app, go, command="add", uses=("broker", "storage"))
    if wait is None:
        typer.echo(_json(_record_dict(record)) if as_json else record.uuid)
        return
    _print_record(record, as_json)
    if record.status is not TaskStatus.SUCCESS:
        raise typer.Exit(1)


@cli.command(cls=_Command)
@_handle_errors
def get(
    ctx: typer.Context,
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
    app, config = _targets(ctx, app, config)
    the_app = resolve_app(
        app,
        config,
        component_flags(broker, broker_url, storage, storage_url, global_config, global_config_url),
        need_tasks=False,
    )

    async def go(aio: AsyncQueueTasks) -> TaskRecord | None:
        return await aio.get(uuid)

    record = run_on(the_app, go, command="get", uses=("storage",))
    if record is None:
        typer.echo(f"error: no task record for uuid {uuid!r}", err=True)
        raise typer.Exit(1)
    _print_record(record, as_json)


@cli.command(cls=_Command)
@_handle_errors
def cancel(
    ctx: typer.Context,
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
    app, config = _targets(ctx, app, config)
    the_app = resolve_app(
        app,
        config,
        component_flags(broker, broker_url, storage, storage_url, global_config, global_config_url),
        need_tasks=False,
    )

    async def go(aio: AsyncQueueTasks) -> TaskRecord | None:
        return await aio.cancel(uuid, reason)

    record = run_on(the_app, go, command="cancel", uses=("broker", "storage"))
    if record is None:
        typer.echo(f"error: no task record for uuid {uuid!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{record.uuid}: {record.status.value}")


@cli.command(cls=_Command)
@_handle_errors
def inspect(
    ctx: typer.Context,
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
    app, config = _targets(ctx, app, config)
    the_app = resolve_app(
        app,
        config,
        component_flags(broker, broker_url, storage, storage_url, global_config, global_config_url),
        need_tasks=False,
    )
    report = run_on(
        the_app,
        AsyncQueueTasks.inspect,
        command="inspect",
        uses=("broker", "storage", "global_config"),
    )
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


stats = typer.Typer(
    cls=_Group,
    help="QTasks' `stats` group: `qtasks stats inspect` is `qtasks inspect`.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
cli.add_typer(stats, name="stats")


@stats.command("inspect", cls=_Command)
@_handle_errors
def stats_inspect(
    ctx: typer.Context,
    what: Annotated[
        list[str] | None,
        typer.Argument(
            help="QTasks' words (`app`, `tasks`, `task NAME`, `json=true`): the whole report "
            "is shown either way; `json=true` is `--json`."
        ),
    ] = None,
    app: AppOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Alias of `qtasks inspect`, as QTasks 1.7 spelled it (`stats inspect app|tasks|task`)."""
    words = [w.lower() for w in what or []]
    json_words = {"json=true", "json=1", "json=yes"}
    unknown = [w for w in words if w not in {"app", "tasks", "task", *json_words}]
    if unknown and "task" not in words:
        raise ConfigError(f"stats inspect: unknown word(s) {unknown} (app, tasks, task NAME)")
    inspect(
        ctx,
        app=app,
        config=config,
        broker=None,
        broker_url=None,
        storage=None,
        storage_url=None,
        global_config=None,
        global_config_url=None,
        as_json=as_json or bool(json_words & set(words)),
    )


@dlq.command("list", cls=_Command)
@_handle_errors
def dlq_list(
    ctx: typer.Context,
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
    app, config = _targets(ctx, app, config)
    the_app = resolve_app(
        app,
        config,
        component_flags(broker, broker_url, storage, storage_url, global_config, global_config_url),
        need_tasks=False,
    )

    async def go(aio: AsyncQueueTasks) -> list[Any]:
        return list(await aio.dead_letters(limit))

    letters = run_on(the_app, go, command="dlq list", uses=("broker",))
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


@dlq.command("requeue", cls=_Command)
@_handle_errors
def dlq_requeue(
    ctx: typer.Context,
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
    force: Annotated[
        bool,
        typer.Option("--force", help="Also requeue dead letters whose task already succeeded."),
    ] = False,
) -> None:
    """Publish dead letters again (all, or the given IDS) and print how many.

    Their records are reset to status new, so a worker runs them again. A dead letter whose
    task record says success is left where it is unless --force is given.
    """
    app, config = _targets(ctx, app, config)
    the_app = resolve_app(
        app,
        config,
        component_flags(broker, broker_url, storage, storage_url, global_config, global_config_url),
        need_tasks=False,
    )

    async def go(aio: AsyncQueueTasks) -> tuple[int, int]:
        chosen = list(ids) if ids else None
        letters = await aio.dead_letters(limit=1_000_000)
        wanted = sum(1 for d in letters if chosen is None or d.id in chosen)
        requeued = await aio.requeue_dead_letters(chosen, force=force)
        return requeued, max(wanted - requeued, 0)

    requeued, kept = run_on(the_app, go, command="dlq requeue", uses=("broker", "storage"))
    typer.echo(f"requeued {requeued}")
    if kept:
        typer.echo(
            f"kept {kept}: unknown ids, or tasks that already succeeded (--force runs those again)",
            err=True,
        )


@cli.command(cls=_Command)
@_handle_errors
def plugins(ctx: typer.Context, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List installed components, plugins and CLI extensions.

    Each entry point of the qtasks.* groups with its distribution and version. A plugin's
    state is enabled, disabled (plugins_disabled of the configuration file) or failed: it
    does not import, cannot be built, or names an unknown hook; the reasons follow the table
    and the exit code is 1. (-A is accepted but not needed: plugins load by entry point.)
    A warning names the unrelated 'qtasks' distribution when it is installed here too.
    """
    _, config = _targets(ctx, None, config)
    loaded = load_config(config).config
    disabled = set(loaded.plugins_disabled)
    problems = check_plugins(loaded)
    rows = []
    for item in discover_all():
        state = ""
        if item.kind == "plugin":
            state = "disabled" if item.name in disabled or "*" in disabled else "enabled"
            state = "failed" if item.name in problems else state
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
        rows.append(row)
    if as_json:
        typer.echo(_json(rows))
    else:
        headers = ["kind", "name", "distribution", "version", "object", "state"]
        typer.echo(_table(headers, [[r[h] for h in headers] for r in rows]))
        for name, problem in sorted(problems.items()):
            typer.echo(
                f"error: {problem}; fix or uninstall it, or add {name!r} to plugins_disabled",
                err=True,
            )
    clash = other_qtasks()
    if clash:
        typer.echo(f"warning: {clash}", err=True)
    if problems:
        raise typer.Exit(1)


@cli.command("config", cls=_Command)
@_handle_errors
def show_config(
    ctx: typer.Context, app: AppOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False
) -> None:
    """Show the effective configuration and where each value came from.

    Sources: default, the file, an environment variable, a cli flag, code, or "follows broker"
    (a storage or global config left unset follows a remote broker). With -A, the
    configuration of that app.
    """
    app, config = _targets(ctx, app, config)
    if app is not None:
        aio = _aio(import_app(app))
        values = {f.name: getattr(aio.config, f.name) for f in fields(QueueConfig)}
        sources = {k: aio.config_sources.get(k, "app (constructor)") for k in values}
    else:
        loaded = follow_broker(load_config(config))
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
            target.add_typer(obj, name=name, cls=_Group)
        elif callable(obj):
            target.command(name=name, cls=_Command)(obj)


_add_extensions(cli)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``qtasks`` script."""
    cli(args=argv, prog_name="qtasks")
