"""The worker's health probe with the RabbitMQ broker: connections to a real RabbitMQ reset
and refused (a fault proxy) leave the consumer closed, so ``/livez`` and ``/readyz`` answer
503 once it has been down past ``health_stall_limit``, and 200 again once the broker's link
reconnects and the consumer is open again (peers' goal G4: "alive but not consuming")."""

from __future__ import annotations

import pytest
from faultproxy import FaultProxy
from health_probe import probe, probed_app, until
from yarl import URL as ParsedURL

from qtasks_rabbitmq import RabbitMQBroker

from .conftest import URL, delete_topology

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq]

LIMIT = 1.5


async def test_a_consumer_cut_off_fails_the_probe_until_it_consumes_again(
    queue_name: str,
) -> None:
    parsed = ParsedURL(URL)
    with FaultProxy((parsed.host or "127.0.0.1", parsed.port or 5672)) as proxy:
        url = str(parsed.with_host("127.0.0.1").with_port(proxy.port))
        app = probed_app(RabbitMQBroker(url, queue=queue_name, connect_timeout=2.0), LIMIT)

        try:
            async with app:
                port = app.worker.health_port
                assert port is not None
                code, body = await probe(port, "/readyz")
                assert (code, body["consume_stalled"]) == (200, 0.0), body
                proxy.reset()  # every connection reset, every new one too
                body = await until(port, "/livez", 503, 20)
                assert body["status"] == "stalled" and body["consume_stalled"] > LIMIT
                assert (await probe(port, "/readyz"))[0] == 503
                proxy.passthrough()
                body = await until(port, "/readyz", 200, 60)
                assert body["consume_stalled"] == 0.0
                record = await app.add_task("noop", timeout=30)
                assert record.returning == "done"
        finally:
            await app.aclose()
            await delete_topology(queue_name)
