"""A worker process for the end-to-end tests: ``python worker_app.py QUEUE OUTDIR``.

Tasks write what they did into files under OUTDIR (results cannot be shared through an in-memory
storage across processes). It serves until SIGTERM, or until it is killed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks_rabbitmq import RabbitMQBroker

URL = os.environ.get("QTASKS_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")


def build(queue: str, out: Path) -> AsyncQueueTasks:
    app = AsyncQueueTasks(
        broker=RabbitMQBroker(URL, queue=queue),
        config=QueueConfig(max_tasks_process=4, prefetch=4, shutdown_grace=5),
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
    async def record(i: int) -> int:
        note("done", str(i))
        return i

    return app


if __name__ == "__main__":
    build(sys.argv[1], Path(sys.argv[2])).run_forever()
