"""Fixtures for the Redis tests (``redis_url``, ``prefix`` and ``anyio_backend`` come from the
root conftest): ``rig``, a private redis-server behind a fault proxy (fault_fixtures.py);
``lane``, a fast lane to the shared server, and ``key``, a fresh key name for it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from fault_fixtures import FaultRig, make_rig

from qtasks_redis import RedisTarget
from qtasks_redis.lane import Lane, lane_for


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as stack:
        yield stack


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[FaultRig]:
    """A private redis-server with a fault proxy in front (see fault_fixtures.py); its worker
    subprocesses are stopped, the proxy and the server closed afterwards."""
    made = make_rig(tmp_path, f"qt-fault-{uuid.uuid4().hex[:8]}")
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
async def lane(redis_url: str) -> AsyncIterator[Lane]:
    made = lane_for(RedisTarget.parse(redis_url), {})
    assert made is not None
    await made.check()
    yield made
    made.close()


@pytest.fixture
def key(redis_url: str) -> str:
    return f"qt-test-lane-{uuid.uuid4().hex[:10]}"
