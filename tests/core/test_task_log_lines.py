"""A task's log lines under ``qtasks run`` name the run they belong to: ``ctx.logger`` and
``ctx.get_logger()`` records print `` [<task name> <task uuid>]`` after the logger's name in
qtasks' format, and every other record prints as before (no "--- Logging error ---" for the
missing field)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, NoReturn

import pytest

APP_SOURCE = """
from qtasks import AsyncQueueTasks, hookimpl

app = AsyncQueueTasks("log-lines")


@app.task(echo=True)
async def greet(self, who: str) -> None:
    self.ctx.logger.info("hello %s", who)
    assert self.ctx.logger is self.ctx.logger  # made once
    print(f"greet {self.ctx.task_uuid}", flush=True)


@app.task(echo=True)
def count(self, n: int) -> None:
    self.ctx.get_logger("billing").warning("counted %d", n)
    self.ctx.logger.info("sync %d", n)
    print(f"count {self.ctx.task_uuid}", flush=True)


class Producer:
    @hookimpl
    async def qtasks_broker_listening(self, app):
        await app.add_task("greet", "ada")
        await app.add_task("count", 3)


app.add_plugin(Producer())
"""


SERVING = "INFO qtasks.serving: serving 'log-lines'"
STARTUP = 30.0
"""Seconds ``qtasks run`` may take to start serving (imports on a loaded machine)."""
RUNNING = 10.0
"""Seconds the two tasks may take once it serves: a hang fails then, not at ``STARTUP``."""


class Output:
    """The lines a process writes to stdout and stderr, read by threads, so that the test
    waits for them with a deadline (no poll, no sleep) and shows stderr whatever happened."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self.out: list[str] = []
        self.err: list[str] = []
        self.closed: set[str] = set()
        for name, stream in (("out", proc.stdout), ("err", proc.stderr)):
            assert stream is not None
            threading.Thread(target=self._read, args=(name, stream), daemon=True).start()

    def _read(self, name: str, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put((name, line.rstrip("\n")))
        self._lines.put((name, None))

    def until(self, done: Callable[[], bool], deadline: float, what: str) -> None:
        """Take lines until ``done()``; fail with ``what`` and the process's stderr at
        ``deadline`` (``time.monotonic()``), or when its output ended first (it exited)."""
        while not done():
            if self.closed == {"out", "err"}:
                self.fail(f"{what}: its output ended (it exited)")
            try:
                name, line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                name, line = "", None
            if not name:  # failed out of the except: no "during handling of" noise
                self.fail(what)
            if line is None:
                self.closed.add(name)
            else:
                getattr(self, name).append(line)

    def fail(self, what: str) -> NoReturn:
        pytest.fail(f"{what}; its stderr:\n" + "\n".join(self.err), pytrace=False)


@pytest.mark.timeout(60)
def test_task_log_lines_carry_the_task_name_and_uuid_under_qtasks_run(tmp_path: Path) -> None:
    (tmp_path / "log_app.py").write_text(APP_SOURCE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
    command = [sys.executable, "-m", "qtasks", "run", "-A", "log_app:app"]
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        output = Output(proc)
        output.until(
            lambda: any(SERVING in line for line in output.err),
            time.monotonic() + STARTUP,
            f"qtasks run did not serve within {STARTUP:g} s",
        )
        output.until(
            lambda: len(output.out) >= 2,
            time.monotonic() + RUNNING,
            f"the tasks did not run within {RUNNING:g} s of serving",
        )
        proc.send_signal(signal.SIGTERM)
        output.until(
            lambda: output.closed == {"out", "err"},
            time.monotonic() + 20,
            "qtasks run did not exit within 20 s of SIGTERM",
        )
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    err = "\n".join(output.err)
    uuids = dict(line.split() for line in output.out)
    assert f"INFO qtasks.task.greet [greet {uuids['greet']}]: hello ada" in err
    assert f"WARNING billing [count {uuids['count']}]: counted 3" in err
    assert f"INFO qtasks.task.count [count {uuids['count']}]: sync 3" in err
    assert "Logging error" not in err
    assert "Traceback" not in err
