"""The storage's errors are storage errors: a lost server raises StorageConnectionError (also a
BrokerConnectionError and a ConnectionError, as before it existed), never a raw redis-py one."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from redis_procs import start_server

from qtasks.config import QueueConfig
from qtasks.errors import (
    BrokerConnectionError,
    ComponentError,
    StorageConnectionError,
    StorageError,
)
from qtasks_redis import RedisStorage

pytestmark = pytest.mark.anyio


async def test_a_lost_server_raises_a_storage_connection_error(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        storage = RedisStorage(server.url, options={"redis_retries": 0})
        async with AsyncExitStack() as stack:
            await storage.start(stack, QueueConfig())
            assert await storage.get("nothing") is None
            server.kill()
            with pytest.raises(StorageConnectionError) as caught:
                await storage.get("nothing")
            error = caught.value
            for kind in (StorageError, BrokerConnectionError, ConnectionError, ComponentError):
                assert isinstance(error, kind), kind
            assert f"127.0.0.1:{server.port}" in str(error)
    finally:
        server.close()
