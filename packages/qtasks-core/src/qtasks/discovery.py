"""Entry-point discovery: components, plugins and CLI commands from installed distributions.

Discovery never depends on import names. A distribution declares what it provides in one of
the groups below, and qtasks finds it by name (``broker="redis"``)::

    [project.entry-points."qtasks.brokers"]
    redis = "qtasks_redis:RedisBroker"

``qtasks.brokers``, ``qtasks.storages`` and ``qtasks.global_configs`` name a class with a
``from_config(config)`` classmethod (or any callable taking the config). ``qtasks.plugins`` names
a plugin class (built with ``from_config(config)`` if it has one, else with no arguments), a
plugin instance or a module; every one of them is registered when an app starts, unless its name
is in ``config.plugins_disabled``. ``qtasks.cli`` names a ``typer.Typer`` (added as a command
group) or a function (added as a command) of the ``qtasks`` CLI.

The core registers its in-memory components in the same groups under the name ``memory``, so
this path runs in every app built from configuration.

The installed entry points are read once per process (:func:`rescan` reads them again); what
they name is imported, built and registered per app, so apps share no plugin object.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from importlib.metadata import EntryPoint, entry_points
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from qtasks.errors import ConfigError, PluginError, QTasksError
from qtasks.masking import mask_text, masked_error

if TYPE_CHECKING:
    from qtasks.config import LoadedConfig, QueueConfig
    from qtasks.plugins import Hooks

log = logging.getLogger("qtasks.discovery")

T = TypeVar("T")

Kind = Literal["broker", "storage", "global_config", "plugin", "cli"]

GROUPS: dict[Kind, str] = {
    "broker": "qtasks.brokers",
    "storage": "qtasks.storages",
    "global_config": "qtasks.global_configs",
    "plugin": "qtasks.plugins",
    "cli": "qtasks.cli",
}
"""The entry-point group of each kind of extension."""

KNOWN_DISTRIBUTIONS: dict[str, str] = {"redis": "qtasks-redis", "rabbitmq": "qtasks-rabbitmq"}
"""Component names shipped by qtasks' own distributions, for the "install ..." hint."""

URL_SCHEMES: dict[str, str] = {
    "redis": "redis",
    "rediss": "redis",
    "unix": "redis",
    "redis+cluster": "redis",
    "rediss+cluster": "redis",
    "amqp": "rabbitmq",
    "amqps": "rabbitmq",
}
"""URL scheme -> the name of the backend of qtasks' own distributions that serves it."""


def backend_of_url(url: str) -> str | None:
    """The component name a URL's scheme implies (``redis://`` -> ``redis``, ``amqp://`` ->
    ``rabbitmq``; :data:`URL_SCHEMES`), or ``None`` for a scheme qtasks does not know.

    The one rule by which a URL given without a component name picks the backend, in
    ``QueueTasks(broker_url=...)`` and in configuration alike
    (:func:`~qtasks.config.follow_broker`)."""
    scheme, sep, _ = url.partition("://")
    return URL_SCHEMES.get(scheme.lower()) if sep else None


@dataclass(slots=True, frozen=True)
class Discovered:
    """One entry point of a qtasks group, with the distribution that declares it."""

    kind: Kind
    name: str
    value: str
    """``module:attribute`` as declared."""
    distribution: str | None
    version: str | None

    @property
    def group(self) -> str:
        return GROUPS[self.kind]


def _entry_points(kind: Kind) -> Mapping[str, EntryPoint]:
    """The installed entry points of ``kind`` by name, sorted (scanned once per process)."""
    return _scan(entry_points, GROUPS[kind])


@functools.cache
def _scan(
    source: Callable[..., Iterable[EntryPoint]], group: str
) -> MappingProxyType[str, EntryPoint]:
    """The entry points ``source`` (``importlib.metadata.entry_points``) lists in ``group``.

    Reading every installed distribution's metadata is most of what building an app cost
    (about 3 ms per group), so it is done once per process and group. Only this immutable scan
    is kept: each app still imports, builds and registers its own plugin objects. The key
    includes ``source``, so a test that substitutes ``discovery.entry_points`` gets its own
    scan and never sees (or leaves) a stale one. A distribution installed while the process
    runs is found after :func:`rescan`. A name declared twice raises, and is not cached."""
    found: dict[str, EntryPoint] = {}
    for ep in sorted(source(group=group), key=lambda e: e.name):
        # Two distributions declaring one name is a packaging error the user must see.
        if ep.name in found and found[ep.name].value != ep.value:
            raise ConfigError(
                f"entry point {ep.name!r} of group {group} is declared twice: "
                f"{_dist_label(found[ep.name])} and {_dist_label(ep)}"
            )
        found[ep.name] = ep
    return MappingProxyType(found)


