"""The worker's health probe with the Redis broker: a network partition between the worker's
consumer and a real Redis (a fault proxy holding every byte) makes ``/livez`` and ``/readyz``
answer 503 once the consumer's claim has gone unanswered past ``health_stall_limit``, and 200
again once the partition heals (peers' goal G4: "alive but not consuming")."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import anyio
import pytest
from faultproxy import FaultProxy
from health_probe import probe, probed_app, until

from qtasks_redis import RedisBroker

pytestmark = pytest.mark.anyio

LIMIT = 2.5
"""The stall limit: over the idle claim's own wait here (the broker's lease, 1 s)."""


async def test_a_partitioned_consumer_fails_the_probe_until_it_heals(
    redis_url: str, redis_prefix: str
) -> None:
    parts = urlsplit(redis_url)
    with FaultProxy((parts.hostname or "127.0.0.1", parts.port or 6379)) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}{parts.path}"
        app = probed_app(RedisBroker(url, prefix=redis_prefix, queue="health", lease=1.0), LIMIT)

        try:
            async with app:
                port = app.worker.health_port
                assert port is not None
                # Idle and healthy: each blocking claim (1 s) is answered, over several.
                most = 0.0
                until_t = time.monotonic() + 3.0
                while time.monotonic() < until_t:
                    code, body = await probe(port, "/livez")
                    assert code == 200, body
                    most = max(most, body["consume_stalled"])
                    await anyio.sleep(0.1)
                assert most < LIMIT
                proxy.blackhole()
                body = await until(port, "/livez", 503, 20)
                assert body["status"] == "stalled" and body["consume_stalled"] > LIMIT
                code, body = await probe(port, "/readyz")
                assert (code, body["status"]) == (503, "stalled")
                proxy.passthrough()
                body = await until(port, "/readyz", 200, 60)
                assert body["consume_stalled"] < LIMIT
                record = await app.add_task("noop", timeout=30)
                assert record.returning == "done"
        finally:
            await app.aclose()
