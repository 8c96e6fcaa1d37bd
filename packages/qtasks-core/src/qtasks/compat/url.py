"""``QueueTasks(broker_url="redis://...")``: QTasks' default app is Redis, built from one URL."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from qtasks.config import LoadedConfig, QueueConfig, follow_broker
from qtasks.discovery import backend_of_url, build_components
from qtasks.errors import ConfigError

DEFAULT_NAME = "QueueTasks"
"""The app's default name (QTasks' too). Under it, ``broker_url=`` keeps qtasks' own key
prefix, ``qtasks``, which a worker built from configuration alone uses as well."""


def components_from_url(
    url: str,
    config: QueueConfig | None,
    broker: Any = None,
    storage: Any = None,
    global_config: Any = None,
    name: str = DEFAULT_NAME,
) -> tuple[QueueConfig, Any, Any, Any]:
    """``(config, broker, storage, global_config)`` of an app built from ``broker_url``: the
    Redis broker, and the storage and global config that follow it (see
    :func:`~qtasks.config.follow_broker`), all on ``url``. A storage or global config passed
    explicitly is kept.

    An app ``name`` other than the default is the Redis key prefix (``redis_prefix``), unless
    ``config.extra`` names one: QTasks kept each app's keys under its name, so two apps with
    different names on one Redis have their own queues, records and ``flush_all``.

    Raises :class:`~qtasks.errors.ConfigError` for a scheme qtasks cannot serve this way, and
    (from discovery) naming the distribution to install when ``qtasks-redis`` is missing."""
    given = {"broker": broker, "storage": storage, "global_config": global_config}
    # The rule configuration follows too (follow_broker): one URL, one backend, wherever it
    # is given. QTasks gave broker_url to its Redis broker only.
    broker = backend_of_url(url)
    if broker != "redis":
        raise ConfigError(
            f"broker_url {url.split('@')[-1]!r}: QueueTasks(broker_url=...) builds the Redis "
            "components from a redis://, rediss:// or unix:// URL; for other brokers pass "
            "broker=... (e.g. qtasks_rabbitmq.RabbitMQBroker) or use QueueTasks.from_config"
        )
    if given.get("broker") is not None:
        raise ConfigError("pass either broker= or broker_url=, not both")
    base = config or QueueConfig()
    values = base.merged(broker=broker, broker_url=url)
    if name != DEFAULT_NAME and "redis_prefix" not in values.extra:
        if "{" in name or "}" in name:
            raise ConfigError(
                f"app name {name!r}: QueueTasks(name=..., broker_url=...) makes the name the "
                "Redis key prefix, and a prefix cannot hold '{' or '}' (they mark Redis hash "
                "tags); pick another name, or set the prefix with "
                "QueueConfig(extra={'redis_prefix': ...})"
            )
        values = values.merged(extra={**values.extra, "redis_prefix": name})
    sources = {f.name: "default" for f in fields(QueueConfig)}
    sources.update(broker="code", broker_url="code")
    for kind in ("storage", "global_config"):
        if getattr(base, kind) != "memory" or given.get(kind) is not None:
            sources[kind] = "code"  # set on purpose: do not follow the broker
    loaded = follow_broker(LoadedConfig(values, sources))
    built = build_components(loaded.config)
    chosen = {k: given.get(k) or v for k, v in built.items()}
    return loaded.config, chosen["broker"], chosen["storage"], chosen["global_config"]
