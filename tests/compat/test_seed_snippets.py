"""The seed description's snippets ("Уникальность QTasks", kept in qtasks_uniqueness.md as
written) run exactly as printed: each block is executed unchanged after a preamble that gives it
the names it takes for granted (``app``, ``handler``, ``Depends``, ``connect_db``), then every
task it declared is run by a worker."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SEED = Path(__file__).with_name("qtasks_uniqueness.md")

PREAMBLE = """
from qtasks import QueueTasks, Depends

app = QueueTasks()

def handler(value):
    return value

class _Db:
    def save(self, data):
        return data * 2

def connect_db():
    return _Db()
"""

RUN_ALL = """
import inspect
with app:
    for name, task in list(app.tasks.items()):
        params = [p for p in task.caller_signature.parameters.values()]
        args = [21] * len(params)
        record = app.add_task(name, *args, timeout=10)
        print(name, record.status.value, repr(record.returning), record.error)
app.close()
"""


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", SEED.read_text(encoding="utf-8"), flags=re.S)


def test_the_seed_has_the_three_python_snippets() -> None:
    assert len(python_blocks()) == 3


@pytest.mark.parametrize("index", range(3))
def test_seed_snippet_runs_as_printed(tmp_path: Path, index: int) -> None:
    block = python_blocks()[index]
    script = tmp_path / f"seed_{index}.py"
    script.write_text(PREAMBLE + "\n" + textwrap.dedent(block) + "\n" + RUN_ALL)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr
    assert all(" success " in line for line in lines), done.stdout
    expected = {0: "task success 'INIT'", 1: "sample success None", 2: "job success 42"}
    assert lines[0].startswith(expected[index]), done.stdout


def test_the_seed_command_names_the_cli_form() -> None:
    # ``qtasks -A app:app run`` is covered by tests/core/test_cli_run.py; the seed prints it so.
    assert "qtasks -A app:app run" in SEED.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "command", [["qtasks", "-A", "app:app", "run"], ["python", "main.py"]], ids=["cli", "script"]
)
def test_seed_commands_serve_until_sigterm(tmp_path: Path, command: list[str]) -> None:
    """``python main.py`` and ``qtasks -A app:app run``, as the seed prints them."""
    import os
    import shutil
    import signal
    import time

    source = (
        "from qtasks import QueueTasks\n\napp = QueueTasks()\n\n\n@app.task\n"
        "def hello():\n    return 'hi'\n\n\nif __name__ == '__main__':\n    app.run_forever()\n"
    )
    (tmp_path / "app.py").write_text(source)
    (tmp_path / "main.py").write_text(source)
    bin_dir = Path(sys.executable).parent
    program = shutil.which(command[0], path=str(bin_dir)) or command[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
    proc = subprocess.Popen(
        [program, *command[1:]],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Ready once it catches SIGTERM (its handler installed, /proc/PID/status SigCgt), not
    # after a fixed pause: a loaded machine took longer than one to import qtasks.
    deadline = time.monotonic() + 30
    while not _catches(proc.pid, signal.SIGTERM):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "never installed its SIGTERM handler"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``signum`` (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False
