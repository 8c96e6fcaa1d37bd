"""Redis key hygiene of the test suite: the session's prefix tag, fresh prefixes, clean-up.

Imported by tests/conftest.py (which documents the rules) and by tests that need a prefix
outside a fixture.
"""

from __future__ import annotations

import uuid

SESSION_TAG = f"qt-test-{uuid.uuid4().hex[:6]}"
"""Starts every Redis key prefix this test session uses."""
DEFAULT_PREFIX_PATTERNS = ("{qtasks:*", "qtasks:*")
"""Keys of qtasks components built without a prefix."""
DOCS_REDIS_URL = "redis://127.0.0.1:6379/0"
"""The Redis URL the docs' examples name (the default server)."""


def on_test_redis(code: str, url: str) -> str:
    """``code`` of a docs example with the Redis it names swapped for the test's ``url``
    (``QTASKS_TEST_REDIS``, from the ``redis_url`` fixture)."""
    assert DOCS_REDIS_URL in code, f"the example does not name {DOCS_REDIS_URL}:\n{code}"
    return code.replace(DOCS_REDIS_URL, url)


def new_redis_prefix() -> str:
    """A key prefix of its own, tagged with this session (see the module docstring)."""
    return f"{SESSION_TAG}-{uuid.uuid4().hex[:8]}"


def delete_redis_keys(url: str, prefix: str) -> None:
    """Delete every key whose name contains ``prefix`` (a prefix is ``{<prefix>:...}``)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"*{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def scan_keys(url: str, patterns: tuple[str, ...]) -> dict[str, int] | None:
    """Keys matching ``patterns`` with their TTL in seconds (-1: none); ``None`` if Redis
    cannot be asked."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        keys = sorted({k.decode() for p in patterns for k in client.scan_iter(match=p, count=1000)})
        with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.ttl(key)
            ttls = pipe.execute()
        return dict(zip(keys, ttls, strict=True))
    except redis.RedisError:
        return None
    finally:
        client.close()
