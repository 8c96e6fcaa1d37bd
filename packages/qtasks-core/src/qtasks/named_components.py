"""A component's name or URL passed where the app's constructor takes the component object.

``AsyncQueueTasks(broker="rabbitmq")`` used to be kept as the broker and failed at start with
``'str' object has no attribute 'start'``. Components are chosen by name in configuration
(``QueueConfig(broker=...)``, ``from_config(broker=...)``); QTasks 1.7 took a Redis URL as
``broker_url=``. The constructor refuses a string at once, saying which of those to write.
"""

from __future__ import annotations

from typing import Any

from qtasks.discovery import Kind, backend_of_url, discover
from qtasks.errors import ConfigError
from qtasks.masking import mask_url

KINDS: tuple[Kind, ...] = ("broker", "storage", "global_config")
"""The components the constructor takes as objects and configuration names."""


def refuse_names(app: str, given: dict[str, Any]) -> None:
    """Raise :class:`~qtasks.errors.ConfigError` when a component in ``given`` (by kind,
    ``None`` where none was passed) is a ``str`` (a name or a URL) or a class, given to the
    constructor of ``app`` (the class name) instead of a component object. ``worker`` is
    checked too: it has no name in configuration, the backends are chosen by the broker's."""
    for kind, value in given.items():
        if isinstance(value, str):
            if kind not in KINDS:  # the worker
                raise ConfigError(_worker_message(app, value))
            raise ConfigError(_message(app, kind, value))
        if isinstance(value, type):
            # The class, not an instance (``broker=RedisBroker``): it failed at start.
            raise ConfigError(
                f"{app}({kind}={value.__name__}): {kind}= takes a {kind.replace('_', ' ')} "
                f"object, not its class; call it: {kind}={value.__name__}(...)"
            )


def _worker_message(app: str, value: str) -> str:
    shown = mask_url(value) if "://" in value else value
    return (
        f"{app}(worker={shown!r}): worker= takes a worker object (qtasks.QueueWorker(...)), "
        "not a name or URL; a worker is not chosen by name: the backends it serves from are "
        "the broker's (broker=, broker_url= or config=QueueConfig(broker=...)), and its "
        "settings are QueueConfig's (see docs/configuration.md)"
    )


def _message(app: str, kind: Kind, value: str) -> str:
    label = kind.replace("_", " ")
    if "://" in value:
        shown = mask_url(value)
        head = f"{app}({kind}={shown!r}): {kind}= takes a {label} object, not a URL; pass "
        choose = (
            f"config=QueueConfig({kind}_url={shown!r}) or "
            f"{app}.from_config({kind}_url={shown!r}), the {label} named by the URL's scheme "
            "(see docs/configuration.md)"
        )
        if kind == "broker" and backend_of_url(value) == "redis":
            # QTasks 1.7's own form, kept: the Redis broker, storage and global config.
            return f"{head}broker_url={shown!r} (the Redis components), or {choose}"
        return head + choose
    found = {item.name: item.value for item in discover(kind)}
    # The class QTasks 1.7 code built itself (AsyncRabbitMQBroker...) has a name here.
    example = f" ({_call(found[value])} for {value!r})" if value in found else ""
    return (
        f"{app}({kind}={value!r}): {kind}= takes a {label} object{example}, not a name; to "
        f"choose the {label} by name, pass config=QueueConfig({kind}={value!r}) or build the "
        f"app with {app}.from_config({kind}={value!r}) (see docs/configuration.md; installed "
        f"{label}s: {', '.join(found) or 'none'})"
    )


def _call(value: str) -> str:
    """``qtasks_rabbitmq.RabbitMQBroker(...)`` for the entry point
    ``qtasks_rabbitmq:RabbitMQBroker``."""
    module, _, attribute = value.partition(":")
    return f"{module}.{attribute}(...)" if attribute else f"{module}(...)"
