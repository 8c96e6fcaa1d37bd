"""A script serving an async app in its own event loop (``asyncio.run``, the loop on the main
thread) ends once its worker stopped, though sync task code given up on still runs in a thread
(Python cannot stop it, and waited for it at exit: for ever here). It names the hung tasks in
a warning and keeps the script's exit code; a non-daemon thread of the user's is still waited
for, as Python does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import asyncio
import logging
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from qtasks import AsyncQueueTasks, QueueConfig

if EXECUTOR:  # never shut down: its idle thread ends by a callback Python calls after qtasks'
    pool = ThreadPoolExecutor(1)
    pool.submit(int).result()

app = AsyncQueueTasks("script", config=QueueConfig(shutdown_grace=0.5))


@app.task(max_time=0.3)
def hang() -> None:
    threading.Event().wait()  # a call that never returns: no thread can be stopped


def joiner() -> None:  # a clean-up that waits for the main thread to end
    threading.main_thread().join()
    print("joiner saw the main thread end", file=sys.stderr, flush=True)


def users_thread() -> None:
    sys.stdin.readline()  # until the test writes a line
    print("users thread ended", file=sys.stderr, flush=True)


async def main() -> None:
    async with app:
        task = await app.add_task("hang")
        record = await app.wait(task.uuid, timeout=30)
        print(record.status.value, task.uuid, flush=True)
    if USERS_THREAD:
        threading.Thread(target=users_thread, name="users-thread").start()
    if JOINER:
        threading.Thread(target=joiner, name="joiner").start()
    sys.exit(3)


if USERS_THREAD:
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")


asyncio.run(main())
"""


def _start(
    tmp_path: Path, users_thread: bool, executor: bool = False, joiner: bool = False
) -> subprocess.Popen[str]:
    script = tmp_path / "script.py"
    source = SCRIPT.replace("USERS_THREAD", repr(users_thread)).replace("JOINER", repr(joiner))
    script.write_text(source.replace("EXECUTOR", repr(executor)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)  # the tree under test
    return subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _end(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"still running {timeout} s on (Python waits for the hung thread):\n{err}")


def _hung_warning(err: str, uuid: str) -> None:
    lines = [line for line in err.splitlines() if "exiting without waiting for" in line]
    assert len(lines) == 1, err
    assert "1 thread(s) of sync task code" in lines[0] and f"hang ({uuid})" in lines[0], err
    # Not "settled or handed back already": a stop cut short by a stalled backend leaves them
    # to their leases, as the warning before this one says.
    assert "done with their tasks: settled, handed back, or left to their leases" in lines[0]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("executor", [False, True], ids=["alone", "with-an-idle-executor"])
def test_an_async_script_exits_with_its_code_past_a_hung_sync_thread(
    executor: bool, tmp_path: Path
) -> None:
    proc = _start(tmp_path, users_thread=False, executor=executor)
    out, err = _end(proc, 30)
    status, uuid = out.split()
    assert status == "error", err  # max_time gave up on it
    _hung_warning(err, uuid)
    assert proc.returncode == 3, err  # the script's sys.exit(3), not a clean stop's 0
    assert "Traceback" not in err and "Exception ignored" not in err, err


@pytest.mark.timeout(90)
def test_a_users_non_daemon_thread_is_waited_for_before_that_exit(tmp_path: Path) -> None:
    proc = _start(tmp_path, users_thread=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None and proc.stdin is not None
        status, uuid = proc.stdout.readline().split()
        assert status == "error"
        waiting = "at exit, waiting for 1 other non-daemon thread(s) (users-thread), not for 1"
        for line in proc.stderr:  # Python's shutdown waits for the user's thread
            if waiting in line:
                break
        else:
            pytest.fail(f"ended without waiting for the user's thread ({proc.wait()})")
        assert proc.poll() is None
        proc.stdin.write("end\n")  # the user's thread may end now
        proc.stdin.flush()
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    out, err = _end(proc, 30)
    assert out == "", err
    assert err.index("users thread ended") < err.index("exiting without waiting for"), err
    _hung_warning(err, uuid)
    assert proc.returncode == 3, err
    assert "Traceback" not in err and "Exception ignored" not in err, err


@pytest.mark.timeout(90)
def test_a_users_thread_waiting_for_the_main_thread_to_end_is_not_a_deadlock(
    tmp_path: Path,
) -> None:
    """The main thread is marked ended before the user's threads are waited for, as Python's
    own shutdown does: a thread joining it (a clean-up once the script ends) goes on."""
    proc = _start(tmp_path, users_thread=False, joiner=True)
    out, err = _end(proc, 30)
    status, uuid = out.split()
    assert status == "error", err
    assert err.index("joiner saw the main thread end") < err.index("exiting without waiting"), err
    _hung_warning(err, uuid)
    assert proc.returncode == 3, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
