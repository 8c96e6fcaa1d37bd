"""The settings object and where its values come from.

:class:`QueueConfig` is one dataclass with every option the app and its components read.
:func:`load_config` fills it from, lowest precedence first: defaults, a file (``qtasks.toml``,
or ``[tool.qtasks]`` in ``pyproject.toml``), ``QTASKS_*`` environment variables, CLI flags and
keyword arguments in code. Every value is type-checked; an error names the file (or variable,
or flag), the key and the expected type, and an unknown key is an error.

Over ~500 lines: :class:`QueueConfig`'s fields with their documentation, and the one loader and
type check that every source (file, environment, flags, code) goes through.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import os
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import UnionType
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from qtasks.checks import check_priority
from qtasks.compat.config import BUILT_IN, RENAMED, QTasksConfigNames, warn_ignored
from qtasks.errors import ConfigError
from qtasks.masking import mask_url, masked_entry


@dataclass(slots=True)
class QueueConfig(QTasksConfigNames):
    """Every setting of a qtasks app. Unknown keys are an error, and every value is checked
    (type and range, see :func:`check_value`) however the config is built, in code too, and
    when a setting is changed afterwards.

    QTasks 1.7's field names are accepted as attributes too (``task_default_priority`` is
    ``default_priority``; see :mod:`qtasks.compat.config`)."""

    max_tasks_process: int = 10
    """Tasks one worker runs at once."""
    prefetch: int | None = None
    """Messages a worker holds beyond those running (bounded, so others are not starved).
    ``None``: one fifth of the worker's concurrency, at least 10 (see :meth:`prefetch_for`),
    held only while the worker's recent runs are short (:mod:`qtasks.hold`); a value given is
    always held."""
    default_priority: int = 0
    """Priority of tasks that set none; a lower number runs first."""
    result_ttl: float | None = 86400.0
    """Seconds a finished record is kept (``None``: forever)."""
    lease: float = 30.0
    """Seconds a delivery is owned by a worker before it is given to another; renewed while
    the task runs."""
    max_deliveries: int = 5
    """Deliveries (crashes included) before a message goes to the dead-letter queue; also how
    many times a component or plugin may fail on one message before it goes there."""
    dead_letter_ttl: float | None = 604800.0
    """Seconds a dead letter is kept (7 days, as Dramatiq; ``None``: until requeued or purged).
    Enforced by the broker when it dead-letters, and when dead letters are read."""
    max_dead_letters: int | None = 100_000
    """Most dead letters kept per queue, the oldest dropped first (``None``: no cap), so that a
    flood of poison messages cannot fill the broker."""
    retry: int = 0
    """Default retries for tasks that set none."""
    retry_backoff: float = 1.0
    """First retry delay in seconds; doubled per attempt, with jitter. Also the first delay of
    a message handed back after a component failed on it (see :mod:`qtasks.poison`)."""
    retry_backoff_max: float = 300.0
    """Upper bound of one retry delay."""
    shutdown_grace: float = 30.0
    """Seconds running tasks get to finish on shutdown before they are handed back."""
    start_timeout: float | None = None
    """Seconds a worker (``run_forever``, ``qtasks run``) waits for servers it cannot reach at
    start, trying again with back-off and a warning per attempt (see :mod:`qtasks.waiting`).
    ``None``: without limit, until they are up or it is stopped; ``0``: the error is raised
    at once. Refused credentials and configuration errors are never waited on; producers
    (``add_task``, ``app.start()``) do not wait."""
    heartbeat_interval: float = 5.0
    """Seconds between worker heartbeats in the GlobalConfig."""
    health_port: int | None = None
    """Port of the worker's health probe, ``/livez`` and ``/readyz`` over HTTP
    (:mod:`qtasks.health`; ``qtasks run --health-port``); ``None``: not served. ``0`` picks a
    free port (logged)."""
    health_host: str = "127.0.0.1"
    """Address the health probe listens on (``0.0.0.0`` for a probe from outside the host,
    such as Kubernetes'). It shows no task data: status, counts and the worker's id."""
    health_stall_limit: float = 60.0
    """Seconds the broker's consumer may go without an answer from the server while it tries
    to receive before ``/livez`` and ``/readyz`` answer 503 (alive but not consuming)."""
    loop_stall_warning: float | None = 1.0
    """Seconds a worker's event loop may be blocked (a blocking call inside ``async def``)
    before a watchdog thread logs which task blocks it and where; ``None`` turns it off."""
    max_message_size: int = 1 << 20
    """Largest encoded message in bytes; larger ones are refused at ``add_task``."""
    log_level: str = "INFO"
    broker: str = "memory"
    broker_url: str | None = None
    storage: str = "memory"
    storage_url: str | None = None
    global_config: str = "memory"
    global_config_url: str | None = None
    app: str | None = None
    """``module:attribute`` of the app (or a factory) for the CLI."""
    plugins_disabled: list[str] = field(default_factory=list)
    """Names of entry-point plugins not to load."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Component-specific options (``[tool.qtasks.extra]``), passed on to components."""

    def __setattr__(self, name: str, value: Any) -> None:
        # Built in code (QueueConfig(lease=0)), by replace(), or set afterwards (config.lease
        # = 0, config.task_default_priority = ...): checked as every other source. Settings
        # are written when a config is built, never on a task's path.
        if name in _FIELD_TYPES:
            object.__setattr__(
                self, name, check_value(name, _from_code(name, value), "QueueConfig")
            )
        else:
            QTasksConfigNames.__setattr__(self, name, value)  # QTasks 1.7 names (no super():
            # slots=True makes a new class)

    def prefetch_for(self, concurrency: int) -> int:
        """The prefetch of a worker running ``concurrency`` tasks at once: ``prefetch``, or
        when unset ``max(10, concurrency // 5)``, so that a busy worker with many slots has
        its next messages at hand while it claims more."""
        if self.prefetch is not None:
            return self.prefetch
        return max(10, concurrency // 5)

    def merged(self, **values: Any) -> QueueConfig:
        """A copy with ``values`` applied, checked like any other source."""
        checked = {k: check_value(k, v, "keyword argument") for k, v in values.items()}
        return replace(self, **checked)


_HINTS = get_type_hints(QueueConfig)
_FIELD_TYPES: dict[str, Any] = {f.name: _HINTS[f.name] for f in fields(QueueConfig)}
"""Each setting's type, evaluated from its annotation (``int | None`` is a real union)."""

MOVED: dict[str, str] = {
    "timers": (
        "qtasks-timer reads its timers from extra.timers: write [[extra.timers]] in "
        "qtasks.toml ([[tool.qtasks.extra.timers]] in pyproject.toml), "
        "QueueConfig(extra={'timers': [...]}) in code or QTASKS_EXTRA='{\"timers\": [...]}' "
        "in the environment"
    ),
}
"""Keys that were settings of the core and now belong to a component, with where they went:
refused with that hint."""

POSITIVE = frozenset(
    {
        "dead_letter_ttl",
        "max_dead_letters",
        "max_tasks_process",
        "result_ttl",
        "lease",
        "max_deliveries",
        "retry_backoff_max",
        "heartbeat_interval",
        "health_stall_limit",
        "loop_stall_warning",
        "max_message_size",
    }
)
"""Settings that must be a positive, finite number when set: zero, a negative number, nan or
inf is refused, naming the setting (``None`` turns the optional ones off)."""

NON_NEGATIVE = frozenset({"prefetch", "retry", "retry_backoff", "shutdown_grace", "start_timeout"})
"""Settings that must be a finite number of 0 or more: a negative number, nan or inf is
refused, naming the setting."""


def type_name(kind: Any) -> str:
    """``kind`` as written in an annotation (``int | None``, ``dict[str, Any]``), for messages."""
    if kind is type(None):
        return "None"
    if kind is Any:
        return "Any"
    origin, args = get_origin(kind), get_args(kind)
    if origin in (Union, UnionType):
        return " | ".join(type_name(arm) for arm in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(arg) for arg in args)}]"
    return str(kind.__name__)


