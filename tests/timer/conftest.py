"""Fixtures of the timer tests: the anyio backend, a clock tests can move, the local Redis."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeClock:
    """A wall clock that advances with real time from ``start`` and can be moved by hand."""

    def __init__(self, start: datetime) -> None:
        import time

        self._time = time.monotonic
        self._base = start
        self._at = time.monotonic()

    def __call__(self) -> datetime:
        return self._base + timedelta(seconds=self._time() - self._at)

    def set(self, moment: datetime) -> None:
        self._base = moment
        self._at = self._time()

    def shift(self, seconds: float) -> None:
        self.set(self() + timedelta(seconds=seconds))


@pytest.fixture
def fake_clock() -> Callable[[datetime], FakeClock]:
    return FakeClock


def _redis_up(host: str = "127.0.0.1", port: int = 6379) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def redis_url() -> str:
    """The local Redis; skips when it is down, fails under CI."""
    if not _redis_up():
        if os.environ.get("CI"):
            pytest.fail("Redis at 127.0.0.1:6379 is unreachable (CI is set)")
        pytest.skip("Redis at 127.0.0.1:6379 is unreachable")
    return "redis://127.0.0.1:6379/0"


@pytest.fixture
def unique_name() -> str:
    return f"qtasks-timer-test-{uuid.uuid4().hex[:10]}"
