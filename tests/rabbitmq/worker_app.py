"""A worker process for the end-to-end tests: ``python worker_app.py QUEUE OUTDIR [REDIS_URL
PREFIX]``.

Tasks write what they did into files under OUTDIR (results cannot be shared through an in-memory
storage across processes); with REDIS_URL and PREFIX the storage is Redis, shared with the test.
It serves until SIGTERM, or until it is killed. Environment: ``QTASKS_TEST_RABBITMQ_URL`` (the
server), ``WORKER_MAX_DELIVERIES``, ``WORKER_SHUTDOWN_GRACE`` (5 unless set),
``WORKER_CONCURRENCY`` and ``WORKER_PREFETCH`` (4 unless set), ``WORKER_QUEUE_TYPE``,
``WORKER_HEARTBEAT`` (the AMQP heartbeat, 30 unless set), ``WORKER_LEASE`` (30 unless set, 60
with a Redis storage) and ``WORKER_MAX_SECONDS`` (the longest a task of this worker runs,
whatever it was asked).
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import anyio

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks_rabbitmq import RabbitMQBroker
from qtasks_redis import RedisStorage

URL = os.environ.get("QTASKS_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")


def build(
    queue: str, out: Path, redis_url: str | None = None, prefix: str = "qtasks"
) -> AsyncQueueTasks:
    heartbeat = int(os.environ.get("WORKER_HEARTBEAT", "30"))
    longest = float(os.environ.get("WORKER_MAX_SECONDS", "inf"))
    app = AsyncQueueTasks(
        broker=RabbitMQBroker(
            URL,
            queue=queue,
            heartbeat=heartbeat,
            queue_type="quorum" if os.environ.get("WORKER_QUEUE_TYPE") == "quorum" else "classic",
        ),
        storage=None if redis_url is None else RedisStorage(redis_url, prefix=prefix),
        # With a Redis storage (the cancel tests) the lease is long: its renewal (lease / 3)
        # must not be what tells a worker of a cancel.
        config=QueueConfig(
            max_tasks_process=int(os.environ.get("WORKER_CONCURRENCY", "4")),
            prefetch=int(os.environ.get("WORKER_PREFETCH", "4")),
            shutdown_grace=float(os.environ.get("WORKER_SHUTDOWN_GRACE", "5")),
            lease=float(os.environ.get("WORKER_LEASE", "30" if redis_url is None else "60")),
            max_deliveries=int(os.environ.get("WORKER_MAX_DELIVERIES", "5")),
        ),
    )

    def note(name: str, line: str) -> None:
        with open(out / name, "a") as file:
            file.write(line + "\n")

    @app.task
    def slow(tag: str, seconds: float) -> str:
        note("started", f"{tag} {os.getpid()}")
        time.sleep(seconds)
        note("done", f"{tag} {os.getpid()}")
        return tag

    @app.task
    async def cancellable(tag: str, seconds: float) -> str:
        note("started", f"{tag} {os.getpid()}")
        try:
            await anyio.sleep(min(seconds, longest))
        except anyio.get_cancelled_exc_class():
            note("cancelled", f"{tag} {os.getpid()}")
            raise
        note("done", f"{tag} {os.getpid()}")
        return tag

    @app.task
    async def digest(tag: str, payload: str, seconds: float) -> str:
        """Notes the SHA-256 of the payload it was given, as it was given (UTF-8): the test
        compares it with what it sent."""
        note("started", f"{tag} {os.getpid()}")
        await anyio.sleep(seconds)
        sha = hashlib.sha256(payload.encode()).hexdigest()
        note("done", f"{tag} {os.getpid()} {sha}")
        return sha

    @app.task
    async def record(i: int) -> int:
        note("done", str(i))
        return i

    @app.task
    def suicide(i: int) -> None:
        """Kills its worker process, every time it runs."""
        note("killed", f"{i} {os.getpid()}")
        os.kill(os.getpid(), signal.SIGKILL)

    return app


if __name__ == "__main__":
    build(sys.argv[1], Path(sys.argv[2]), *sys.argv[3:]).run_forever()