def _non_none(kind: Any) -> tuple[Any, bool]:
    """``(the type without None, whether None is allowed)``; settings are ``T`` or ``T | None``."""
    if get_origin(kind) in (Union, UnionType):
        arms = [arm for arm in get_args(kind) if arm is not type(None)]
        if len(arms) == 1:
            return arms[0], len(arms) < len(get_args(kind))
    return kind, False


def _fits(value: Any, kind: Any) -> bool:
    """Whether ``value`` is of type ``kind`` (ints count as floats, bools as neither)."""
    if kind is Any:
        return True
    if kind is type(None):
        return value is None
    origin, args = get_origin(kind), get_args(kind)
    if origin in (Union, UnionType):
        return any(_fits(value, arm) for arm in args)
    if origin is list:
        return isinstance(value, list) and all(_fits(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items()
        )
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _from_code(key: str, value: Any) -> Any:
    """``value`` given in code as Python allows it for ``key``: a tuple for a list, a whole
    float for an int (``max_message_size=2e6``); anything else as it is."""
    base = _non_none(_FIELD_TYPES[key])[0]
    if type(value) is tuple and get_origin(base) is list:
        return list(value)
    if type(value) is float and base is int and value.is_integer():
        return int(value)
    return value


def is_default(key: str, value: object) -> bool:
    """Whether ``value`` is the setting ``key``'s default (a component's own option that
    differs from a default configuration overrules no choice: nobody is warned)."""
    default: object = getattr(_defaults(), key)
    return value == default


@functools.cache
def _defaults() -> QueueConfig:
    return QueueConfig()


def check_value(key: str, value: Any, source: str) -> Any:
    """Return ``value`` if it fits ``key``'s type (ints widen to floats), else raise."""
    if key not in _FIELD_TYPES:
        if key in MOVED:
            raise ConfigError(f"{source}: {key!r} is not a setting of the core: {MOVED[key]}")
        raise ConfigError(f"{source}: {_unknown_key(key)}")
    kind = _FIELD_TYPES[key]
    base, optional = _non_none(kind)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {key!r} must not be empty (expected {type_name(kind)})")
    if not _fits(value, base):
        raise ConfigError(
            f"{source}: {key!r} expects {type_name(kind)}, got {type(value).__name__} "
            f"{masked_entry(key, value)!r}"
        )
    if key in POSITIVE and not (math.isfinite(value) and value > 0):
        off = " (None turns it off)" if optional else ""
        raise ConfigError(
            f"{source}: {key!r} must be a positive, finite number{off}, got {value!r}"
        )
    if key in NON_NEGATIVE and not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{source}: {key!r} must be a finite number of 0 or more, got {value!r}")
    if key == "default_priority":
        return check_priority(value, f"{source}: 'default_priority'", ConfigError)
    if key == "health_port" and not 0 <= value <= 65535:
        raise ConfigError(f"{source}: 'health_port' must be a port number (0-65535), got {value!r}")
    return float(value) if base is float else value


_T = TypeVar("_T")


def own_option(key: str, value: _T | None, source: str) -> _T | None:
    """A component's own option standing for the setting ``key`` (``RedisBroker(lease=)``):
    ``None`` (unset, the configuration's holds) or checked as that setting is, so ``lease=0``,
    ``-1``, ``"5"``, nan or inf is a :class:`ConfigError` naming ``source`` and the option."""
    if value is None:
        return None
    checked: _T = check_value(key, value, source)  # its type kept, an int widened to float
    return checked


_SAME_AS = {"concurrency": "max_tasks_process", "worker_concurrency": "max_tasks_process"}
"""Keys that name a setting by another name (``qtasks run --concurrency``'s, Celery's)."""


def _unknown_key(key: str) -> str:
    """``unknown key 'brokr' (did you mean 'broker'?; known keys: ...)``."""
    close = [_SAME_AS[key]] if key in _SAME_AS else close_names(key, _FIELD_TYPES)
    meant = f"did you mean {' or '.join(map(repr, close))}?; " if close else ""
    return f"unknown key {key!r} ({meant}known keys: {', '.join(sorted(_FIELD_TYPES))})"


CLI_FLAGS = {"max_tasks_process": "--concurrency", "app": "--app"}
"""CLI flags whose name differs from the key they set (for source labels)."""

ENV_PREFIX = "QTASKS_"
CONFIG_ENV = "QTASKS_CONFIG"
"""Environment variable naming the configuration file to read (instead of searching)."""

_chosen_file: ContextVar[Path | None] = ContextVar("qtasks_config_file", default=None)


@contextmanager
def config_file(path: str | os.PathLike[str] | None) -> Iterator[None]:
    """Within the block, :func:`load_config` without a ``path`` reads ``path`` (before
    ``$QTASKS_CONFIG``); ``None`` changes nothing.

    How ``qtasks -c FILE`` reaches an app module that calls ``from_config()`` while the CLI
    imports it, without writing ``os.environ`` for the rest of the process."""
    token = _chosen_file.set(Path(path) if path is not None else _chosen_file.get())
    try:
        yield
    finally:
        _chosen_file.reset(token)


_command_flags: ContextVar[Mapping[str, Any] | None] = ContextVar(
    "qtasks_command_flags", default=None
)


@contextmanager
def command_flags(flags: Mapping[str, Any]) -> Iterator[None]:
    """Within the block, ``from_config`` takes ``flags`` (config keys; ``None``: not given)
    as command-line flags, under its own ``cli=`` (:func:`with_command_flags`).

    How ``qtasks run --broker-url URL`` reaches an app module that calls ``from_config()``
    while the CLI imports it: the app is built with the URL used, and what the configuration
    decides (a storage following the broker's URL) is logged once, with that URL. Applied
    after the import instead, it was logged twice: with the file's URL, then the flag's."""
    token = _command_flags.set(flags)
    try:
        yield
    finally:
        _command_flags.reset(token)


def with_command_flags(cli: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``cli`` over the flags of an enclosing :func:`command_flags` block (``None``: neither)."""
    flags = _command_flags.get()
    if flags is None:
        return None if cli is None else dict(cli)
    return {**flags, **{key: value for key, value in (cli or {}).items() if value is not None}}


@dataclass(slots=True)
class LoadedConfig:
    """The effective configuration and, per key, where its value came from."""

    config: QueueConfig
    sources: dict[str, str]
    """``default``, ``<file> [tool.qtasks]``, ``env QTASKS_X``, ``cli --flag`` or ``code``."""
    path: Path | None = None
    """The file that was read, if any."""


def find_config_file(directory: Path | None = None) -> tuple[Path, bool] | None:
    """The configuration file for ``directory`` (default: the working directory).

    ``qtasks.toml`` wins over ``pyproject.toml``; a ``pyproject.toml`` counts only when it has
    a ``[tool.qtasks]`` table, and one beside a ``qtasks.toml`` logs a warning (its settings
    are not read). Returns ``(path, is_pyproject)`` or ``None``."""
    base = directory or Path.cwd()
    own = base / "qtasks.toml"
    pyproject = base / "pyproject.toml"
    if own.is_file():
        if _has_qtasks_table(pyproject, strict=False):
            log.warning(
                "%s is read and [tool.qtasks] of %s is not (qtasks.toml wins): keep the "
                "settings in one of the two",
                own,
                pyproject,
            )
        return own, False
    if _has_qtasks_table(pyproject, strict=True):
        return pyproject, True
    return None


def _has_qtasks_table(pyproject: Path, *, strict: bool) -> bool:
    """Whether ``pyproject`` is a file with a ``[tool.qtasks]`` table; one that is not valid
    TOML raises :class:`ConfigError` when ``strict``, else counts as without."""
    if not pyproject.is_file():
        return False
    try:
        return "qtasks" in _read_toml(pyproject).get("tool", {})
    except ConfigError:
        if strict:
            raise
        return False


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc}") from exc


def read_config_file(path: Path) -> tuple[dict[str, Any], str]:
    """The checked values of a configuration file and its source label.

    ``pyproject.toml`` (any file of that name) is read from its ``[tool.qtasks]`` table; any
    other file from its top level. A setting's name found in ``[extra]`` or ``[extra.NAME]``
    logs a warning (the TOML pitfall of keys written after a sub-table)."""
    data = _read_toml(path)
    if path.name == "pyproject.toml":
        tool = data.get("tool", {})
        if not isinstance(tool, dict) or "qtasks" not in tool:
            # Named on purpose (-c, $QTASKS_CONFIG): the defaults instead would serve an
            # in-memory queue without a word.
            raise ConfigError(f"{path}: no [tool.qtasks] table (the settings live there)")
        table = tool["qtasks"]
        source, prefix = f"{path} [tool.qtasks]", "tool.qtasks."
    else:
        table = data
        source, prefix = str(path), ""
        _refuse_a_settings_table(table, path)
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: expected a table of settings")
    values = {k: check_value(k, v, source) for k, v in table.items()}
    _warn_settings_in_extra(values.get("extra", {}), path, prefix)
    _warn_mistyped_tables(values.get("extra", {}), path, prefix)
    return values, source


def _refuse_a_settings_table(data: dict[str, Any], path: Path) -> None:
    """A ``[tool.qtasks]`` (or ``[qtasks]``) table in a file other than ``pyproject.toml``,
    ``qtasks.toml`` say, copied from a pyproject: its settings are read from the top level
    there, so the error says that rather than "unknown key 'tool'"."""
    tool = data.get("tool")
    table = "tool.qtasks" if isinstance(tool, dict) and "qtasks" in tool else None
    if table is None and isinstance(data.get("qtasks"), dict):
        table = "qtasks"
    if table is not None:
        raise ConfigError(
            f"{path}: a [{table}] table: in {path.name} the settings are at the top level, "
            f'with no table header (broker = "redis"); [tool.qtasks] is pyproject.toml\'s'
        )


EXTRA_TABLES = frozenset({"timers"})
"""``extra`` tables read under a name other than their extension's (qtasks-timer's
``[[extra.timers]]``), for :func:`_warn_mistyped_tables`."""


def _warn_mistyped_tables(extra: dict[str, Any], path: Path, prefix: str) -> None:
    """Warn about an ``[extra.NAME]`` table that nothing installed reads but whose NAME is
    close to one that something does (``[extra.audti]`` for the plugin ``audit``): the
    extension reads its own table, finds none, and runs with its defaults without a word. A
    NAME close to none is left alone: a plugin added in code may read it."""
    from qtasks.discovery import GROUPS, installed_names

    known = set(EXTRA_TABLES).union(*(installed_names(kind) for kind in GROUPS))
    for name, table in extra.items():
        if name in known or not isinstance(table, dict | list):
            continue
        close = close_names(name, known)
        if close:
            log.warning(
                "%s: [%sextra.%s] is read by nothing installed; a typo of %s?",
                path,
                prefix,
                name,
                " or ".join(f"[{prefix}extra.{other}]" for other in close),
            )


def _warn_settings_in_extra(extra: dict[str, Any], path: Path, prefix: str) -> None:
    """Warn about a setting's name inside ``[extra]`` or ``[extra.NAME]``: in TOML every key
    after a ``[table]`` header belongs to that table, so a setting written below one is
    silently not a setting. (A warning, not an error: a plugin may use the same name.)"""
    tables = [("extra", extra)]
    tables += [(f"extra.{name}", sub) for name, sub in extra.items() if isinstance(sub, dict)]
    for table_name, table in tables:
        for key in table:
            if key in _FIELD_TYPES:
                log.warning(
                    "%s: %r is inside [%s%s], not a setting: in TOML every key after a [table] "
                    "header belongs to that table; move it above the first [table] if it is "
                    "meant as the setting",
                    path,
                    key,
                    prefix,
                    table_name,
                )


def parse_env_value(key: str, raw: str, source: str) -> Any:
    """Convert an environment string to ``key``'s type, then check it.

    Numbers are parsed; an empty string or ``none`` is ``None`` for optional keys; lists take
    JSON or comma-separated words; ``extra`` takes JSON."""
    if key not in _FIELD_TYPES:
        return check_value(key, raw, source)  # raises the unknown-key error
    kind = _FIELD_TYPES[key]
    base, optional = _non_none(kind)
    text = raw.strip()
    value: Any = raw
    if optional and text.lower() in ("", "none", "null"):
        value = None
    elif base is int:
        try:
            value = int(text)
        except ValueError:
            pass
    elif base is float:
        try:
            value = float(text)
        except ValueError:
            pass
    elif base == list[str] and not text.startswith("["):
        value = [part.strip() for part in text.split(",") if part.strip()]
    elif get_origin(base) in (list, dict):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: {key!r} expects JSON ({type_name(kind)}): {exc}") from exc
    return check_value(key, value, source)


def read_env(env: Mapping[str, str], referenced: Iterable[str] = ()) -> dict[str, tuple[Any, str]]:
    """Checked values of every ``QTASKS_<KEY>`` variable.

    A variable that is not a setting is left alone (logged at debug level) when the
    configuration names it in an ``"env:NAME"`` value (``referenced``, plus those in
    ``QTASKS_EXTRA``), or when it is ``QTASKS_<NAME>_...`` of an installed plugin or CLI
    extension ``NAME`` (``QTASKS_WEB_TOKEN`` of qtasks-web); any other unknown variable is an
    error. An extension's variable that is close to one the configuration names but that is
    not set (``QTASKS_WEB_TOKNE`` for ``env:QTASKS_WEB_TOKEN``) logs a warning naming both,
    never the value."""
    values: dict[str, tuple[Any, str]] = {}
    unknown: dict[str, str] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        key = name[len(ENV_PREFIX) :].lower()
        source = f"env {name}"
        if key in BUILT_IN:  # a QTasks 1.7 variable whose behaviour is built in
            warn_ignored(key, source)
            continue
        if key in RENAMED:  # a QTasks 1.7 name for a qtasks key
            key, convert = RENAMED[key]
            try:
                raw = str(convert(raw.strip()))
            except ValueError as exc:
                raise ConfigError(f"{source}: {exc}") from exc
        if key not in _FIELD_TYPES and key not in MOVED:
            unknown[name] = key
            continue
        values[key] = (parse_env_value(key, raw, source), source)
    if unknown:
        names = set(referenced) | env_references(values.get("extra", ({}, ""))[0])
        missing = {ref for ref in names if ref not in env}
        for name, key in unknown.items():
            _check_not_a_setting(name, key, names, missing)
    return values


def env_references(value: Any) -> set[str]:
    """The variables named by ``"env:NAME"`` strings anywhere in ``value`` (tables, lists)."""
    if isinstance(value, str):
        return {value[4:]} if value.startswith("env:") else set()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return set().union(*(env_references(item) for item in value))
    return set()


def close_names(name: str, known: Iterable[str]) -> list[str]:
    """Up to three of ``known`` that ``name`` is likely a typo of, closest first."""
    return difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.8)


def _check_not_a_setting(name: str, key: str, referenced: set[str], missing: set[str]) -> None:
    """Log why ``name`` (``QTASKS_<KEY>``, not a setting) is left alone, or raise.

    ``missing``: the variables the configuration names in ``env:`` values that are not set,
    which an extension's variable close to one of them is likely a typo of."""
    from qtasks.discovery import installed_names

    if name in referenced:
        log.debug("env %s is not a setting: the configuration reads it as an env: value", name)
        return
    namespace, sep, _ = key.partition("_")
    # A setting's first word (QTASKS_BROKER_URLL) is never an extension's namespace.
    ours = any(setting.partition("_")[0] == namespace for setting in _FIELD_TYPES)
    extensions = installed_names("plugin") | installed_names("cli")
    if sep and not ours and namespace in extensions:
        close = close_names(name, missing)
        if close:
            log.warning(
                "env %s is set but nothing reads it: the configuration reads %s, which is not "
                "set; a typo of %s?",
                name,
                ", ".join(f"env:{ref}" for ref in close),
                " or ".join(close),
            )
            return
        log.debug("env %s is not a setting: left to the extension %r", name, namespace)
        return
    hint = ""
    if sep and not ours:
        hint = (
            f"; a variable of an extension is named in an env: value of the configuration, or "
            f"is QTASKS_<NAME>_... of an installed plugin or CLI extension (installed: "
            f"{', '.join(sorted(extensions)) or 'none'})"
        )
    raise ConfigError(f"env {name}: {_unknown_key(key)}{hint}")


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    cli: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    directory: Path | None = None,
) -> LoadedConfig:
    """Build the effective configuration from every source, each checked.

    ``path`` names the file; without it the file of an enclosing :func:`config_file` block,
    then ``$QTASKS_CONFIG``, then :func:`find_config_file` in
    ``directory`` decide (no file is fine). ``env`` defaults to ``os.environ``. ``cli`` holds
    the flags given on the command line (``None`` values are skipped), ``overrides`` the
    keyword arguments given in code."""
    environ = os.environ if env is None else env
    config = QueueConfig()
    sources = dict.fromkeys(_FIELD_TYPES, "default")
    values: dict[str, Any] = {}

    file: Path | None = None
    chosen = _chosen_file.get()
    if path is not None:
        file = Path(path)
    elif chosen is not None:
        file = chosen
    elif environ.get(CONFIG_ENV):
        file = Path(environ[CONFIG_ENV])
    else:
        found = find_config_file(directory)
        file = found[0] if found else None
    if file is not None:
        if not file.is_file():
            raise ConfigError(f"{file}: configuration file not found")
        from_file, source = read_config_file(file)
        for key, value in from_file.items():
            values[key] = value
            sources[key] = source
    referenced = env_references(values) | env_references(dict(overrides or {}))
    for key, (value, source) in read_env(environ, referenced).items():
        values[key] = value
        sources[key] = source
    for key, value in (cli or {}).items():
        if value is None:
            continue
        flag = CLI_FLAGS.get(key, "--" + key.replace("_", "-"))
        values[key] = check_value(key, value, f"cli {flag}")
        sources[key] = f"cli {flag}"
    for key, value in (overrides or {}).items():
        values[key] = check_value(key, value, "keyword argument")
        sources[key] = "code"
    return LoadedConfig(replace(config, **values), sources, file)


