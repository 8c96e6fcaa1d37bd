"""An app moves from one event loop to the next (in-memory components; Redis and RabbitMQ in
tests/redis/test_redis_loops.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

from qtasks import AsyncQueueTasks, TaskStatus, hookimpl


def test_the_loops_end_closes_the_app_and_the_next_loop_starts_it() -> None:
    app = AsyncQueueTasks()
    events: list[str] = []

    class Recorder:
        @hookimpl
        def qtasks_app_started(self, app: AsyncQueueTasks) -> None:
            events.append("started")

        @hookimpl
        def qtasks_app_stopped(self, app: AsyncQueueTasks) -> None:
            events.append("stopped")

    app.add_plugin(Recorder())

    @app.task
    async def double(n: int) -> int:
        return 2 * n

    async def produce() -> str:
        return (await double.add_task(21)).uuid

    async def serve(uuid: str) -> int:
        async with app:
            done = await app.wait(uuid, timeout=10)
            return int(done.returning)

    uuid = asyncio.run(produce())
    assert not app.started, "the loop's end closed the components"
    assert asyncio.run(serve(uuid)) == 42
    assert events == ["started", "stopped", "started", "stopped"]


SYNC_SCRIPT = """
import os
import signal

from qtasks import QueueTasks

app = QueueTasks()


@app.task
def add(a: int, b: int) -> int:
    os.kill(os.getpid(), signal.SIGINT)  # the worker stops gracefully once this returns
    return a + b


task = add.add_task(1, 2)  # starts the app in the background thread's loop
app.run_forever()  # serves in this thread's own loop
print(app.get(task.uuid).status.value, app.get(task.uuid).returning)
"""


def test_sync_app_used_then_served_with_run_forever(tmp_path: Path) -> None:
    """Adding tasks starts the sync app in its background loop; ``run_forever`` serves in a loop
    of its own: the components move over (closed there, started here)."""
    script = tmp_path / "sync_app.py"
    script.write_text(textwrap.dedent(SYNC_SCRIPT))
    done = subprocess.run(
        [sys.executable, "-W", "default", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [TaskStatus.SUCCESS.value, "3"]
    # run_forever logs to stderr at INFO (nothing else set logging up): nothing else is there
    assert [line for line in done.stderr.splitlines() if " INFO qtasks" not in line] == []
