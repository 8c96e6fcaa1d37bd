"""CPU per message of ``RabbitMQBroker.publish_many`` (publisher confirms on), on both sides:
the producer's (this process) and the RabbitMQ server's (its ``beam.smp`` process, read from
``/proc``: the server must run on this machine).

Several rounds of N messages to a fresh default queue (classic, priorities on, durable,
persistent messages); every figure is printed, nothing asserted. Other load on the machine
shows in the server's figure as in any other; compare runs interleaved.

Run: ``uv run --all-packages python bench/rabbitmq_bulk_cost.py [--n 20000] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
import uuid
from contextlib import AsyncExitStack

import anyio
from workflows import AMQP, _delete_queue

from qtasks.config import QueueConfig
from qtasks.messages import Envelope
from qtasks_rabbitmq import RabbitMQBroker


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main(n: int, rounds: int, beam: int) -> None:
    print(f"# bench/rabbitmq_bulk_cost.py  n={n} rounds={rounds}  load {os.getloadavg()[0]:.2f}")
    for _ in range(rounds):
        broker = RabbitMQBroker(AMQP, queue=f"bench-cost-{uuid.uuid4().hex[:8]}")
        async with AsyncExitStack() as stack:
            await broker.start(stack, QueueConfig(broker="rabbitmq"))
            body = b'{"task":"noop","args":[1],"kwargs":{}}'
            envelopes = [Envelope(uuid.uuid4().hex, body) for _ in range(n)]
            await broker.publish_many(envelopes[:500])  # warm-up
            server, producer = server_cpu(beam), time.process_time()
            started = time.perf_counter()
            await broker.publish_many(envelopes)
            wall = time.perf_counter() - started
            server, producer = server_cpu(beam) - server, time.process_time() - producer
        await _delete_queue(broker)
        print(
            f"publish_many {n / wall:,.0f} msgs/s; CPU per message: producer "
            f"{producer / n * 1e6:.1f} us, RabbitMQ {server / n * 1e6:.1f} us",
            flush=True,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    beam = int(subprocess.run(["pgrep", "-o", "beam.smp"], capture_output=True, check=True).stdout)
    anyio.run(main, options.n, options.rounds, beam)