log = logging.getLogger("qtasks.config")

_LEADERS: dict[str, tuple[str, ...]] = {
    "storage": ("broker",),
    "global_config": ("broker", "storage"),
}
"""Whom an unset storage or global config follows, first match wins: the broker's backend
when it provides one of that kind; a global config otherwise follows the storage."""


def follow_broker(
    loaded: LoadedConfig, *, said: LoadedConfig | None = None, constructor: bool = False
) -> LoadedConfig:
    """Make the storage and global config follow a remote broker when they are not set, and
    name the backend of a component given a URL but no name.

    A ``broker_url`` (``storage_url``, ``global_config_url``) set while ``broker`` was set
    by no source names the backend by its scheme, as ``QueueTasks(broker_url=...)`` does
    (:func:`~qtasks.discovery.backend_of_url`: ``redis://`` gives ``redis``, ``amqp://``
    ``rabbitmq``; source ``follows the scheme of broker_url``); a scheme qtasks does not know
    raises :class:`ConfigError`. Before, the URL was dropped and the in-memory default served,
    while a producer built from the same URL in code used Redis.

    A process-local storage behind a broker other processes share is almost never meant:
    results would stay in the worker's memory. So when the broker is remote (its class does
    not set ``local = True``) and ``storage`` was set by no source, the storage becomes the
    broker's backend if that backend provides a storage (``broker = "redis"`` gives
    ``storage = "redis"``), and its URL the broker's URL unless ``storage_url`` is set. The
    global config does the same, following the broker, else the storage. A backend without a
    component of that kind (RabbitMQ has no storage) raises :class:`ConfigError` naming the
    options to set; naming ``memory`` explicitly keeps the in-memory component.

    A component set explicitly to the broker's (or storage's) backend without a URL takes
    that URL too. Each decision is logged on ``qtasks.config``; a remote storage or global
    config left with no URL at all logs a warning naming the default address it uses.
    Passwords are masked in every message. Values an earlier call derived (source
    ``follows ...``) are derived again, so a changed broker URL carries over. ``said`` is
    that call's result, when its messages were logged: what would say the same again (the
    same value derived the same way, the same component still without a URL) is not logged
    twice, while what changed is. ``constructor``: ``loaded`` is a ``QueueConfig`` given to
    an app's constructor, which cannot tell ``storage="memory"`` from the default; the error
    for a backend without a follower says how to keep one in memory there."""
    from qtasks.discovery import installed_names, load

    config, sources = loaded.config, dict(loaded.sources)
    values: dict[str, Any] = {}
    defaults = QueueConfig()
    for key, source in loaded.sources.items():
        if source.startswith("follows "):  # derived earlier: derive again from the leaders
            values[key] = getattr(defaults, key)
            sources[key] = "default"

    def current(key: str) -> Any:
        return values[key] if key in values else getattr(config, key)

    def repeats(key: str, *also: str) -> bool:
        """Whether ``said`` derived ``key`` as it is now (and held ``also`` as they are)."""
        if said is None or said.sources.get(key) != sources[key]:
            return False
        return all(getattr(said.config, k) == current(k) for k in (key, *also))

    for component in ("broker", "storage", "global_config"):
        url_key = f"{component}_url"
        url = current(url_key)
        if url is not None and sources.get(component, "default") == "default":
            values[component] = _named_by_url(component, url, sources.get(url_key, "default"))
            sources[component] = f"follows the scheme of {url_key}"
            if not repeats(component, url_key):
                log.info(
                    "%s %r follows the scheme of %s %s",
                    component.replace("_", " "),
                    values[component],
                    url_key,
                    mask_url(url),
                )
    remote = {"broker": not getattr(load("broker", current("broker")), "local", False)}
    for kind in ("storage", "global_config"):
        url_key = f"{kind}_url"
        # Behind a local broker everything may stay in one process: nothing follows.
        leaders = [lead for lead in _LEADERS[kind] if remote["broker"] and remote.get(lead)]
        if sources.get(kind, "default") == "default" and leaders:
            names = installed_names(kind)
            leader = next((lead for lead in leaders if current(lead) in names), None)
            if leader is None:
                raise ConfigError(_no_follower(kind, current("broker"), names, constructor))
            values[kind] = current(leader)
            sources[kind] = f"follows {leader}"
            if not repeats(kind):
                log.info("%s %r follows the %s", kind.replace("_", " "), values[kind], leader)
        name, url = current(kind), current(url_key)
        for leader in leaders:
            lead_url = current(f"{leader}_url")
            if url is None and name == current(leader) and lead_url is not None:
                url = values[url_key] = lead_url
                sources[url_key] = f"follows {leader}_url"
                if not repeats(url_key):
                    log.info("%s %s follows %s_url", url_key, mask_url(url), leader)
        cls = load(kind, name)
        remote[kind] = not getattr(cls, "local", False)
        if remote[kind] and url is None and not _warned(said, kind, name):
            default = getattr(cls, "default_url", None)
            log.warning(
                "%s %r has no %s: it connects to %s",
                kind.replace("_", " "),
                name,
                url_key,
                mask_url(default) if isinstance(default, str) else "its default address",
            )
    return LoadedConfig(replace(config, **values), sources, loaded.path)


