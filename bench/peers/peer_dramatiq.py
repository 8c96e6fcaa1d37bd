"""dramatiq: RedisBroker + Results middleware with the Redis backend; threads for concurrency.

Event loop: none; one consumer thread fetches from Redis (backing off up to ``worker_timeout``
when the queue is empty) and ``--threads`` worker threads run the tasks."""

from __future__ import annotations

import os

import _common as c
import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

broker = RedisBroker(url=c.REDIS_URL)
broker.add_middleware(Results(backend=RedisBackend(url=c.REDIS_URL)))
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="incr", queue_name=c.QUEUE, max_retries=0)
def incr(key: str) -> None:
    c.incr_sync(key)


@dramatiq.actor(actor_name="sleep_incr", queue_name=c.QUEUE, max_retries=0)
def sleep_incr() -> None:
    c.sleep_incr_sync()


@dramatiq.actor(actor_name="echo", queue_name=c.QUEUE, max_retries=0, store_results=True)
def echo(x: int) -> int:
    return x


@dramatiq.actor(actor_name="signal", queue_name=c.QUEUE, max_retries=0)
def signal(port: int, seq: int) -> None:
    c.send_signal(port, seq)


class Ops:
    def incr(self, key: str) -> None:
        incr.send(key)

    def sleep_incr(self) -> None:
        sleep_incr.send()

    def signal(self, port: int, seq: int) -> None:
        signal.send(port, seq)

    def roundtrip(self, i: int) -> int:
        message = echo.send(i)
        return int(message.get_result(block=True, timeout=5000))


def worker() -> None:
    # The Redis consumer polls with backoff up to worker_timeout (default 1000 ms).
    # dramatiq reads this exact lower-case name.
    os.environ["dramatiq_worker_timeout"] = str(int(c.POLL * 1000))  # noqa: SIM112
    c.exec_cli(
        "dramatiq",
        "peer_dramatiq",
        "--processes",
        "1",
        "--threads",
        str(c.CONCURRENCY),
        "--queues",
        c.QUEUE,
    )


if __name__ == "__main__":
    c.main(Ops, worker)
