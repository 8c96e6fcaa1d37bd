"""A worker that stopped cleanly is listed as gone at once (its heartbeat removed); one that was
killed expires after three heartbeat intervals, as before. Real ``qtasks run`` processes on
Redis, watched through another app's global config and ``ping()``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

TASKS = """
from qtasks import QueueConfig, QueueTasks

app = QueueTasks(config=QueueConfig(heartbeat_interval=INTERVAL, extra={"redis_prefix": PREFIX}))


@app.task
def add(a: int, b: int) -> int:
    return a + b
"""

INTERVAL = 1.0
"""The workers' heartbeat_interval: a heartbeat lives three of them."""


@contextmanager
def serving(tmp_path: Path, redis_url: str, prefix: str) -> Iterator[subprocess.Popen[str]]:
    """``qtasks run`` on Redis under ``prefix``, killed at the end if still running."""
    (tmp_path / "tasks.py").write_text(
        TASKS.replace("PREFIX", repr(prefix)).replace("INTERVAL", repr(INTERVAL))
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
    # The tree under test, not whichever one is installed.
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *sys.path])
    flags = ["--broker", "redis", "--broker-url", redis_url]
    proc = subprocess.Popen(
        [sys.executable, "-m", "qtasks", "-A", "tasks:app", "run", *flags],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


async def listed(app: AsyncQueueTasks, proc: subprocess.Popen[str]) -> str:
    """The id of the one worker listed, once its first heartbeat is there (another process:
    polled, with a deadline)."""
    with anyio.fail_after(30):
        while not (workers := await app.global_config.workers()):
            assert proc.poll() is None, proc.communicate()[1]
            await anyio.sleep(0.05)
    [worker] = workers
    return worker


@pytest.fixture
async def watcher(redis_url: str, redis_prefix: str) -> AsyncIterator[AsyncQueueTasks]:
    """An app on the workers' Redis, its components started (it serves nothing itself)."""
    app = AsyncQueueTasks(
        broker=RedisBroker(redis_url, prefix=redis_prefix),
        storage=RedisStorage(redis_url, prefix=redis_prefix),
        global_config=RedisGlobalConfig(redis_url, prefix=redis_prefix),
        config=QueueConfig(),
    )
    await app.start()
    try:
        yield app
    finally:
        await app.aclose()


@pytest.mark.anyio
@pytest.mark.timeout(90)
async def test_a_worker_stopped_cleanly_is_gone_at_once_and_a_killed_one_expires(
    watcher: AsyncQueueTasks, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    with serving(tmp_path, redis_url, redis_prefix) as proc:
        await listed(watcher, proc)
        assert await watcher.ping()
        proc.send_signal(signal.SIGTERM)
        assert await anyio.to_thread.run_sync(proc.wait, 30) == 0
        # Within its heartbeat's life (3 intervals): only its removal explains this.
        assert await watcher.global_config.workers() == {}
        assert not await watcher.ping()

    with serving(tmp_path, redis_url, redis_prefix) as proc:
        worker = await listed(watcher, proc)
        proc.send_signal(signal.SIGKILL)
        await anyio.to_thread.run_sync(proc.wait, 30)
        assert worker in await watcher.global_config.workers()  # no clean stop: still there
        with anyio.fail_after(3 * INTERVAL + 10):  # it expires
            while worker in await watcher.global_config.workers():  # noqa: ASYNC110 - a remote key
                await anyio.sleep(0.05)
