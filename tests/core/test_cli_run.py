"""``qtasks run`` as a real subprocess: it serves tasks and stops cleanly on SIGTERM.

With the in-memory components the worker process produces its own tasks: the app module has
a plugin that enqueues them once the worker listens. Each task appends to a file the test
watches. The third-party ``audit`` plugin, found through its entry point in that process,
logs every success.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

APP_SOURCE = """
import os
import pathlib

import anyio

from qtasks import QueueTasks, hookimpl

app = QueueTasks("subprocess-app")
OUT = pathlib.Path(os.environ["OUT_FILE"])


@app.task
def record(n: int) -> int:
    with OUT.open("a") as f:
        f.write(f"{n}\\n")
    return n * 2


@app.task
async def linger() -> str:
    with OUT.open("a") as f:
        f.write("linger started\\n")
    await anyio.sleep(0.5)
    with OUT.open("a") as f:
        f.write("linger finished\\n")
    return "done"


class Producer:
    @hookimpl
    async def qtasks_broker_listening(self, app):
        if os.environ.get("LINGER"):
            await app.add_task("linger")
            return
        for n in range(5):
            await app.add_task("record", n)


app.add_plugin(Producer())
"""


def wait_for(path: Path, predicate: object, proc: subprocess.Popen[str], timeout: float) -> str:
    """Poll ``path`` until ``predicate(text)`` holds, failing early if the process died."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if predicate(text):  # type: ignore[operator]
            return text
        if proc.poll() is not None:
            _out, err = proc.communicate()
            pytest.fail(f"qtasks run exited early ({proc.returncode}):\n{err}")
        time.sleep(0.02)
    proc.kill()
    _, err = proc.communicate()
    pytest.fail(f"condition not met within {timeout}s; file: {text!r}\nstderr:\n{err}")


@contextmanager
def qtasks_run(
    tmp_path: Path, source: str, argv: list[str], **env_extra: str
) -> Iterator[subprocess.Popen[str]]:
    """``argv`` (a ``qtasks run -A worker_app:app ...`` command) as a process in ``tmp_path``,
    serving ``source`` as ``worker_app.py``, with ``OUT_FILE`` (``out.txt``) and ``env_extra``
    in its environment and no ``QTASKS_*`` variable of this one; killed at the exit if it is
    still running."""
    (tmp_path / "worker_app.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
    env.update(OUT_FILE=str(tmp_path / "out.txt"), **env_extra)
    proc = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def sigterm(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """SIGTERM ``proc``; its exit code and stderr once it ended (within 20 s)."""
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=20)
    return code, proc.communicate()[1]


RUN = [sys.executable, "-m", "qtasks", "run", "-A", "worker_app:app"]


@pytest.mark.timeout(60)
def test_run_serves_tasks_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    out_file = tmp_path / "out.txt"
    argv = [*RUN, "--concurrency", "2", "--log-level", "INFO"]
    with qtasks_run(tmp_path, APP_SOURCE, argv) as proc:
        text = wait_for(out_file, lambda t: len(t.splitlines()) >= 5, proc, 30)
        assert sorted(int(n) for n in text.split()) == [0, 1, 2, 3, 4]
        code, err = sigterm(proc)
    assert code == 0, err
    assert (
        "serving 'subprocess-app': 2 tasks, concurrency 2; broker MemoryBroker, storage "
        "MemoryStorage, global config MemoryGlobalConfig"
    ) in err
    assert "received SIGTERM, stopping" in err
    # Served on purpose here (the app's own plugin enqueues), but most often a worker started
    # where no configuration is found: it said nothing, and waited for tasks none could send.
    assert (
        "WARNING qtasks.cli: the broker is in memory (MemoryBroker): only tasks this process "
        "enqueues (its timers, its own code) reach this worker, none from another process"
    ) in err
    assert err.count("audit: task record") == 5  # the entry-point plugin's hook, in the worker
    assert "Traceback" not in err


@pytest.mark.timeout(60)
def test_sigterm_lets_a_running_task_finish(tmp_path: Path) -> None:
    source = APP_SOURCE.replace(
        'await app.add_task("record", n)',
        'await app.add_task("record", n)\n        await app.add_task("linger")',
    ).replace("for n in range(5):", "for n in range(1):")
    out_file = tmp_path / "out.txt"
    script = Path(sys.executable).parent / "qtasks"  # the console script of the distribution
    argv = [str(script), "run", "-A", "worker_app:app"]
    with qtasks_run(tmp_path, source, argv, LINGER="1") as proc:
        wait_for(out_file, lambda t: "linger started" in t, proc, 30)
        code, err = sigterm(proc)
    assert code == 0, err
    assert "linger finished" in out_file.read_text()  # within shutdown_grace
    assert "audit: task linger" in err


@pytest.mark.timeout(60)
def test_run_health_port_serves_the_probe(tmp_path: Path) -> None:
    """``qtasks run --health-port``: the worker process answers ``/readyz`` and ``/livez``
    (qtasks.health) while it serves, and says where in its log."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with qtasks_run(tmp_path, APP_SOURCE, [*RUN, "--health-port", str(port)]) as proc:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as got:
                    ready = json.loads(got.read())
                break
            except OSError:  # not listening yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"no probe on {port}:\n{proc.communicate()[1]}")
                time.sleep(0.05)
        assert (ready["status"], ready["consume_stalled"]) == ("ok", 0.0)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=5) as got:
            assert got.status == 200
        code, err = sigterm(proc)
    assert code == 0, err
    assert f"health probe on http://127.0.0.1:{port} (/livez, /readyz)" in err