def rescan() -> None:
    """Forget the entry points found so far: the next lookup reads the installed
    distributions again (after installing one into the running process)."""
    _scan.cache_clear()


def _dist_label(ep: EntryPoint) -> str:
    dist = ep.dist
    return f"{dist.name} {dist.version}" if dist is not None else ep.value


def discover(kind: Kind) -> list[Discovered]:
    """Every installed entry point of ``kind``, sorted by name."""
    result: list[Discovered] = []
    for ep in _entry_points(kind).values():
        dist = ep.dist
        result.append(
            Discovered(
                kind=kind,
                name=ep.name,
                value=ep.value,
                distribution=dist.name if dist is not None else None,
                version=dist.version if dist is not None else None,
            )
        )
    return result


def installed_names(kind: Kind) -> set[str]:
    """The names of every installed entry point of ``kind``."""
    return set(_entry_points(kind))


def discover_all() -> list[Discovered]:
    """Every installed component, plugin and CLI extension (``qtasks plugins``)."""
    return [item for kind in GROUPS for item in discover(kind)]


def load(kind: Kind, name: str) -> Any:
    """Import the object the entry point ``name`` of ``kind`` names.

    A missing name raises :class:`ConfigError` listing the installed names and, for names
    qtasks ships, the distribution to install."""
    eps = _entry_points(kind)
    ep = eps.get(name)
    if ep is None:
        installed = ", ".join(sorted(eps)) or "none"
        label = kind.replace("_", " ")
        raise ConfigError(
            f"no {label} named {name!r} is installed (installed: {installed})"
            f"{_missing_hint(kind, name)}"
        )
    what = _described(kind, name, ep)
    return _masked_failure(ep.load, lambda shown: ConfigError(f"{what} failed to import: {shown}"))


def _missing_hint(kind: Kind, name: str) -> str:
    """Why no ``kind`` is named ``name``, and what to do: install the distribution of qtasks
    that ships it; or, when that distribution is installed, that it ships ``name`` as other
    kinds only (``qtasks-rabbitmq`` has a broker ``rabbitmq``, no storage), so installing it
    again changes nothing."""
    label = kind.replace("_", " ")
    distribution = KNOWN_DISTRIBUTIONS.get(name)
    if distribution is None:
        close = difflib.get_close_matches(name, sorted(_entry_points(kind)), n=1, cutoff=0.6)
        typo = f"; did you mean {close[0]!r}? Else" if close else ";"
        return (
            f"{typo} install a distribution that declares {name!r} in the entry-point group "
            f"{GROUPS[kind]}"
        )
    provides = [
        f"a {other.replace('_', ' ')} {found!r}"
        for other in ("broker", "storage", "global_config")
        for found, ep in _entry_points(other).items()
        if ep.dist is not None and _normalized(ep.dist.name) == distribution
    ]
    if not provides:
        return f"; install it with: pip install {distribution}"
    return (
        f"; {distribution} is installed and provides {' and '.join(provides)}, but no {label}: "
        f"name one of those installed"
    )


