"""How late ``asyncio.sleep`` wakes on asyncio's default loop and on the loop qtasks makes
(:mod:`qtasks.loop`), for sleeps of a few milliseconds on an otherwise idle loop, and for 100
tasks each sleeping 10 ms 20 times in a row (the shape of the W3 workload, without a broker).

Run: ``uv run python bench/timer_precision.py [--n 400]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable

from qtasks.loop import new_event_loop


async def lone(n: int) -> list[float]:
    late: list[float] = []
    for i in range(n):
        wanted = 0.001 + (i % 7) * 0.0007  # 1.0 .. 5.2 ms, off the millisecond grid
        start = time.perf_counter()
        await asyncio.sleep(wanted)
        late.append(time.perf_counter() - start - wanted)
    return late


async def crowd(tasks: int = 100, rounds: int = 20) -> float:
    async def one() -> None:
        for _ in range(rounds):
            await asyncio.sleep(0.010)

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(tasks)))
    return time.perf_counter() - start


def measure(name: str, factory: Callable[[], asyncio.AbstractEventLoop], n: int) -> None:
    loop = factory()
    try:
        late = sorted(loop.run_until_complete(lone(n)))
        wall = loop.run_until_complete(crowd())
    finally:
        loop.close()
    ms = [x * 1000 for x in late]
    print(
        f"{name:8} lone sleeps late by: mean {statistics.mean(ms):.3f} ms, "
        f"p50 {ms[len(ms) // 2]:.3f}, p95 {ms[int(len(ms) * 0.95)]:.3f}, max {ms[-1]:.3f}; "
        f"100 tasks x 20 sleeps of 10 ms: {wall * 1000:.1f} ms (ideal 200)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=400, help="lone sleeps per loop")
    opts = parser.parse_args()
    for _ in range(2):
        measure("asyncio", asyncio.new_event_loop, opts.n)
        measure("qtasks", new_event_loop, opts.n)


if __name__ == "__main__":
    main()
