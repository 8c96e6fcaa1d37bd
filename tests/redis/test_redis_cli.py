"""``qtasks run --broker redis`` works with no code change once qtasks-redis is installed:
a real ``qtasks run`` process serves what ``qtasks add`` (another process) enqueues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import redis

TASKS = """
from qtasks import QueueConfig, QueueTasks

# In-memory by default: the command line picks Redis. The prefix keeps this test's keys apart
# from a developer's own (the app is built in code, so it does not read a qtasks.toml).
app = QueueTasks(config=QueueConfig(extra={"redis_prefix": PREFIX}))


@app.task
def add(a: int, b: int) -> int:
    return a + b
"""


def test_qtasks_run_with_redis_flags_serves_qtasks_add(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    (tmp_path / "tasks.py").write_text(TASKS.replace("PREFIX", repr(redis_prefix)))
    flags = [
        "-A", "tasks:app",
        "--broker", "redis", "--broker-url", redis_url,
        "--storage", "redis", "--storage-url", redis_url,
        "--global-config", "redis",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "QTASKS_GLOBAL_CONFIG_URL": redis_url}
    qtasks = [sys.executable, "-m", "qtasks"]
    server = subprocess.Popen(
        [*qtasks, "run", *flags],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        added = subprocess.run(
            [*qtasks, "add", "add", "2", "3", "--wait", "20", "--json", *flags],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert added.returncode == 0, added.stdout + added.stderr
        record = json.loads(added.stdout)
        assert (record["status"], record["returning"]) == ("success", 5)
        client = redis.Redis.from_url(redis_url)
        try:  # under the test's own prefix, not the default one of a developer's Redis
            assert client.exists(f"{{{redis_prefix}:rec}}:r:{record['uuid']}")
        finally:
            client.close()
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=30)
        assert server.returncode == 0, out
        assert "redis" in out.lower()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
