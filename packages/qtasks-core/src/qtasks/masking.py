"""Credentials out of what qtasks shows: one rule for logs, errors, the CLI and the dashboard.

A URL keeps its scheme, user, host, port and path; its password, and the value of every query
parameter named like a secret (``?password=``, ``?token=``), become :data:`MASK`. A value
whose key is named like a secret (:func:`is_secret_key`: ``password``, ``token``,
``api_key``...) is masked whole.
"""

from __future__ import annotations

import re
from typing import Any, overload
from urllib.parse import unquote_plus, urlsplit

MASK = "***"

SECRET_KEY = re.compile(
    r"pass|secret|token|api[_-]?key|access[_-]?key|auth|credential|cookie|session|private"
    r"|signature",
    re.IGNORECASE,
)
"""What a key named like a secret contains (a search, case-insensitive)."""


def is_secret_key(name: str) -> bool:
    """Whether a value stored under ``name`` (a setting, a query parameter, an argument) is
    treated as a secret."""
    return SECRET_KEY.search(name) is not None


@overload
def mask_url(url: str) -> str: ...
@overload
def mask_url(url: None) -> None: ...
def mask_url(url: str | None) -> str | None:
    """``url`` with its password and secret query values replaced by :data:`MASK`.

    The user information ends at the *last* ``@`` of the authority, as redis-py and
    ``urllib`` read it, so a password containing ``@`` is masked whole. A URL whose
    credentials cannot be located (an ``@`` after the authority, as an unencoded ``/`` or
    ``?`` in a password leaves) keeps only its scheme; one that does not parse is masked
    whole."""
    if url is None:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    query = "&".join(_mask_param(param) for param in parts.query.split("&"))
    if "@" in parts.path + query + parts.fragment:
        return f"{parts.scheme}://{MASK}" if parts.scheme else MASK
    userinfo, at, host = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{MASK}@{host}"
    if netloc == parts.netloc and query == parts.query:
        return url
    rebuilt = f"{parts.scheme}:" if parts.scheme else ""
    if netloc or url[len(rebuilt) :].startswith("//"):
        rebuilt += f"//{netloc}"
    rebuilt += parts.path
    if query:
        rebuilt += f"?{query}"
    if parts.fragment:
        rebuilt += f"#{parts.fragment}"
    return rebuilt


def _mask_param(param: str) -> str:
    name, eq, _ = param.partition("=")
    return f"{name}={MASK}" if eq and is_secret_key(unquote_plus(name)) else param


SECRET_TABLES = frozenset({"users"})
"""Keys of tables whose every value is a credential under a non-secret name (qtasks-web's
``users``: name = password)."""


def masked(value: Any) -> Any:
    """A setting's ``value`` (tables, lists, strings) as it may be shown.

    The value of a key named like a secret, and every value of a :data:`SECRET_TABLES`
    table, becomes :data:`MASK`, except a reference to an environment variable
    (``"env:NAME"``), which names the secret without holding it; every other string goes
    through :func:`mask_url`."""
    if isinstance(value, dict):
        return {key: _entry(key, sub) for key, sub in value.items()}
    if isinstance(value, list | tuple):
        return [masked(item) for item in value]
    if isinstance(value, str):
        return mask_url(value)
    return value


def _entry(key: Any, value: Any) -> Any:
    if key in SECRET_TABLES and isinstance(value, dict):
        return {name: _hidden(item) for name, item in value.items()}
    if isinstance(key, str) and is_secret_key(key):
        return _hidden(value)
    return masked(value)


def _hidden(value: Any) -> Any:
    return value if isinstance(value, str) and value.startswith("env:") else MASK
