"""A task's log lines under ``qtasks run`` name the run they belong to: ``ctx.logger`` and
``ctx.get_logger()`` records print `` [<task name> <task uuid>]`` after the logger's name in
qtasks' format, and every other record prints as before (no "--- Logging error ---" for the
missing field)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

APP_SOURCE = """
import os
import pathlib

from qtasks import AsyncQueueTasks, hookimpl

app = AsyncQueueTasks("log-lines")
OUT = pathlib.Path(os.environ["OUT_FILE"])


@app.task(echo=True)
async def greet(self, who: str) -> None:
    self.ctx.logger.info("hello %s", who)
    assert self.ctx.logger is self.ctx.logger  # made once
    with OUT.open("a") as f:
        f.write(f"greet {self.ctx.task_uuid}\\n")


@app.task(echo=True)
def count(self, n: int) -> None:
    self.ctx.get_logger("billing").warning("counted %d", n)
    self.ctx.logger.info("sync %d", n)
    with OUT.open("a") as f:
        f.write(f"count {self.ctx.task_uuid}\\n")


class Producer:
    @hookimpl
    async def qtasks_broker_listening(self, app):
        await app.add_task("greet", "ada")
        await app.add_task("count", 3)


app.add_plugin(Producer())
"""


@pytest.mark.timeout(60)
def test_task_log_lines_carry_the_task_name_and_uuid_under_qtasks_run(tmp_path: Path) -> None:
    (tmp_path / "log_app.py").write_text(APP_SOURCE)
    out_file = tmp_path / "out.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
    env["OUT_FILE"] = str(out_file)
    command = [sys.executable, "-m", "qtasks", "run", "-A", "log_app:app"]
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while len(out_file.read_text().splitlines() if out_file.exists() else []) < 2:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the tasks did not run within 30 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    uuids = dict(line.split() for line in out_file.read_text().splitlines())
    assert f"INFO qtasks.task.greet [greet {uuids['greet']}]: hello ada" in err
    assert f"WARNING billing [count {uuids['count']}]: counted 3" in err
    assert f"INFO qtasks.task.count [count {uuids['count']}]: sync 3" in err
    assert "INFO qtasks.serving: serving 'log-lines'" in err  # other records: as before
    assert "Logging error" not in err
    assert "Traceback" not in err
