"""The dashboard's settings: ``[extra.web]`` of the qtasks configuration, or arguments.

.. code-block:: toml

    [extra.web]                      # [tool.qtasks.extra.web] in pyproject.toml
    host = "127.0.0.1"               # qtasks web binds here (loopback by default)
    port = 8000
    token = "env:QTASKS_WEB_TOKEN"   # a bearer token ("env:NAME" reads it from the environment)
    users = { admin = "env:QTASKS_WEB_ADMIN_PASSWORD" }   # basic-auth users and passwords
    read_only = false                # hide and refuse every action
    refresh = 0.5                    # seconds between the shared reads behind live updates
    window = 300                     # seconds of history in the overview's charts
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qtasks.config import QueueConfig, close_names
from qtasks.errors import ConfigError
from qtasks.masking import masked_entry
from qtasks_web.plugins import _section

EXTRA_KEY = "web"
_KNOWN = {"host", "port", "token", "users", "read_only", "refresh", "window"}


def _secret(value: Any, where: str) -> str:
    """A configured secret: ``"env:NAME"`` is read from the environment (missing: an error
    naming the variable and any set variable it was likely mistyped as, never a value)."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string")
    if value.startswith("env:"):
        name = value[4:]
        found = os.environ.get(name)
        if not found:
            close = close_names(name, (n for n in os.environ if n != name))
            typo = f" (set: {', '.join(close)}; a typo?)" if close else ""
            raise ConfigError(f"{where}: the environment variable {name!r} is not set{typo}")
        return found
    return value


@dataclass(frozen=True, slots=True)
class Auth:
    """Who may use the dashboard: a bearer ``token`` and/or basic-auth ``users`` (name ->
    password). Both empty means no authentication (allowed on loopback only). Secrets are
    left out of ``repr``."""

    token: str | None = field(default=None, repr=False)
    users: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def enabled(self) -> bool:
        """Whether any credential is configured."""
        return bool(self.token) or bool(self.users)


@dataclass(frozen=True, slots=True)
class WebSettings:
    """Settings of one dashboard (see the module docstring)."""

    host: str = "127.0.0.1"
    port: int = 8000
    auth: Auth = field(default_factory=Auth)
    read_only: bool = False
    refresh: float = 0.5
    window: float = 300.0

    @classmethod
    def from_config(cls, config: QueueConfig) -> WebSettings:
        """From ``config.extra["web"]``; raises :class:`~qtasks.errors.ConfigError` for an
        unknown key or a value of the wrong type."""
        table = _section(config, EXTRA_KEY, _KNOWN)  # as [extra.metrics] and [extra.tracing]
        where = f"extra.{EXTRA_KEY}"
        token = table.get("token")
        users = table.get("users", {})
        if not isinstance(users, Mapping):
            raise ConfigError(f"{where}.users: expected a table of user = password")
        auth = Auth(
            token=None if token is None else _secret(token, f"{where}.token"),
            users={
                str(name): _secret(password, f"{where}.users.{name}")
                for name, password in users.items()
            },
        )
        settings = cls(
            host=_typed(table, "host", str, "127.0.0.1"),
            port=_typed(table, "port", int, 8000),
            auth=auth,
            read_only=_typed(table, "read_only", bool, False),
            refresh=float(_typed(table, "refresh", (int, float), 0.5)),
            window=float(_typed(table, "window", (int, float), 300.0)),
        )
        return settings.checked()

    def checked(self) -> WebSettings:
        """Itself when its numbers make sense; :class:`ConfigError` otherwise."""
        if not 0.1 <= self.refresh <= 60:
            raise ConfigError(f"extra.web.refresh: {self.refresh} is not between 0.1 and 60 s")
        if not 30 <= self.window <= 86400:
            raise ConfigError(f"extra.web.window: {self.window} is not between 30 and 86400 s")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"extra.web.port: {self.port} is not a TCP port")
        return self


def _typed(table: Mapping[str, Any], key: str, kind: Any, default: Any) -> Any:
    value = table.get(key, default)
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        shown = masked_entry(key, value)
        raise ConfigError(f"extra.web.{key}: expected {_names(kind)}, got {shown!r}")
    return value


def _names(kind: Any) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this machine only (``localhost``, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
