"""Shared fixtures: the anyio backend and the real services (Redis, RabbitMQ).

A service test that cannot reach its server skips with the reason locally and fails when the
``CI`` environment variable is set, so CI never passes by skipping.

The shared Redis: ``QTASKS_TEST_REDIS`` (a ``redis://`` URL, default ``redis://127.0.0.1:6379/0``),
read here only; every test that talks to it gets it from the ``redis_url`` fixture (tests that
start a redis-server of their own keep theirs). Point it at another db (``.../9``) or server to
keep the tests off a database you use; down, it skips or fails as any service does.

Redis keys: the tests share a developer's Redis (that db), so none of them may write under the
default prefix ``qtasks`` or leave keys behind. A test that touches Redis takes the
``redis_prefix`` fixture (directly, or through ``prefix`` in tests/redis and the timer's
``unique_name``) and passes it to every component, subprocess and CLI call it makes (for an app
built in code and driven by the CLI: ``QueueConfig(extra={"redis_prefix": ...})``); the fixture
deletes the prefix's keys afterwards. Every such prefix starts with this session's tag, and at
the end of the session :func:`pytest_sessionfinish` fails the run if any key with the tag is
left, and reports keys that appeared under the default prefix meanwhile (failing under ``CI``,
where nothing else shares the server; locally other processes may write there).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from redis_keys import (
    DEFAULT_PREFIX_PATTERNS,
    SESSION_TAG,
    delete_redis_keys,
    new_redis_prefix,
    scan_keys,
)
from skips import unavailable
from start_wait_logs import Caught

RABBITMQ_HOST, RABBITMQ_PORT = "127.0.0.1", 5672


def _test_redis(url: str) -> tuple[str, str, int, str]:
    """``QTASKS_TEST_REDIS``: the URL, the host and port to probe, and where it points without
    its password (for messages); a usage error if it is not a ``redis://`` URL."""
    parts = urlsplit(url)
    try:
        port = parts.port or 6379
    except ValueError as exc:
        raise pytest.UsageError(f"QTASKS_TEST_REDIS: {exc}") from exc
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise pytest.UsageError("QTASKS_TEST_REDIS is not a redis://host[:port][/db] URL")
    return url, parts.hostname, port, f"{parts.hostname}:{port} db {parts.path[1:] or '0'}"


REDIS_URL, REDIS_HOST, REDIS_PORT, REDIS_SHOWN = _test_redis(
    os.environ.get("QTASKS_TEST_REDIS") or "redis://127.0.0.1:6379/0"
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a TCP server answers at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip (locally) or fail (under CI) when the service is down."""
    if reachable(host, port):
        return
    unavailable(f"{name} is not reachable at {host}:{port}")


@pytest.fixture
def redis_url() -> str:
    """URL of the real Redis server (``QTASKS_TEST_REDIS``); the test skips/fails if it is
    down. Use it with ``redis_prefix``."""
    require_service("Redis (QTASKS_TEST_REDIS)", REDIS_HOST, REDIS_PORT)
    return REDIS_URL


@pytest.fixture
def rabbitmq_url() -> str:
    """URL of the real RabbitMQ server; the test skips/fails if it is down."""
    require_service("RabbitMQ", RABBITMQ_HOST, RABBITMQ_PORT)
    return f"amqp://guest:guest@{RABBITMQ_HOST}:{RABBITMQ_PORT}/"


# --- Redis keys -----------------------------------------------------------------------------


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A Redis key prefix unique to this test; its keys are deleted afterwards."""
    prefix = new_redis_prefix()
    yield prefix
    delete_redis_keys(redis_url, prefix)


@pytest.fixture
def prefix(redis_prefix: str) -> str:
    """Short name of ``redis_prefix`` (Redis tests and RabbitMQ tests with a Redis storage)."""
    return redis_prefix


def _scan(patterns: tuple[str, ...]) -> dict[str, int] | None:
    if not reachable(REDIS_HOST, REDIS_PORT, timeout=0.2):
        return None
    return scan_keys(REDIS_URL, patterns)


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_default_keys_at_start] = _scan(DEFAULT_PREFIX_PATTERNS)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session when its tests left Redis keys behind (see the module docstring)."""
    config = session.config
    report: list[str] = []
    failed = False
    left = _scan((f"*{SESSION_TAG}*",))
    if left:
        failed = True
        report.append(
            f"tests of this session left {len(left)} Redis key(s) behind (prefix tag "
            f"{SESSION_TAG}; the test that made the prefix must delete them):"
        )
        report += [f"  {key} (ttl {ttl})" for key, ttl in sorted(left.items())[:50]]
    before = config.stash.get(_default_keys_at_start, None)
    after = _scan(DEFAULT_PREFIX_PATTERNS)
    if before is not None and after is not None:
        new = {key: ttl for key, ttl in after.items() if key not in before}
        if new:
            strict = bool(os.environ.get("CI"))
            failed = failed or strict
            report.append(
                f"{len(new)} Redis key(s) appeared under the default prefix 'qtasks' in "
                f"{REDIS_SHOWN} during this session: a test built a Redis component without a "
                "prefix"
                + ("." if strict else " (or another process sharing this Redis wrote them).")
            )
            report += [
                f"  {key} ({'no ttl' if ttl == -1 else f'ttl {ttl}'})"
                for key, ttl in sorted(new.items())[:50]
            ]
    config.stash[_key_report] = report
    if failed and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    report = config.stash.get(_key_report, [])
    if report:
        terminalreporter.section("Redis keys left behind", sep="=", red=True, bold=True)
        for line in report:
            terminalreporter.line(line)


_default_keys_at_start = pytest.StashKey[dict[str, int] | None]()
_key_report = pytest.StashKey[list[str]]()


@pytest.fixture
def caught() -> Iterator[Caught]:
    """The warnings of qtasks in this process (tests of a worker waiting for its servers)."""
    handler = Caught()
    logger = logging.getLogger("qtasks")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
