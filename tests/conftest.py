"""Shared fixtures: the anyio backend and the real services (Redis, RabbitMQ).

A service test that cannot reach its server skips with the reason locally and fails when the
``CI`` environment variable is set, so CI never passes by skipping.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest
import redis

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
RABBITMQ_HOST, RABBITMQ_PORT = "127.0.0.1", 5672


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


def skip_or_fail(reason: str) -> None:
    """Skip locally; under CI (``CI`` set) fail instead, so CI never passes by skipping."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: service tests must not skip)")
    pytest.skip(reason)


def require_service(name: str, host: str, port: int) -> None:
    """Skip (locally) or fail (under CI) when the service is down."""
    if reachable(host, port):
        return
    skip_or_fail(f"{name} is not reachable at {host}:{port}")


@pytest.fixture
def redis_url() -> str:
    """URL of the real Redis server (db 0); the test skips/fails if it is down."""
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


@pytest.fixture
def rabbitmq_url() -> str:
    """URL of the real RabbitMQ server; the test skips/fails if it is down."""
    require_service("RabbitMQ", RABBITMQ_HOST, RABBITMQ_PORT)
    return f"amqp://guest:guest@{RABBITMQ_HOST}:{RABBITMQ_PORT}/"


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix unique to this test; its keys are deleted afterwards."""
    name = f"qt-test-{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{{{name}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
