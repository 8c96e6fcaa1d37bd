"""The ``qtasks.plugins`` entry points of qtasks-web, ``metrics`` and ``tracing``.

Every app of a process where qtasks-web is installed builds them, so they read their settings
without importing prometheus_client or OpenTelemetry, and register an object without hooks
(nothing on the hot path, nothing imported) unless the configuration enables them:

- ``[extra.metrics]``: ``port`` (unset: off) and ``host`` (default ``127.0.0.1``); ``qtasks run
  --metrics-port`` sets the port;
- ``[extra.tracing]``: ``enabled = true``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qtasks.errors import ConfigError

if TYPE_CHECKING:
    from qtasks.config import QueueConfig


@dataclass(slots=True, frozen=True)
class MetricsSettings:
    """``[extra.metrics]``: ``port`` (the worker's metrics port; unset: metrics off) and
    ``host`` (default ``127.0.0.1``)."""

    port: int | None = None
    host: str = "127.0.0.1"

    @classmethod
    def from_config(cls, config: QueueConfig) -> MetricsSettings:
        """Read ``config.extra["metrics"]``; raise :class:`ConfigError` on a bad value."""
        section = _section(config, "metrics", {"port", "host"})
        port, host = section.get("port"), section.get("host", "127.0.0.1")
        if port is not None and (
            isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536
        ):
            raise ConfigError(f"extra.metrics.port must be a port number (1-65535), not {port!r}")
        if not isinstance(host, str) or not host:
            raise ConfigError(f"extra.metrics.host must be a host name or address, not {host!r}")
        return cls(port=port, host=host)


def tracing_enabled(config: QueueConfig) -> bool:
    """``[extra.tracing] enabled``; raise :class:`ConfigError` on a bad value."""
    enabled = _section(config, "tracing", {"enabled"}).get("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"extra.tracing.enabled must be true or false, not {enabled!r}")
    return enabled


def _section(config: QueueConfig, name: str, known: set[str]) -> dict[str, Any]:
    section = config.extra.get(name)
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"extra.{name} must be a table, not {type(section).__name__}")
    unknown = set(section) - known
    if unknown:
        raise ConfigError(
            f"extra.{name}: unknown key(s) {sorted(unknown)} (known: {sorted(known)})"
        )
    return section


class Off:
    """A plugin off by configuration: registered under its entry-point name, with no hooks;
    ``qtasks_off`` says how to switch it on (``qtasks plugins`` shows it)."""

    def __init__(self, what: str, how: str) -> None:
        self.name = f"qtasks-web.{what} (off)"
        self.qtasks_off = how

    def __repr__(self) -> str:
        return f"<{self.name}: {self.qtasks_off}>"


class Metrics:
    """The ``metrics`` entry point: a :class:`~qtasks_web.metrics.MetricsPlugin` when
    ``[extra.metrics]`` sets a port, else :class:`Off`."""

    @classmethod
    def from_config(cls, config: QueueConfig) -> Any:
        settings = MetricsSettings.from_config(config)
        if settings.port is None:
            return Off("metrics", "set [extra.metrics] port or qtasks run --metrics-port")
        from qtasks_web.metrics import MetricsPlugin

        return MetricsPlugin(port=settings.port, host=settings.host)


class Tracing:
    """The ``tracing`` entry point: a :class:`~qtasks_web.tracing.TracingPlugin` when
    ``[extra.tracing] enabled = true``, else :class:`Off`."""

    @classmethod
    def from_config(cls, config: QueueConfig) -> Any:
        if not tracing_enabled(config):
            return Off("tracing", "set [extra.tracing] enabled = true")
        from qtasks_web.tracing import TracingPlugin

        return TracingPlugin()
