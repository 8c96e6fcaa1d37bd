"""Fixtures for the Redis tests (``redis_url``, ``prefix`` and ``anyio_backend`` come from the
root conftest): ``rig``, a private redis-server behind a fault proxy (fault_fixtures.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from fault_fixtures import FaultRig, make_rig


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
