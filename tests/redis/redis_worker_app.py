"""A qtasks app on Redis for the end-to-end tests, in process or as a worker subprocess.

Run as ``python redis_worker_app.py`` to serve until SIGTERM; settings come from environment
variables (``QT_URL``, ``QT_PREFIX``, ``QT_LEASE``, ``QT_CONCURRENCY``, ``QT_LEDGER``,
``QT_CONFIG``: further QueueConfig fields as JSON, and ``QT_LOG_LEVEL``, ``WARNING`` unless
set); the log goes to stderr. Every
execution appends ``start``/``end`` lines to the ledger file, opened with ``O_APPEND`` so the lines
survive a SIGKILL of the worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import anyio

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage


def build(
    url: str,
    prefix: str,
    *,
    lease: float = 30.0,
    concurrency: int = 10,
    prefetch: int | None = None,
    ledger: str | None = None,
    broker_type: type[RedisBroker] = RedisBroker,
    **config: Any,
) -> AsyncQueueTasks:
    """An app whose three components are on Redis under ``prefix`` (the broker a
    ``broker_type``)."""
    settings = QueueConfig(
        lease=lease,
        max_tasks_process=concurrency,
        prefetch=concurrency if prefetch is None else prefetch,
        heartbeat_interval=0.5,
        shutdown_grace=1.0,
    ).merged(**config)
    app = AsyncQueueTasks(
        "redis-tests",
        broker=broker_type(url, prefix=prefix, queue="e2e"),
        storage=RedisStorage(url, prefix=prefix),
        global_config=RedisGlobalConfig(url, prefix=prefix),
        config=settings,
    )

    def note(line: str) -> None:
        if ledger:
            fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{line} {os.getpid()}\n".encode())
            finally:
                os.close(fd)

    @app.task
    async def noop(i: int) -> int:
        note(f"end {i}")
        return i * 2

    @app.task
    async def slow(i: int, seconds: float) -> int:
        note(f"start {i}")
        await anyio.sleep(seconds)
        note(f"end {i}")
        return i

    @app.task
    def blocking_slow(i: int, seconds: float) -> int:
        note(f"start {i}")
        time.sleep(seconds)  # a sync task runs in a worker thread
        note(f"end {i}")
        return i

    @app.task
    async def cancellable(i: int, seconds: float) -> int:
        note(f"start {i}")
        try:
            await anyio.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            note(f"cancelled {i}")
            raise
        note(f"end {i}")
        return i

    @app.task
    async def loop_hog(i: int, seconds: float) -> int:
        """Blocks its worker's event loop (a sync call inside ``async def``)."""
        note(f"start {i}")
        time.sleep(seconds)  # noqa: ASYNC251 - on purpose: the loop stalls, renewals stop
        note(f"end {i}")
        return i

    @app.task
    async def stubborn(i: int, seconds: float) -> int:
        """Ignores cancellation: its result comes in after any cancel."""
        note(f"start {i}")
        with anyio.CancelScope(shield=True):
            await anyio.sleep(seconds)
        note(f"end {i}")
        return i

    @app.task
    async def digest(i: int, payload: str) -> str:
        """The SHA-256 of ``payload`` as it arrived (the caller compares it with its own)."""
        note(f"start {i}")
        value = hashlib.sha256(payload.encode()).hexdigest()
        note(f"end {i}")
        return value

    @app.task
    async def suicide(i: int) -> None:
        """Kills its own worker process (SIGKILL) every time it runs, as an OOM kill or a
        crashing C extension would."""
        note(f"start {i}")
        os.kill(os.getpid(), signal.SIGKILL)

    @app.task
    async def steps(n: int) -> Any:
        for i in range(n):
            yield {"step": i}

    @app.task
    async def paced_steps(n: int, pause: float) -> Any:
        """``n`` steps ``pause`` seconds apart, each naming the process that yielded it."""
        for i in range(n):
            yield {"step": i, "pid": os.getpid()}
            await anyio.sleep(pause)

    return app


def main() -> None:
    level = os.environ.get("QT_LOG_LEVEL", "WARNING")
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    app = build(
        os.environ["QT_URL"],
        os.environ["QT_PREFIX"],
        lease=float(os.environ.get("QT_LEASE", "30")),
        concurrency=int(os.environ.get("QT_CONCURRENCY", "10")),
        ledger=os.environ.get("QT_LEDGER"),
        **json.loads(os.environ.get("QT_CONFIG") or "{}"),
    )
    print("serving", flush=True)
    app.run_forever()
    sys.exit(0)


if __name__ == "__main__":
    main()
