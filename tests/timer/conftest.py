"""Fixtures of the timer tests (``anyio_backend`` and ``redis_url`` come from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import pytest
from redis_keys import new_redis_prefix


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


@pytest.fixture
def unique_name() -> str:
    """A name of this test's own; as a Redis key prefix it carries the session's tag, so the
    session guard of tests/conftest.py sees keys left under it."""
    return new_redis_prefix()
