"""Confirm and delivery latency of persistent messages on one RabbitMQ queue, by queue version.

A publisher (publisher confirms) and a consumer on separate aiormq connections; each of N
sequential publishes of a ~300-byte persistent message is timed to its confirm and to its
arrival at the consumer. Consumer modes: ``ack`` (acks each message at once), ``hold-first``
(keeps the first message unacked, acks the rest at once), ``never`` (acks nothing) and ``none``
(no consumer: confirm only). Prints p50 per case; queues are deleted afterwards.

Run: ``uv run python bench/rabbitmq_confirm_latency.py [N]``. See docs/benchmarks.md (RabbitMQ)
for what it showed about classic queue version 2 on RabbitMQ 3.10.
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import sys
import time
import uuid

import aiormq

URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
VERSIONS = {"v1": {"x-queue-version": 1}, "v2": {"x-queue-version": 2}}
MODES = ("ack", "hold-first", "never", "none")


async def measure(arguments: dict[str, int], mode: str, n: int) -> tuple[float, float | None]:
    queue = f"qtasks-latency-{uuid.uuid4().hex[:8]}"
    publisher = await aiormq.connect(URL)
    consumer = await aiormq.connect(URL)
    try:
        channel = await publisher.channel(publisher_confirms=True)
        await channel.queue_declare(queue, durable=True, arguments=arguments)
        arrived: dict[bytes, float] = {}
        got = asyncio.Event()
        if mode != "none":
            receiving = await consumer.channel(publisher_confirms=False)
            await receiving.basic_qos(prefetch_count=n + 1)

            async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
                arrived[message.body[:8]] = time.perf_counter()
                got.set()
                first = message.body[:8] == b"%08d" % 0
                if mode == "ack" or (mode == "hold-first" and not first):
                    await receiving.basic_ack(message.delivery_tag)

            await receiving.basic_consume(queue, on_message)
        persistent = aiormq.spec.Basic.Properties(delivery_mode=2)
        confirms, deliveries = [], []
        for i in range(n):
            body = b"%08d" % i + b"x" * 300
            got.clear()
            start = time.perf_counter()
            await channel.basic_publish(body, routing_key=queue, properties=persistent)
            confirms.append(time.perf_counter() - start)
            if mode != "none":
                await asyncio.wait_for(got.wait(), 10)
                deliveries.append(arrived[body[:8]] - start)
        await channel.queue_delete(queue)
    finally:
        await consumer.close()
        await publisher.close()
    return statistics.median(confirms) * 1000, (
        statistics.median(deliveries) * 1000 if deliveries else None
    )


async def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    logging.disable(logging.WARNING)  # aiormq logs every consumer cancelled by queue_delete
    for version, arguments in VERSIONS.items():
        for mode in MODES:
            confirm, delivery = await measure(arguments, mode, n)
            shown = "-" if delivery is None else f"{delivery:.3f} ms"
            print(f"{version} {mode:10} confirm p50 {confirm:.3f} ms  delivery p50 {shown}")


if __name__ == "__main__":
    asyncio.run(main())