def _normalized(distribution: str) -> str:
    """A distribution's name as PyPI compares them (``qtasks_rabbitmq`` is ``qtasks-rabbitmq``)."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def name_of_class(kind: Kind, cls: type) -> str | None:
    """The name of the installed entry point of ``kind`` that names ``cls`` itself (not a
    base class of it), or ``None``. Entry points that fail to import are passed over."""
    for name, ep in _entry_points(kind).items():
        try:
            if ep.load() is cls:
                return name
        except Exception:  # a broken distribution names no class; load() reports it when used
            continue
    return None


def build_component(kind: Kind, name: str, config: QueueConfig) -> Any:
    """Find component ``name`` of ``kind`` and build it from ``config``.

    What the build raises becomes a :class:`ConfigError` naming the component, its text
    masked (see :func:`_masked_failure`)."""
    factory = load(kind, name)
    from_config = getattr(factory, "from_config", None)
    build = from_config if callable(from_config) else factory
    if not callable(build):
        raise ConfigError(
            f"{kind} {name!r} names {factory!r}, which is neither a class nor callable"
        )
    what = _described(kind, name, _entry_points(kind)[name])
    return _masked_failure(
        lambda: build(config), lambda shown: ConfigError(f"{what} could not be built: {shown}")
    )


def build_components(config: QueueConfig) -> dict[str, Any]:
    """The broker, storage and global config ``config`` names, built from it."""
    return {
        "broker": build_component("broker", config.broker, config),
        "storage": build_component("storage", config.storage, config),
        "global_config": build_component("global_config", config.global_config, config),
    }


def components_named(
    config: QueueConfig, given: dict[str, Any]
) -> tuple[LoadedConfig, dict[str, Any]] | None:
    """For an app constructed with ``config`` and the components ``given`` (by kind,
    ``None`` where none was passed): ``None`` when ``config`` names no component but
    ``memory``, and sets no URL, for a kind not given (the in-memory defaults, nothing
    loaded; a URL without a name names its backend by its scheme); else the
    configuration completed as :meth:`~qtasks.app.AsyncQueueTasks.from_config` completes it
    (:func:`~qtasks.config.follow_broker`: a storage and global config left at their default
    follow a remote broker; the values that differ from the defaults count as set in code),
    and the components, the given ones kept, the others built by name (``None`` for
    ``memory``). Before, ``QueueConfig(broker="redis", ...)`` passed to the constructor
    quietly gave in-memory components: producers and workers in other processes never met."""
    from qtasks.config import LoadedConfig, QueueConfig, follow_broker  # config imports this

    kinds: tuple[Kind, ...] = ("broker", "storage", "global_config")
    if all(
        given[kind] is not None
        or (getattr(config, kind) == "memory" and getattr(config, f"{kind}_url") is None)
        for kind in kinds
    ):
        return None
    defaults = QueueConfig()
    sources = {
        option.name: "code"
        for option in fields(config)
        if getattr(config, option.name) != getattr(defaults, option.name)
    }
    for kind in kinds:
        if given[kind] is not None:  # an object the code built: kept, nothing follows there
            sources[kind] = "code"
    loaded = follow_broker(LoadedConfig(config, sources), constructor=True)
    built: dict[str, Any] = {}
    for kind in kinds:
        name = getattr(loaded.config, kind)
        if given[kind] is not None or name == "memory":
            built[kind] = given[kind]
        else:
            built[kind] = build_component(kind, name, loaded.config)
    return loaded, built


def _described(kind: Kind, name: str, ep: EntryPoint) -> str:
    """``broker 'redis' (qtasks_redis:RedisBroker, from qtasks-redis 1.0)``, for errors."""
    return f"{kind.replace('_', ' ')} {name!r} ({ep.value}, from {_dist_label(ep)})"


_shown = masked_error
"""An error from a plugin or component as qtasks shows it (:func:`~qtasks.masking.masked_error`:
a failed import or constructor often quotes the DSN it could not reach)."""


def _masked_failure(call: Callable[[], T], error: Callable[[str], QTasksError]) -> T:
    """``call()``; what it raises becomes ``error(_shown(exc))``, raised with no cause and no
    context: the raw exception would print its text unmasked in any traceback of the error
    (a log's ``exc_info``, Sentry, pytest), and scrubbing it is not reliable (``OSError``
    keeps ``strerror``, an exception may build its text from attributes or chain another).
    """
    try:
        return call()
    except Exception as exc:
        shown = _shown(exc)
    # Raised out of the handler, so the raw exception is not even kept as __context__.
    raise error(shown) from None


def instantiate_plugin(obj: Any, config: QueueConfig) -> Any:
    """A plugin object from what an entry point names: a class is built (``from_config`` if it
    has one, else with no arguments); modules and instances are used as they are."""
    if not inspect.isclass(obj):
        return obj
    from_config = getattr(obj, "from_config", None)
    if callable(from_config):
        return from_config(config)
    return obj()


def build_plugin(name: str, obj: Any, config: QueueConfig) -> Any:
    """:func:`instantiate_plugin`; what it raises becomes a :class:`PluginError` naming the
    plugin, its text masked (see :func:`_masked_failure`)."""
    return _masked_failure(
        lambda: instantiate_plugin(obj, config),
        lambda shown: PluginError(name, f"could not be built from the configuration: {shown}"),
    )


def load_plugins(hooks: Hooks, config: QueueConfig) -> list[str]:
    """Register every ``qtasks.plugins`` entry point not in ``config.plugins_disabled``.

    Each is registered under its entry-point name, one object per app (no global state).
    ``"*"`` in ``plugins_disabled`` disables them all.

    A name in ``plugins_disabled`` that no installed plugin has is logged as a warning (see
    :func:`unknown_disabled`). A plugin whose module cannot be imported (a half-installed
    distribution) is logged as an error naming it, its distribution and the way to disable
    it, and skipped, so an optional extension cannot make every app of the process unusable.
    A plugin that imports but is broken (its constructor raises, it names an unknown hook, an
    async ``firstresult`` hook) raises :class:`PluginError`."""
    disabled = set(config.plugins_disabled)
    for problem in unknown_disabled(config).values():
        log.warning("%s", problem)
    loaded: list[str] = []
    for name, ep in _entry_points("plugin").items():
        if name in disabled or "*" in disabled:
            log.debug("plugin %r is disabled in the configuration", name)
            continue
        if hooks.pm.has_plugin(name):
            continue
        try:
            obj = ep.load()
        except Exception as exc:
            log.error(
                "plugin %r (%s, from %s) failed to import and is not loaded: %s; "
                "add it to plugins_disabled to silence this",
                name,
                ep.value,
                _dist_label(ep),
                _shown(exc),
            )
            continue
        hooks.register(build_plugin(name, obj, config), name)
        loaded.append(name)
    return loaded


def unknown_disabled(config: QueueConfig) -> dict[str, str]:
    """Why each name of ``config.plugins_disabled`` that no installed plugin has is suspect,
    by name, with the closest installed name when one is close (a typo leaves the plugin it
    meant loaded).

    A warning, not an error: one configuration shared by processes whose environments
    differ (a worker image without qtasks-web, a dashboard with it) legitimately disables a
    plugin that is installed in only some of them, and an absent plugin is not loaded
    anyway."""
    installed = set(_entry_points("plugin"))
    found: dict[str, str] = {}
    for name in dict.fromkeys(config.plugins_disabled):
        if name == "*" or name in installed:
            continue
        close = difflib.get_close_matches(name, installed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        found[name] = (
            f"plugins_disabled names {name!r}, which is not an installed plugin ({hint}"
            f"installed: {', '.join(sorted(installed)) or 'none'})"
        )
    return found


@dataclass(slots=True)
class PluginCheck:
    """What :func:`check_plugins` found, by entry-point name."""

    problems: dict[str, str] = field(default_factory=dict)
    """Why a plugin is broken: it does not import, cannot be built, or is refused."""
    off: dict[str, str] = field(default_factory=dict)
    """How to switch on a plugin that loads but is off by configuration: the built object's
    ``qtasks_off`` text (e.g. qtasks-web's metrics without a port)."""
    unknown_disabled: dict[str, str] = field(default_factory=dict)
    """Names of ``plugins_disabled`` no installed plugin has (:func:`unknown_disabled`)."""


def check_plugins(config: QueueConfig) -> PluginCheck:
    """The state of each enabled ``qtasks.plugins`` entry point (``qtasks plugins``).

    A plugin is broken when its module does not import (apps log and skip it), when it
    cannot be built from ``config``, or when registration refuses it (an unknown hook, an
    async ``firstresult`` hook; apps fail to build). It is off when the object it builds
    from ``config`` has a ``qtasks_off`` string (registered, with no hooks). Each is checked
    on a fresh plugin manager; a plugin in neither map is on."""
    from qtasks.plugins import Hooks

    disabled = set(config.plugins_disabled)
    found = PluginCheck(unknown_disabled=unknown_disabled(config))
    for name, ep in _entry_points("plugin").items():
        if name in disabled or "*" in disabled:
            continue
        try:
            obj = ep.load()
        except Exception as exc:
            found.problems[name] = f"failed to import: {_shown(exc)}"
            continue
        try:
            plugin = instantiate_plugin(obj, config)
            Hooks().register(plugin, name)
        except PluginError as exc:
            found.problems[name] = mask_text(str(exc))
            continue
        except Exception as exc:
            found.problems[name] = f"could not be built from the configuration: {_shown(exc)}"
            continue
        off = getattr(plugin, "qtasks_off", None)
        if isinstance(off, str):
            found.off[name] = off
    return found


def load_cli_extensions() -> list[tuple[str, Any]]:
    """``(name, object)`` of every ``qtasks.cli`` entry point; broken ones are logged and
    skipped so one bad distribution does not take the whole CLI down."""
    found: list[tuple[str, Any]] = []
    for name, ep in _entry_points("cli").items():
        try:
            found.append((name, ep.load()))
        except Exception as exc:  # logged masked, without the raw traceback, as plugins are
            log.warning(
                "qtasks CLI extension %r (%s) failed to load: %s", name, ep.value, _shown(exc)
            )
    return found
