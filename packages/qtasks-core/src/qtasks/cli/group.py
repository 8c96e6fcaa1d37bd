"""The ``qtasks`` typer app itself: its command classes, the options it takes before a command
(``-A``, ``-c``, ``--version``), how a command is registered, and the commands installed
distributions contribute (entry-point group ``qtasks.cli``), loaded when a command line is
parsed rather than when :mod:`qtasks.cli` is imported."""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import re
from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from qtasks.cli.options import AppOpt, Before, ConfigOpt, spread_options
from qtasks.discovery import load_cli_extensions
from qtasks.errors import QTasksError

log = logging.getLogger("qtasks.cli")
F = TypeVar("F", bound=Callable[..., Any])


def _plain_flags(params: Sequence[Any]) -> None:
    """Typer prints a flag's Python type in help (``--json <bool>``) though a flag takes no
    value; an empty metavar leaves that column blank."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""


NEGATIVE = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-inf(inity)?|-Infinity", re.ASCII)
"""A negative number as an argument: ``-5``, ``-2.5``, ``-.5``, ``-1e3``, ``-inf``."""


def negatives_as_arguments(params: Sequence[Any], args: list[str]) -> list[str]:
    """``args`` with its positional arguments after a ``--`` when one of them is a negative
    number (``qtasks add charge -5``), which click would take for an unknown option. Options
    keep their place before it; an option's value (``--priority -5``) is left to click,
    which takes it whatever it looks like. Anything unsure (an unknown option, a ``--``
    already there) leaves ``args`` as they are."""
    takes_value: dict[str, bool] = {}
    for param in params:
        if getattr(param, "param_type_name", None) == "option":
            for name in (*param.opts, *param.secondary_opts):
                takes_value[name] = not (param.is_flag or param.count)
    options: list[str] = []
    positionals: list[str] = []
    rest = iter(args)
    for arg in rest:
        if arg == "--":
            return args
        if NEGATIVE.fullmatch(arg) and arg not in takes_value:
            positionals.append(arg)
        elif arg.startswith("-") and len(arg) > 1:
            name = arg.partition("=")[0]
            if name not in takes_value:
                return args  # unknown, or short options run together: click says so
            options.append(arg)
            if takes_value[name] and "=" not in arg:
                options.append(next(rest, ""))
        else:
            positionals.append(arg)
    if not any(NEGATIVE.fullmatch(arg) for arg in positionals):
        return args
    return [*options, "--", *positionals]


class _Command(TyperCommand):
    """A command whose help shows flags without a value type, and whose positional arguments
    may be negative numbers without a ``--`` before them."""

    def get_params(self, ctx: Any) -> list[Any]:
        params: list[Any] = super().get_params(ctx)
        _plain_flags(params)
        return params

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, negatives_as_arguments(self.get_params(ctx), args))


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


def _extension_commands(builtin: set[str]) -> dict[str, Any]:
    """The commands of the ``qtasks.cli`` entry points, by entry-point name: a ``typer.Typer``
    becomes a group, a function a command. A name that a built-in command has is skipped."""
    holder = typer.Typer(
        add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="markdown"
    )
    names = []
    for name, obj in load_cli_extensions():
        if name in builtin:
            log.warning("CLI extension %r skipped: it would replace a built-in command", name)
        elif isinstance(obj, typer.Typer):
            holder.add_typer(obj, name=name, cls=_Group)
            names.append(name)
        elif callable(obj):
            holder.command(name=name, cls=_Command)(obj)
            names.append(name)
    if not names:
        return {}
    commands = typer.main.get_group(holder).commands
    return {name: commands[name] for name in names}


class _Root(_Group):
    """The ``qtasks`` group. The commands of installed distributions are loaded the first time
    it lists or resolves commands (``qtasks --help``, ``qtasks audit ...``), once per group:
    importing :mod:`qtasks.cli` imports no extension."""

    _extensions: dict[str, Any] | None = None

    def extensions(self) -> dict[str, Any]:
        if self._extensions is None:
            self._extensions = _extension_commands(set(self.commands))
        return self._extensions

    def list_commands(self, ctx: Any) -> list[str]:
        return [*super().list_commands(ctx), *self.extensions()]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in self.extensions():
            command = self.extensions()[cmd_name]
            _plain_flags(command.get_params(ctx))
        return command


cli = typer.Typer(
    name="qtasks",
    cls=_Root,
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
stats = typer.Typer(
    cls=_Group,
    help="QTasks' `stats` group: `qtasks stats inspect` is `qtasks inspect`.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
cli.add_typer(stats, name="stats")


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


class _Once(logging.Filter):
    """Lets each distinct record through once. A command reads the configuration more than
    once (for the ``app`` key, to build the app, for its own settings: ``qtasks web`` three
    times), and each read logged its warnings again."""

    def __init__(self) -> None:
        super().__init__()
        self._said: set[tuple[int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        said = (record.levelno, record.getMessage())
        if said in self._said:
            return False
        self._said.add(said)
        return True


def _handle_errors(func: F) -> F:
    """Print qtasks errors as one line on stderr and exit 1, instead of a traceback; while
    the command runs, each warning of reading the configuration is logged once
    (:class:`_Once`)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        once = _Once()
        config_log = logging.getLogger("qtasks.config")
        config_log.addFilter(once)
        try:
            return func(*args, **kwargs)
        except QTasksError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from exc
        finally:
            config_log.removeFilter(once)

    return wrapper  # type: ignore[return-value]


def shared_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` as a command of its own: the options annotated with
    :class:`~qtasks.cli.options.Place` or :class:`~qtasks.cli.options.Components` spread
    (:func:`~qtasks.cli.options.spread_options`) and qtasks errors printed as one line. For a
    command a distribution adds through the ``qtasks.cli`` entry point, so it takes the
    component flags as the built-in ones do (``qtasks web``)."""
    return _handle_errors(spread_options(func))


def command(group: typer.Typer, name: str | None = None) -> Callable[[F], F]:
    """Register a command of ``group``: shared options spread
    (:func:`~qtasks.cli.options.spread_options`), errors as one line, flags shown plainly."""

    def register(func: F) -> F:
        group.command(name, cls=_Command)(shared_options(func))
        return func

    return register
