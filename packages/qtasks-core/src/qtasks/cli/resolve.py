"""Finding the app a command works on, applying the command-line flags to it, and running a
coroutine against it.

The app comes from ``-A/--app module:attribute`` (the attribute may be an app or a factory
returning one; ``module`` alone means ``module:app``), else the ``app`` key of the
configuration, else, for commands that only talk to the components (``add``, ``get``,
``cancel``, ``inspect``, ``dlq``), an app built from configuration alone. The working
directory is put on ``sys.path`` first, so ``-A tasks:app`` finds ``./tasks.py``.
"""

from __future__ import annotations

import difflib
import importlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import anyio

from qtasks.app import AsyncQueueTasks
from qtasks.config import (
    CLI_FLAGS,
    LoadedConfig,
    check_value,
    command_flags,
    config_file,
    follow_broker,
    load_config,
)
from qtasks.discovery import Kind, build_component, load, name_of_class
from qtasks.errors import ConfigError, QTasksError
from qtasks.masking import masked, masked_error
from qtasks.sync import QueueTasks, apps_in
from qtasks.task import TaskDef

T = TypeVar("T")

AnyApp = AsyncQueueTasks | QueueTasks


def import_app(target: str) -> AnyApp:
    """Import ``module:attribute`` (``module`` means ``module:app``); call it if it is a
    factory. The working directory is importable."""
    module_name, _, attr = target.partition(":")
    attr = attr or "app"
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if "/" in module_name or os.sep in module_name:  # never in a module's name
        raise ConfigError(
            f"--app {target}: {module_name!r} is a path{_file_hint(module_name, attr)}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = _file_hint(module_name, attr) if module_name.endswith(".py") else ""
        hint = hint or _close_module(exc, module_name, attr)
        raise ConfigError(
            f"--app {target}: cannot import module {module_name!r}: {exc}{hint}"
        ) from exc
    except QTasksError:
        raise  # qtasks' own error (a bad configuration read by from_config) says it all
    except Exception as exc:
        raise _raised_in_app_code(target, f"importing {module_name!r}", exc) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            apps = apps_in(module)
            hint = _shadowed(module) or (f" (its apps: -A {module_name}:{apps[0]})" if apps else "")
            raise ConfigError(
                f"--app {target}: module {module_name!r} has no {attr!r}{hint}"
            ) from None
    if isinstance(obj, TaskDef):  # callable, but calling it runs the task's code here
        apps = apps_in(module, obj.app)
        hint = f" (-A {module_name}:{apps[0]})" if apps else ""
        raise ConfigError(
            f"--app {target}: {attr!r} is a task, not an app: name the app it belongs to{hint}"
        )
    if not isinstance(obj, AsyncQueueTasks | QueueTasks) and callable(obj):
        try:
            obj = obj()
        except QTasksError:
            raise
        except Exception as exc:
            raise _raised_in_app_code(target, f"calling {attr!r}", exc) from None
    if not isinstance(obj, AsyncQueueTasks | QueueTasks):
        raise ConfigError(
            f"--app {target}: expected a QueueTasks or AsyncQueueTasks app (or a factory "
            f"returning one), got {type(obj).__name__}"
        )
    return obj


def _file_hint(module_name: str, attr: str) -> str:
    """What to add to the error of an ``-A`` given as a file (``tasks.py``, ``shop/tasks.py``),
    as one may give it to ``python``: the module's dotted name it means."""
    path = module_name.removesuffix(".py").replace(os.sep, "/")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if path.startswith("/") or ".." in parts:  # not below the working directory
        return "; -A takes a module's dotted name, not a file, importable from here"
    return f"; -A takes a module's dotted name, not a file: -A {'.'.join(parts)}:{attr}"


def _close_module(exc: ImportError, module_name: str, attr: str) -> str:
    """For a top-level module that is not found (``-A taks:app``): the module of the working
    directory whose name is close to it."""
    if not isinstance(exc, ModuleNotFoundError) or exc.name != module_name or "." in module_name:
        return ""
    here = [f.removesuffix(".py") for f in os.listdir(os.getcwd()) if f.endswith(".py")]
    close = difflib.get_close_matches(module_name, here, n=1)
    return f" (did you mean -A {close[0]}:{attr}?)" if close else ""


def _shadowed(module: Any) -> str:
    """What to add to "module has no app" when the module imported is not the user's file of
    that name: ``queue.py`` in the working directory loses to the standard library's
    ``queue`` (imported before the working directory is on the path, or a built-in)."""
    name = module.__name__
    base = os.path.join(os.getcwd(), *name.split("."))
    own = base + ".py" if os.path.isfile(base + ".py") else base + os.sep
    if not os.path.exists(own):
        return ""
    where = getattr(module, "__file__", None)
    if where and os.path.realpath(where).startswith(os.path.realpath(own).removesuffix(os.sep)):
        return ""  # the user's own file: it just lacks the attribute
    top = name.partition(".")[0]
    kind = "the standard library's" if top in sys.stdlib_module_names else "another"
    return (
        f": {kind} module {name!r} ({where or 'built in'}) was imported, not {own}; "
        "rename your module"
    )


def _raised_in_app_code(target: str, doing: str, exc: Exception) -> ConfigError:
    """The one-line error for the app's own code raising while ``-A`` loads it (not an
    ``ImportError``: a ``RuntimeError``, a ``SyntaxError``): the exception, masked, and the
    file and line of its deepest frame (a ``SyntaxError``'s text names them), so the user
    knows where to look without a traceback of qtasks' own frames."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    if isinstance(exc, SyntaxError):  # its text names its file and line; its frame is ours
        where = ""
    return ConfigError(f"--app {target}: {doing} raised {masked_error(exc)}{where}")


def aio_of(app: AnyApp) -> AsyncQueueTasks:
    return app.aio if isinstance(app, QueueTasks) else app


def apply_flags(app: AnyApp, flags: dict[str, Any]) -> None:
    """Apply command-line ``flags`` (config keys; ``None`` = not given) to an app that has
    not started: the config is replaced, and components whose name or URL changed are rebuilt
    through discovery. Keys the code set through ``from_config`` keyword arguments win.

    A storage or global config that neither the flags nor the app's configuration set, and
    that the app holds in memory, follows a remote broker (:func:`~qtasks.config.follow_broker`);
    a component object the app's code built stays. A URL flag for such an object (one whose
    class is not what its configured name builds) raises :class:`ConfigError` unless its
    name is given too: it would be rebuilt without what its constructor was given."""
    aio = aio_of(app)
    # What building the app from its configuration derived and logged (from_config, or a
    # config naming components): deriving again with the flags logs only what they change.
    said = LoadedConfig(aio.config, dict(aio.config_sources)) if aio.config_sources else None
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
    kinds: tuple[Kind, ...] = ("broker", "storage", "global_config")
    for kind in kinds:
        if f"{kind}_url" in given and kind not in given:
            _check_built_from_config(aio, kind)
    old = aio.config
    sources = dict(aio.config_sources)
    for kind in ("storage", "global_config"):
        if not getattr(getattr(aio, kind), "local", False):
            sources.setdefault(kind, "app (constructor)")  # built in code: it stays
    followed = follow_broker(LoadedConfig(replace(old, **given), sources), said=said)
    aio.config = followed.config
    for key in ("broker", "storage", "storage_url", "global_config", "global_config_url"):
        source = followed.sources.get(key, "default")
        if source.startswith("follows "):
            aio.config_sources[key] = source
        elif source == "default":
            aio.config_sources.pop(key, None)
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


def _built_in_code(aio: AsyncQueueTasks, kind: Kind) -> bool:
    """Whether the app's ``kind`` component is an object its code built, not what its
    configured name builds (``QueueTasks(broker=RedisBroker(url))``)."""
    factory = load(kind, getattr(aio.config, kind))
    return isinstance(factory, type) and type(getattr(aio, kind)) is not factory


def _check_built_from_config(aio: AsyncQueueTasks, kind: Kind) -> None:
    """Refuse a URL flag for a component the app's code built: a URL flag rebuilds the
    component by the name its configuration holds, and for an object passed in code that
    name is still the default (``memory``), so the flag swapped a Redis broker for an
    in-memory one without a word. Rebuilding it by its own class's entry-point name would
    drop what its constructor was given (``RedisBroker(url, queue="mail")``): the error names
    that name, to be given on purpose with ``--broker``."""
    component = getattr(aio, kind)
    if not _built_in_code(aio, kind):
        return  # built by that name (a factory's product cannot be told: it is let through)
    label, flag = kind.replace("_", " "), "--" + kind.replace("_", "-")
    actual = name_of_class(kind, type(component))
    rebuild = (
        f"give {flag} {actual} too to build a new one from the configuration (what the code "
        f"gave its constructor is not kept)"
        if actual is not None
        else f"no installed {label} is a {type(component).__name__}, so it cannot be rebuilt "
        f"from the configuration; name one with {flag} NAME"
    )
    raise ConfigError(
        f"{flag}-url: the app's {label} ({type(component).__name__}) was built in code, and a "
        f"URL flag cannot change the URL of an object: {rebuild}, or set the URL in the code"
    )


def resolve_app(
    target: str | None, config_path: str | None, flags: dict[str, Any], *, need_tasks: bool
) -> AnyApp:
    """The app a command works on (see the module docstring).

    ``config_path`` is the file read for the ``app`` key and, while the app module is
    imported, by its ``from_config()`` (:func:`~qtasks.config.config_file`), which takes
    ``flags`` as its command-line flags (:func:`~qtasks.config.command_flags`); they are
    applied again after (:func:`apply_flags`) for an app built otherwise."""
    # The file and the flags reach what the app module's from_config() reads while imported.
    with config_file(config_path), command_flags(flags):
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
        warn_unread_config(app, target, config_path, flags)
    apply_flags(app, flags)
    return app


def warn_unread_config(
    app: AnyApp, target: str, config_path: str | None, flags: dict[str, Any] | None = None
) -> None:
    """Warn when the configuration file or ``QTASKS_*`` variables set values that the app
    ``target`` names does not have: an app built with its constructor (``QueueTasks(...)``)
    takes its configuration from code only, so a ``qtasks.toml`` saying ``broker = "redis"``
    would otherwise leave ``qtasks run`` serving an in-memory queue without a word.

    Keys given as flags (applied next) or set in code through ``from_config`` keyword
    arguments, and the ``app`` key, are left out, and so are the broker, storage and global
    config keys of a component the code built as an object; values are masked as ``qtasks
    config`` masks them. A configuration that cannot be read is said for an app built with
    its constructor (nothing else reads it); for an app built from configuration, the command
    that read it said so. What reading it logs (its own warnings) is not repeated."""
    aio = aio_of(app)
    config_log = logging.getLogger("qtasks.config")
    # What reading it says was said when the command read it. Disabled rather than
    # filtered: the command's own filter (qtasks.cli.group._Once) must not count these
    # records as said.
    was_disabled, config_log.disabled = config_log.disabled, True
    try:
        loaded = load_config(config_path)
    except ConfigError as exc:
        if not aio.config_sources:  # built with its constructor: nothing else reads it
            logging.getLogger("qtasks.cli").warning(
                "the configuration cannot be read (%s); the app %s, built in code, does not use it",
                masked_error(exc),
                target,
            )
        return
    finally:
        config_log.disabled = was_disabled
    given = {key for key, value in (flags or {}).items() if value is not None}
    for kind in ("broker", "storage", "global_config"):
        if _built_in_code(aio, kind):  # an object the code built: its own settings hold
            given.update((kind, f"{kind}_url"))
    unread = [
        (key, source)
        for key, source in loaded.sources.items()
        if key != "app"
        and key not in given
        and source != "default"
        and aio.config_sources.get(key) not in (source, "code")
        and getattr(loaded.config, key) != getattr(aio.config, key)
    ]
    if not unread:
        return
    listed = "; ".join(
        f"{key} = {json.dumps(masked(getattr(loaded.config, key)), default=str)} "
        f"({source}; the app has {json.dumps(masked(getattr(aio.config, key)), default=str)})"
        for key, source in unread
    )
    why = (
        "An app built with its constructor, QueueTasks(...), takes its configuration from code "
        "only; build it with QueueTasks.from_config() to read the file and QTASKS_* variables"
        if not aio.config_sources
        else "It was built from another configuration (from_config with another file?)"
    )
    logging.getLogger("qtasks.cli").warning(
        "the app %s does not use these settings of the configuration: %s. %s, or give them as "
        "flags",
        target,
        listed,
        why,
    )


_KIND_LABEL = {"broker": "broker", "storage": "storage", "global_config": "global config"}


def refuse_local(aio: AsyncQueueTasks, command: str, uses: Sequence[str]) -> None:
    """Raise :class:`ConfigError` when ``aio`` has not started and holds one of the
    components ``uses`` in process memory: ``qtasks command`` would work on a queue or
    records that exist only for the lifetime of this command, shared with no worker."""
    local = [kind for kind in uses if getattr(getattr(aio, kind), "local", False)]
    if not local or aio.started:
        return
    labels = [f"{_KIND_LABEL[k]} ({type(getattr(aio, k)).__name__})" for k in local]
    names = " and ".join([", ".join(labels[:-1]), labels[-1]] if len(labels) > 1 else labels)
    raise ConfigError(
        f"qtasks {command} cannot work with the {names}: in-memory components live only "
        f"in this command's process, so what it sees or writes disappears when it exits "
        f"and no worker shares it. Name a shared backend, e.g. --broker redis --broker-url "
        f"redis://HOST:6379/0 (or broker and broker_url in the configuration)"
    )


def run_on(
    app: AnyApp,
    func: Callable[[AsyncQueueTasks], Awaitable[T]],
    *,
    command: str = "",
    uses: Sequence[str] = (),
) -> T:
    """Run ``func(async_app)`` in the app's loop, the app started first if it is not (so
    ``func`` may use the components directly, not only through the app's methods, which
    start it themselves); an app this call started is closed after.

    A sync app runs it through its own portal, so the CLI also works on an app that a
    surrounding program (or a test) is serving in the same process. An app that is not
    running yet and holds one of the components ``uses`` in process memory is refused
    (:func:`refuse_local`)."""
    aio = aio_of(app)
    was_started = aio.started
    refuse_local(aio, command, uses)

    async def started() -> T:
        if not aio.started:
            await aio.start()
        return await func(aio)

    if isinstance(app, QueueTasks):
        try:
            return app.portal.call(started)
        finally:
            if not was_started:
                app.close()

    async def main() -> T:
        try:
            return await started()
        finally:
            if not was_started:
                await aio.aclose()

    return anyio.run(main)
