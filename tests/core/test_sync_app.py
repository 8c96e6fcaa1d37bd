"""The sync app is a facade over the async one: same behaviour, blocking calls."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qtasks import AsyncQueueTasks, QueueTasks, TaskStatus, TaskTimeoutError
from qtasks.task import SyncTaskDef

ROOT = Path(__file__).resolve().parents[2]


def test_sync_app_runs_tasks_in_background_worker() -> None:
    app = QueueTasks()

    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    @app.task
    async def hello(name: str) -> str:
        return f"hello {name}"

    assert isinstance(add, SyncTaskDef)
    assert isinstance(app.aio, AsyncQueueTasks)
    try:
        with app:
            assert add.add_task(1, 2, timeout=5).returning == 3
            task = hello.add_task("you")
            assert task.wait_result(timeout=5).returning == "hello you"
            assert app.get(task.uuid).status is TaskStatus.SUCCESS  # type: ignore[union-attr]
    finally:
        app.close()


def test_sync_timeout_raises() -> None:
    app = QueueTasks()

    @app.task
    def job() -> None: ...

    try:
        with pytest.raises(TaskTimeoutError):
            app.add_task("job", timeout=0.05)  # no worker serving
    finally:
        app.close()


def test_quickstart_example_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "add: 5" in out
    assert "countdown steps: [3, 2, 1]" in out


SERVER = textwrap.dedent(
    """
    import sys, anyio
    from qtasks import AsyncQueueTasks, QueueConfig, hookimpl

    app = AsyncQueueTasks(config=QueueConfig(shutdown_grace=10))
    release = anyio.Event()

    @app.task
    async def long_job() -> str:
        print("running", flush=True)
        await anyio.sleep(0.5)  # the job's own work, not a test wait
        return "finished"

    class Kickoff:
        @hookimpl
        async def qtasks_broker_listening(self, app):
            task = await app.add_task("long_job")
            print("uuid", task.uuid, flush=True)

        @hookimpl
        async def qtasks_app_stopped(self, app):
            pass

    class Report:
        @hookimpl
        async def qtasks_task_succeeded(self, record):
            print("result", record.returning, flush=True)

    app.add_plugin(Kickoff())
    app.add_plugin(Report())
    app.run_forever()
    print("stopped cleanly", flush=True)
    """
)


def test_run_forever_stops_gracefully_on_sigterm(tmp_path: Path) -> None:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("running"):
                proc.terminate()  # SIGTERM while the task runs
                break
        out, err = proc.communicate(timeout=30)
        lines.extend(out.splitlines())
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    # the running task finished within the grace period before the process stopped
    assert "result finished" in lines
    assert lines[-1] == "stopped cleanly"
