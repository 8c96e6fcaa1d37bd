"""The settings object: one dataclass with every option the app and its components read.

Values come, lowest precedence first, from defaults, ``[tool.qtasks]`` in ``pyproject.toml`` or
``qtasks.toml``, ``QTASKS_*`` environment variables, CLI flags, and keyword arguments in code.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from qtasks.errors import ConfigError


@dataclass(slots=True)
class QueueConfig:
    """Every setting of a qtasks app. Unknown keys are an error."""

    max_tasks_process: int = 10
    """Tasks one worker runs at once."""
    prefetch: int = 10
    """Messages a worker holds beyond those running (bounded, so others are not starved)."""
    default_priority: int = 0
    """Priority of tasks that set none; a lower number runs first."""
    result_ttl: float | None = 86400.0
    """Seconds a finished record is kept (``None``: forever)."""
    lease: float = 30.0
    """Seconds a delivery is owned by a worker before it is given to another; renewed while
    the task runs."""
    max_deliveries: int = 5
    """Deliveries (crashes included) before a message goes to the dead-letter queue."""
    retry: int = 0
    """Default retries for tasks that set none."""
    retry_backoff: float = 1.0
    """First retry delay in seconds; doubled per attempt, with jitter."""
    retry_backoff_max: float = 300.0
    """Upper bound of one retry delay."""
    shutdown_grace: float = 30.0
    """Seconds running tasks get to finish on shutdown before they are handed back."""
    heartbeat_interval: float = 5.0
    """Seconds between worker heartbeats in the GlobalConfig."""
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
    timers: list[dict[str, Any]] = field(default_factory=list)
    """Timers declared in configuration, read by ``qtasks-timer``."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Component-specific options (``[tool.qtasks.extra]``), passed on to components."""

    def merged(self, **values: Any) -> QueueConfig:
        """A copy with ``values`` applied, checked like any other source."""
        checked = {k: check_value(k, v, "keyword argument") for k, v in values.items()}
        return replace(self, **checked)


_FIELD_TYPES: dict[str, str] = {f.name: str(f.type) for f in fields(QueueConfig)}


def check_value(key: str, value: Any, source: str) -> Any:
    """Return ``value`` if it fits ``key``'s type (ints widen to floats), else raise."""
    if key not in _FIELD_TYPES:
        known = ", ".join(sorted(_FIELD_TYPES))
        raise ConfigError(f"{source}: unknown key {key!r} (known keys: {known})")
    kind = _FIELD_TYPES[key]
    optional = "None" in kind
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {key!r} must not be empty (expected {kind})")
    base = kind.split(" |")[0]
    ok: bool
    if base == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif base == "str":
        ok = isinstance(value, str)
    elif base.startswith("list"):
        ok = isinstance(value, list)
    elif base.startswith("dict"):
        ok = isinstance(value, dict)
    else:  # pragma: no cover - every field type is listed above
        ok = True
    if not ok:
        raise ConfigError(f"{source}: {key!r} expects {kind}, got {type(value).__name__} {value!r}")
    return value
