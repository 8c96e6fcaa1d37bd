"""celery: Redis or AMQP broker (BENCH_BROKER), Redis result backend, thread pool worker.

Event loop: none of asyncio's; the worker's consumer runs on kombu's own epoll hub and the tasks
run in a pool of ``--concurrency`` threads."""

from __future__ import annotations

import os

import _common as c
from celery import Celery, chord, group

BROKER = os.environ.get("BENCH_BROKER", "redis")

app = Celery("peer_celery", broker=c.AMQP_URL if BROKER == "amqp" else c.REDIS_URL)
app.conf.update(
    result_backend=c.REDIS_URL,
    result_expires=600,
    task_default_queue=c.QUEUE,
    broker_connection_retry_on_startup=True,
    worker_enable_remote_control=False,
    worker_send_task_events=False,
)


@app.task(name="incr", ignore_result=True)
def incr(key: str) -> None:
    c.incr_sync(key)


@app.task(name="sleep_incr", ignore_result=True)
def sleep_incr() -> None:
    c.sleep_incr_sync()


@app.task(name="echo")
def echo(x: int) -> int:
    return x


@app.task(name="signal", ignore_result=True)
def signal(port: int, seq: int) -> None:
    c.send_signal(port, seq)


@app.task(name="count")
def count(results: list[int]) -> int:
    return len(results)


class Ops:
    def incr(self, key: str) -> None:
        incr.delay(key)

    def sleep_incr(self) -> None:
        sleep_incr.delay()

    def signal(self, port: int, seq: int) -> None:
        signal.delay(port, seq)

    def roundtrip(self, i: int) -> int:
        return int(echo.delay(i).get(timeout=5))

    def chord(self, n: int) -> int:
        """W4: Celery canvas, ``chord(group(echo.s(i) ...), count.s())``."""
        result = chord(group(echo.s(i) for i in range(n)), count.s())()
        return int(result.get(timeout=60 + n / 20))

    def cleanup(self) -> None:
        if BROKER == "amqp":
            with app.connection_for_write() as conn:
                try:
                    conn.default_channel.queue_delete(c.QUEUE)
                except Exception:  # already gone
                    pass


def worker() -> None:
    c.exec_cli(
        "celery",
        "-A",
        "peer_celery",
        "worker",
        "--pool",
        "threads",
        "--concurrency",
        str(c.CONCURRENCY),
        "--queues",
        c.QUEUE,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--loglevel",
        "WARNING",
    )


if __name__ == "__main__":
    c.main(Ops, worker)
