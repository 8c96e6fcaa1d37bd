"""Fixtures for the Redis tests (``redis_url`` and ``anyio_backend`` come from the root
conftest): a key prefix per test, cleaned up afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import pytest


@pytest.fixture
def prefix(redis_prefix: str) -> str:
    """A key prefix unique to this test; its keys are deleted afterwards (see tests/conftest.py)."""
    return redis_prefix


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as stack:
        yield stack
