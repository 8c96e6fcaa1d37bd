"""Fixtures for the Redis tests (``redis_url``, ``prefix`` and ``anyio_backend`` come from the
root conftest)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import pytest


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as stack:
        yield stack
