"""The sync app is a facade over the async one: same behaviour, blocking calls."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from qtasks import AsyncQueueTasks, QueueTasks, TaskStatus, TaskTimeoutError, hookimpl
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


def _public_async_methods() -> list[str]:
    return sorted(
        name
        for name, value in vars(AsyncQueueTasks).items()
        if not name.startswith("_")
        and (inspect.iscoroutinefunction(value) or inspect.isasyncgenfunction(value))
    )


@pytest.mark.parametrize("name", _public_async_methods())
def test_no_async_method_leaks_through_the_sync_app(name: str) -> None:
    """Each coroutine method of the async app has a blocking twin on the sync app, or is
    refused with a pointer to what to use: never an un-awaited coroutine."""
    app = QueueTasks()
    try:
        if name in vars(QueueTasks):
            method = getattr(app, name)
            assert not inspect.iscoroutinefunction(method)
            assert not inspect.isasyncgenfunction(method)
            assert method.__doc__, f"QueueTasks.{name} has no docstring"
        else:
            with pytest.raises(AttributeError, match=rf"AsyncQueueTasks\.{name} is async"):
                getattr(app, name)
    finally:
        app.close()


def test_sync_admin_methods_block_and_start_the_app() -> None:
    """inspect, dead_letters, requeue_dead_letters, config_get/config_set return values (not
    coroutines) and start the components on first use, as add_task does."""
    app = QueueTasks()
    rejected = threading.Event()

    class Rejections:
        @hookimpl
        def qtasks_task_rejected(self) -> None:
            rejected.set()

    app.add_plugin(Rejections())
    try:
        assert not app.started
        assert app.config_get("ns", "missing", 7) == 7  # no ComponentNotStartedError
        app.config_set("ns", "key", {"a": 1})
        assert app.config_get("ns", "key") == {"a": 1}
        report = app.inspect()
        assert report["app"] == "QueueTasks"
        assert report["queue"]["dead_letters"] == 0
        with app:
            task = app.add_task("no_such_task", timeout=5)
            assert task.status is TaskStatus.ERROR
            assert rejected.wait(5)
            letters = app.dead_letters()
            assert [letter.id for letter in letters] == [task.uuid]
            assert "unknown task" in letters[0].reason
            assert app.requeue_dead_letters([task.uuid]) == 1
    finally:
        app.close()


def test_sync_app_start_is_blocking() -> None:
    app = QueueTasks()
    try:
        assert app.start() is None
        assert app.started
    finally:
        app.close()


@pytest.mark.anyio
async def test_async_config_get_and_set_start_the_app() -> None:
    app = AsyncQueueTasks()
    try:
        assert await app.config_get("ns", "missing", "d") == "d"
        await app.config_set("ns", "k", 3)
        assert await app.config_get("ns", "k") == 3
        assert app.started
    finally:
        await app.aclose()
