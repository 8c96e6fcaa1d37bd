"""SIGINT/SIGTERM to a serving process: the first stops it gracefully and says how long it may
wait; a second cuts the grace period short (running tasks handed back at once); each one is
answered in the log. On real processes: ``qtasks run``, and ``run_forever`` of the async and
the sync app run as a script (the sync app catches signals on its main thread while the loop
runs in another)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest

from qtasks import AsyncQueueTasks, QueueConfig, hookimpl
from qtasks.starter import Stopper

APP_SOURCE = """
import logging
import os
import pathlib
import time

import anyio

from qtasks import AsyncQueueTasks, QueueConfig, QueueTasks, hookimpl

OUT = pathlib.Path(os.environ["OUT_FILE"])
kind = AsyncQueueTasks if os.environ["APP_CLASS"] == "AsyncQueueTasks" else QueueTasks
app = kind("signals", config=QueueConfig(shutdown_grace=GRACE))


def note(line):
    with OUT.open("a") as f:
        f.write(line + "\\n")


@app.task
async def wait_async() -> None:
    note("async started")
    await anyio.sleep(600)  # far past the grace: only a grace cut short ends it soon


@app.task
def wait_sync() -> None:
    note("sync started")
    time.sleep(600)


class Producer:
    @hookimpl
    async def qtasks_broker_listening(self, app):
        await app.add_task("wait_async")
        await app.add_task("wait_sync")

    @hookimpl
    def qtasks_broker_requeued(self, app, delivery, delay):
        note("requeued")


app.add_plugin(Producer())

if __name__ == "__main__":
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    app.run_forever()
    note("run_forever returned")
"""

GRACE = 120
"""The app's shutdown_grace: far longer than the test waits for the process to end."""


class Output:
    """The lines a process writes to stderr, read as they come (waited on with a deadline)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def text(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, needle: str, timeout: float) -> str:
        """The first line containing ``needle``; fails at the deadline or if the process
        ended without writing it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if needle in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    break
                self._changed.wait(left)
        pytest.fail(f"no line with {needle!r} within {timeout} s; stderr:\n{self.text()}")


def wait_file(path: Path, needles: list[str], proc: subprocess.Popen[str], timeout: float) -> None:
    """Until ``path`` holds every one of ``needles`` (the file is written by the tasks, no
    signal to wait on across processes: polled, with a deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if all(needle in text for needle in needles):
            return
        assert proc.poll() is None, f"the process exited ({proc.returncode})"
        time.sleep(0.02)
    pytest.fail(f"{needles} not all in {path} within {timeout} s")


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("how", "app_class"),
    [
        ("qtasks run", "QueueTasks"),
        ("run_forever", "AsyncQueueTasks"),
        ("run_forever", "QueueTasks"),
    ],
)
def test_a_second_signal_hands_running_tasks_back_at_once(
    how: str, app_class: str, tmp_path: Path
) -> None:
    (tmp_path / "sigapp.py").write_text(APP_SOURCE.replace("GRACE", str(GRACE)))
    out_file = tmp_path / "out.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
    # The tree under test, not whichever one is installed.
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *sys.path])
    # A sync task given up on runs on in its thread, which Python would wait for at exit when
    # the loop ran on the main thread (`qtasks run`, a script serving an async app): neither
    # waits for it, each says so. The sync app's loop thread, and so its worker threads, are
    # daemon threads: Python does not wait for them.
    running = 2
    main_loop = how == "qtasks run" or app_class == "AsyncQueueTasks"
    env.update(OUT_FILE=str(out_file), APP_CLASS=app_class)
    if how == "qtasks run":
        command = [sys.executable, "-m", "qtasks", "run", "-A", "sigapp:app"]
    else:
        command = [sys.executable, "sigapp.py"]
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    output = Output(proc)
    try:
        wait_file(out_file, ["async started", "sync started"], proc, 30)
        proc.send_signal(signal.SIGINT)
        output.wait_for(
            f"received SIGINT, stopping: waiting up to {GRACE} s for {running} running task(s) "
            "(SIGINT again to hand them back now)",
            10,
        )
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=30)  # not the 120 s of the grace
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 30 s after the second SIGINT:\n{output.text()}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = output.text()
    assert code == 0, err
    assert (
        f"received SIGINT again, stopping now: {running} running task(s) cancelled and handed "
        "back to the broker (they run again)"
    ) in err
    assert out_file.read_text().count("requeued") == running  # all handed back, none lost
    assert "Traceback" not in err
    said = "exiting without waiting for 1 thread(s) of sync task code still running"
    assert (said in err) is main_loop, err


@pytest.mark.anyio
async def test_every_signal_is_answered_and_the_second_cuts_the_grace_short(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What a signal handler calls, three times, while a task runs past the grace: the third
    is answered too (it was swallowed before), and the stop ends at the second."""
    app = AsyncQueueTasks(config=QueueConfig(shutdown_grace=GRACE))
    started = anyio.Event()
    handed_back: list[str] = []

    @app.task
    async def wait() -> None:
        started.set()
        await anyio.sleep(600)

    class Requeued:
        @hookimpl
        def qtasks_broker_requeued(self, app: AsyncQueueTasks, delivery: object) -> None:
            handed_back.append("requeued")

    app.add_plugin(Requeued())
    stopper = Stopper(app)
    caplog.set_level(logging.INFO, "qtasks")
    with anyio.fail_after(30):  # not the 120 s of the grace
        async with app:  # as SignalStarter.serve does, without the test process's signals
            await app.add_task("wait")
            await started.wait()
            stopper(signal.SIGTERM)
            stopper(signal.SIGTERM)
            stopper(signal.SIGINT)
            await app.wait_for_stop()
    messages = [r.getMessage() for r in caplog.records if r.name == "qtasks"]
    assert (
        f"received SIGTERM, stopping: waiting up to {GRACE} s for 1 running task(s) "
        "(SIGTERM again to hand them back now)"
    ) in messages
    assert (
        "received SIGTERM again, stopping now: 1 running task(s) cancelled and handed back to "
        "the broker (they run again)"
    ) in messages
    assert "received SIGINT again: stopping now already (SIGKILL ends it at once)" in messages
    assert handed_back == ["requeued"]
