"""Redis server time per message of the producer's script (PUBLISH_NEW: record + message) and
the worker's two: the claim that begins records (CLAIM_BEGIN) and the batched final save + ack
(ACK_FINALS), from ``INFO commandstats``.

2,000 messages are published with their records, claimed 20 at a time through
``consume_begun`` and settled 20 at a time through ``ack_finals``. Server time only (the
client's CPU is in ``redis_throughput.py``). Uses db 11 of ``QTASKS_BENCH_REDIS``
(default ``redis://127.0.0.1:6379/11``) and flushes it.

Run: ``uv run python bench/redis_scripts.py [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from contextlib import AsyncExitStack

import redis

from qtasks.config import QueueConfig
from qtasks.messages import Codec, Message
from qtasks.record import TaskRecord, TaskStatus
from qtasks_redis import RedisBroker, RedisStorage

URL = os.environ.get("QTASKS_BENCH_REDIS", "redis://127.0.0.1:6379/11")
N, BATCH = 2000, 20


def evalsha_usec(client: redis.Redis) -> int:
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("usec", 0))


async def one_round(client: redis.Redis) -> tuple[float, float]:
    client.flushdb()
    config = QueueConfig()
    async with AsyncExitStack() as stack:
        storage = RedisStorage(URL, prefix="bench")
        broker = RedisBroker(URL, prefix="bench", queue="q")
        await storage.start(stack, config)
        await broker.start(stack, config)
        codec = Codec()
        start = evalsha_usec(client)
        for i in range(N):
            message = Message(uuid=f"u{i:05d}", task_name="t")
            record = TaskRecord(uuid=message.uuid, task_name="t")
            await broker.publish_new(codec.encode(message), storage, record)
        published = evalsha_usec(client)
        before = published
        async with broker.consume_begun(
            prefetch=BATCH, storage=storage, worker="w", starts=lambda: BATCH
        ) as it:
            deliveries = [await it.__anext__() for _ in range(N)]
            claimed = evalsha_usec(client)
            for i in range(0, N, BATCH):
                finals = []
                for delivery in deliveries[i : i + BATCH]:
                    record = delivery.begun
                    assert record is not None
                    record.status = TaskStatus.SUCCESS
                    finals.append((delivery, record))
                assert all(await broker.ack_finals(storage, finals))
            settled = evalsha_usec(client)
    return (published - start) / N, (claimed - before) / N, (settled - claimed) / N


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args()
    client = redis.Redis.from_url(URL)
    results = [asyncio.run(one_round(client)) for _ in range(opts.rounds)]
    publishes, claims, settles = (sorted(r[k] for r in results) for k in range(3))
    print(
        f"Redis time per message over {opts.rounds} rounds of {N}: record + message "
        f"(publish_new, one script each) median {publishes[len(publishes) // 2]:.1f} µs; "
        f"claim with begin (batches of {BATCH}) median {claims[len(claims) // 2]:.1f} µs; "
        f"final save + ack (batches of {BATCH}) median {settles[len(settles) // 2]:.1f} µs"
    )
    client.flushdb()


if __name__ == "__main__":
    main()
