"""The options the commands share, each declared once.

``-A/--app`` and ``-c/--config`` are the fields of :class:`Place`; the component flags
(``--broker``, ``--broker-url``, ``--storage``, ...) those of :class:`Components`, which adds
them to a place. A command asks for them with one parameter annotated with the class;
:func:`spread_options` puts the fields into the command's signature in that parameter's
position (so typer shows them as options, after the command) and gathers them back into one
object before the command runs, with ``-A`` and ``-c`` given before the command filled in.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Annotated, Any, get_type_hints

import typer

from qtasks.errors import ConfigError

AppOpt = Annotated[
    str | None,
    typer.Option(
        "--app",
        "-A",
        "-app",  # QTasks' spelling (one dash); without it click reads -a -p -p
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
ShowSecretsOpt = Annotated[
    bool,
    typer.Option(
        "--show-secrets",
        help="Show passwords and secret-named values as they are (default: ***).",
    ),
]
MetricsPortOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=65535,
        help="Serve Prometheus metrics from the worker on this port (loopback unless "
        "[extra.metrics] host says otherwise). Needs qtasks-web's metrics plugin.",
    ),
]


@dataclass(slots=True, frozen=True)
class Before:
    """``-A`` and ``-c`` given before the command (``qtasks -A tasks:app run``)."""

    app: str | None = None
    config: str | None = None


def chosen(
    ctx: typer.Context, app: str | None, config: str | None
) -> tuple[str | None, str | None]:
    """The app and configuration file of a command, given before or after it.

    Both places with different values is an error rather than a silent pick."""
    before = ctx.obj if isinstance(ctx.obj, Before) else Before()
    picked = []
    for flag, early, late in (
        ("-A/--app", before.app, app),
        ("-c/--config", before.config, config),
    ):
        if early is not None and late is not None and early != late:
            raise ConfigError(
                f"{flag} given twice with different values: {early!r} before the command and "
                f"{late!r} after it"
            )
        picked.append(late if late is not None else early)
    return picked[0], picked[1]


@dataclass(slots=True, frozen=True)
class Place:
    """Where a command finds its app: ``-A`` and ``-c``."""

    app: AppOpt = None
    config: ConfigOpt = None


@dataclass(slots=True, frozen=True)
class Components(Place):
    """A place and the component flags that override its configuration."""

    broker: Annotated[
        str | None, typer.Option(help="Broker by entry-point name (memory, redis, ...).")
    ] = None
    broker_url: Annotated[str | None, typer.Option(help="Broker URL.")] = None
    storage: Annotated[str | None, typer.Option(help="Storage by entry-point name.")] = None
    storage_url: Annotated[str | None, typer.Option(help="Storage URL.")] = None
    global_config: Annotated[
        str | None, typer.Option(help="Global config by entry-point name.")
    ] = None
    global_config_url: Annotated[str | None, typer.Option(help="Global config URL.")] = None

    def flags(self) -> dict[str, Any]:
        """The component flags as config keys (``None``: not given)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _PLACE}


_PLACE = {f.name for f in fields(Place)}
_CTX = "_qtasks_context"
"""The parameter through which a spread command receives typer's context."""


def spread_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` with each parameter annotated :class:`Place` (or a subclass) replaced, in the
    signature typer reads, by that class's fields; the wrapper gathers them into the object
    ``func`` receives (``-A``/``-c`` given before the command included)."""
    signature = inspect.signature(func, eval_str=True)
    gathered: dict[str, type[Place]] = {}
    params: list[inspect.Parameter] = []
    for param in signature.parameters.values():
        kind = param.annotation
        if not (isinstance(kind, type) and issubclass(kind, Place)):
            params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY))
            continue
        gathered[param.name] = kind
        hints = get_type_hints(kind, include_extras=True)
        params += [
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name]
            )
            for f in fields(kind)
        ]
    if not gathered:
        return func
    params.insert(
        0, inspect.Parameter(_CTX, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
    )

    def wrapper(**kwargs: Any) -> Any:
        ctx = kwargs.pop(_CTX)
        for name, kind in gathered.items():
            place = kind(**{f.name: kwargs.pop(f.name) for f in fields(kind)})
            app, config = chosen(ctx, place.app, place.config)
            kwargs[name] = replace(place, app=app, config=config)
        return func(**kwargs)

    wrapper.__name__ = func.__name__
    wrapper.__qualname__ = func.__qualname__
    wrapper.__doc__ = func.__doc__
    wrapper.__module__ = func.__module__
    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper
