"""State on a Redis global config: ``update_with``'s lock against a holder that outlived its
TTL (see tests/state_lock.py)."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
from state_lock import a_late_unlock_spares_the_next_holder

from qtasks import QueueConfig
from qtasks_redis import RedisGlobalConfig

pytestmark = pytest.mark.anyio


async def test_a_late_unlock_never_deletes_the_next_holders_lock(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = RedisGlobalConfig(redis_url, prefix=redis_prefix)
    async with AsyncExitStack() as stack:
        await config.start(stack, QueueConfig())
        await a_late_unlock_spares_the_next_holder(config, "late-unlock", monkeypatch)
