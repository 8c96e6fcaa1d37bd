"""CPU per task of bulk enqueue on Redis: ``task.add_tasks(range(N))`` three times from one
producer (broker and storage on one server), with the rate, the producer's CPU (process time)
and the Redis server's CPU (``INFO cpu``, the whole server's: run it with nothing else using
Redis) per task. Run: ``uv run python bench/redis_bulk_cost.py [N]`` (default 20,000)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).parent))
import workflows


def redis_cpu() -> float:
    client = redis.Redis.from_url(workflows.URL)
    try:
        info = client.info("cpu")
    finally:
        client.close()
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def main(n: int) -> None:
    prefix = "bench-bulk-cost"
    app = workflows.redis_app(prefix)
    try:
        await app.start()
        noop = app.tasks["noop"]
        await noop.add_tasks(range(100))  # warm-up: connections, scripts loaded
        for _ in range(3):
            server, mine, started = redis_cpu(), time.process_time(), time.perf_counter()
            await noop.add_tasks(range(n))
            wall = time.perf_counter() - started
            mine, server = time.process_time() - mine, redis_cpu() - server
            print(
                f"{n / wall:,.0f} tasks/s; CPU per task: producer {mine / n * 1e6:.1f} us, "
                f"Redis {server / n * 1e6:.1f} us"
            )
    finally:
        await app.aclose()
        workflows.delete(prefix)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000))
