"""How much of the in-memory worker's time Python's cycle collector takes, and what one JSON
message body costs to decode.

Prints, for 3 runs of ``bench/inmemory.py``'s async workload (20,000 no-op tasks each, one
process, after a warm-up of 5,000): throughput, the collections by generation with their
total milliseconds (``gc.callbacks``), and the collector's share of the run's wall time. Then
the mean µs of decoding one message body with ``JSONSerializer().loads`` over 200,000 calls.
Run: ``uv run python bench/gc_share.py``.
"""

from __future__ import annotations

import collections
import gc
import sys
import time
import timeit
from pathlib import Path
from typing import Any

import anyio

from qtasks.messages import JSONSerializer, Message

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inmemory import throughput  # bench/inmemory.py's workload


async def main() -> None:
    spent: collections.Counter[int] = collections.Counter()
    count: collections.Counter[int] = collections.Counter()
    began = [0.0]

    def watch(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            spent[info["generation"]] += time.perf_counter() - began[0]
            count[info["generation"]] += 1

    await throughput("async", 5000)
    for _ in range(3):
        spent.clear()
        count.clear()
        gc.callbacks.append(watch)
        start = time.perf_counter()
        rate = await throughput("async", 20_000)
        elapsed = time.perf_counter() - start
        gc.callbacks.remove(watch)
        by_gen = {g: f"{count[g]} x, {spent[g] * 1000:.1f} ms" for g in sorted(count)}
        share = 100 * sum(spent.values()) / elapsed
        print(f"{rate:8.0f} tasks/s  collections {by_gen}  collector share {share:.1f} %")
    serializer = JSONSerializer()
    body = serializer.dumps(Message(uuid="a" * 32, task_name="noop").to_wire())
    n = 200_000
    mean = timeit.timeit(lambda: serializer.loads(body), number=n) / n * 1e6
    print(f"decode one message body ({len(body)} bytes): {mean:.2f} us")


if __name__ == "__main__":
    anyio.run(main)