def _warned(said: LoadedConfig | None, kind: str, name: str) -> bool:
    """Whether the :func:`follow_broker` call that gave ``said`` warned that ``kind`` is
    ``name`` and has no URL (as it is again)."""
    if said is None:
        return False
    return getattr(said.config, kind) == name and getattr(said.config, f"{kind}_url") is None


def _named_by_url(kind: str, url: str, source: str) -> str:
    """The backend of ``kind`` that ``url``'s scheme names, for a URL set without a name
    (:func:`~qtasks.discovery.backend_of_url`, the rule ``QueueTasks(broker_url=...)``
    follows): a URL is never given to the in-memory default. A scheme qtasks does not know
    raises :class:`ConfigError` naming the key to set."""
    from qtasks.discovery import URL_SCHEMES, backend_of_url

    name = backend_of_url(url)
    if name is None:
        schemes = ", ".join(f"{scheme}://" for scheme in URL_SCHEMES)
        raise ConfigError(
            f"{source}: {kind}_url {mask_url(url)!r} is set but {kind} is not, and qtasks cannot "
            f"tell the backend from its scheme (it knows {schemes}): set {kind} to the name of "
            f"the component (--{kind.replace('_', '-')} NAME)"
        )
    return name


def _no_follower(kind: str, broker: str, installed: set[str], constructor: bool) -> str:
    flag = "--" + kind.replace("_", "-")
    keeps = "results" if kind == "storage" else "worker heartbeats and shared settings"
    if constructor:
        # A QueueConfig holds values, not where they came from: its "memory" may be the
        # default, left by accident (QueueConfig(broker="rabbitmq")), so it is not taken as
        # a choice; the component object, or from_config's keyword, says it is one.
        memory = "MemoryStorage" if kind == "storage" else "MemoryGlobalConfig"
        return (
            f"broker {broker!r} provides no {kind.replace('_', ' ')}, and a QueueConfig given "
            f"to the constructor cannot tell {kind}='memory' from one left unset: an in-memory "
            f"one would keep {keeps} inside one process. Name one ({kind}='redis', "
            f"{kind}_url='redis://HOST:6379/0'), or keep it in memory on purpose: pass "
            f"{kind}={memory}() (qtasks.memory) to the constructor, or build the app with "
            f"from_config({kind}='memory') (installed: {', '.join(sorted(installed))})"
        )
    return (
        f"broker {broker!r} provides no {kind.replace('_', ' ')} and none is set: an in-memory "
        f"one would keep {keeps} inside one process. Set {flag} NAME and {flag}-url URL (or "
        f"{kind} and {kind}_url in the configuration), e.g. {flag} redis {flag}-url "
        f"redis://HOST:6379/0, or {flag} memory to keep it in memory on purpose "
        f"(installed: {', '.join(sorted(installed))})"
    )
