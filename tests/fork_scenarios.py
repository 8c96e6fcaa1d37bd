"""A sync app used before ``fork()``, then in the child and in the parent again: the child
starts its own event loop and connections on its first call, and the parent's keep working.
Shared by the in-memory tests (tests/core/test_sync_fork.py) and the Redis ones
(tests/redis/test_redis_fork.py).

The scenario runs in a process of its own (a test runner should not fork itself), with a
deadline: the child arms ``signal.alarm``, and the process has a timeout.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = """
import gc
import multiprocessing
import os
import signal
import sys

from qtasks import QueueTasks
{imports}

app = {app}


@app.task
def add(a: int, b: int) -> int:
    return a + b


def child() -> None:
    signal.alarm(20)  # the child's deadline: a hang ends it with SIGALRM
    assert app.add_task("add", 1, 1).status == "new"  # before the child serves
    use_connections()
    gc.collect()  # what it dropped of the parent's, as a child living long enough would
    with app:
        print("child:", add.add_task(3, 4, timeout=10).returning, flush=True)
    app.close()


def forked(how: str) -> int:
    if how == "multiprocessing":
        process = multiprocessing.get_context("fork").Process(target=child)
        process.start()
        process.join()
        return process.exitcode or 0
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            child()
            code = 0
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def use_connections() -> None:  # the components' connections besides the worker's
    app.ping()
    app.config_set("fork", "seen", 1)
    assert app.config_get("fork", "seen") == 1
    assert app.dead_letters() == []


def main(how: str, serving: bool) -> None:
    print("parent:", app.add_task("add", 1, 2).status, flush=True)  # starts the portal
    use_connections()
    if serving:
        with app:
            code = forked(how)
            print("parent after:", add.add_task(5, 6, timeout=10).returning, flush=True)
    else:
        code = forked(how)
    print("child exit:", code, flush=True)
    use_connections()  # the parent's, which the child inherited
    with app:
        print("parent then:", add.add_task(10, 20, timeout=10).returning, flush=True)
    app.close()


main(sys.argv[1], sys.argv[2] == "serving")
"""


def run_forked(tmp_path: Path, app: str, imports: str, how: str, serving: bool) -> str:
    """Run the scenario with ``app`` (source of a ``QueueTasks(...)`` expression); return its
    output after checking that every step answered and nothing warned of a leak."""
    script = tmp_path / "forked_app.py"
    script.write_text(textwrap.dedent(SCRIPT).format(app=app, imports=imports))
    done = subprocess.run(
        [sys.executable, "-W", "default", str(script), how, "serving" if serving else "used"],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=tmp_path,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "child: 7\n" in output, output
    assert "child exit: 0\n" in output, output
    assert "parent then: 30\n" in output, output
    if serving:
        assert "parent after: 11\n" in output, output
    assert "ResourceWarning" not in output, output
    return output
