"""QTasks' ``AsyncTimer(app=QueueTasks(...))``: the async timer given the sync app runs on the
app's async core, so its ticks are enqueued and run, in the worker and in a timer process of
its own. It was built and then failed every tick (review r11 #6): a ``TypeError`` awaiting the
sync ``start()`` standalone, a ``ComponentError`` at each tick in the worker. (The standalone
timer without a worker: tests/timer/test_timer_sync.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import pytest

from qtasks import QueueConfig, QueueTasks
from qtasks.timers import AsyncTimer, SyncTimer
from qtasks_timer import ScheduleError

WAIT = 10.0


def test_ticks_run_in_the_worker_of_the_sync_app() -> None:
    app = QueueTasks()
    ran = threading.Event()

    @app.task
    def tick(n: int) -> None:
        if n == 5:
            ran.set()

    timer = AsyncTimer(app=app)
    timer.add_task(5, task_name="tick", trigger=timedelta(seconds=0.1))  # type: ignore[arg-type]  # QTasks' form add_task(5, task_name=...) is not in the typed signature
    try:
        with app:
            assert ran.wait(WAIT), "no tick ran"
    finally:
        app.close()
    assert timer.app is app.aio


def test_a_task_name_that_is_not_a_str_is_refused_when_the_timer_is_added() -> None:
    """Accepted, every tick of such a timer failed in the worker (review r11 #4)."""
    app = QueueTasks()
    timer = AsyncTimer(app)
    sync_timer = SyncTimer(QueueTasks())
    names: tuple[Any, ...] = (5, None)
    for name in names:
        with pytest.raises(ScheduleError, match=r"^timer: a task name must be a str, got "):
            timer.add_task(1, task_name=name, trigger=timedelta(seconds=1))  # type: ignore[arg-type]  # QTasks' form add_task(1, task_name=...) is not in the typed signature
        with pytest.raises(ScheduleError, match="must be a str"):
            sync_timer.schedule(name, timedelta(seconds=1))
    assert timer.timers == []


class Lines:
    """Reads a subprocess's output in a thread; :meth:`wait_for` waits for a line."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = threading.Condition()
        assert proc.stdout is not None
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, text: str) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: text in self.lines, timeout=WAIT)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def spawn(args: list[str], cwd: Path) -> Lines:
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    return Lines(proc)


PORTED = textwrap.dedent(
    """
    from datetime import timedelta

    from qtasks import QueueTasks
    from qtasks.timers import AsyncTimer

    app = QueueTasks(name="ported")


    @app.task
    def tick(n: int) -> None:
        print("TICK", n, flush=True)


    timer = AsyncTimer(app=app)
    timer.add_task(5, task_name="tick", trigger=timedelta(seconds=0.1))
    """
)


def test_ticks_run_in_the_worker_of_qtasks_run(tmp_path: Path) -> None:
    (tmp_path / "ported_timer.py").write_text(PORTED)
    worker = spawn(["-m", "qtasks", "-A", "ported_timer:app", "run"], tmp_path)
    try:
        assert worker.wait_for("TICK 5"), worker.lines
    finally:
        assert worker.stop() == 0, worker.lines
    assert not [line for line in worker.lines if "ERROR" in line or "Error" in line]


TIMER_PROCESS = textwrap.dedent(
    """
    import sys
    from datetime import timedelta

    from qtasks import QueueConfig, QueueTasks
    from qtasks.timers import AsyncTimer

    url, prefix = sys.argv[1:]
    app = QueueTasks(broker_url=url, config=QueueConfig(extra={"redis_prefix": prefix}))


    @app.task
    def tick(n: int) -> None: ...


    timer = AsyncTimer(app=app)
    timer.add_task(5, task_name="tick", trigger=timedelta(seconds=0.1))
    print("scheduling", flush=True)
    timer.run_forever()  # QTasks' timer process: no worker here
    """
)


@pytest.mark.redis
def test_a_timer_process_ticks_run_in_a_worker_elsewhere(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    (tmp_path / "timer_process.py").write_text(TIMER_PROCESS)
    app = QueueTasks(broker_url=redis_url, config=QueueConfig(extra={"redis_prefix": prefix}))
    ran = threading.Event()
    runs: list[int] = []

    @app.task
    def tick(n: int) -> None:
        runs.append(n)
        ran.set()

    scheduler = spawn(["timer_process.py", redis_url, prefix], tmp_path)
    try:
        with app:
            assert ran.wait(WAIT), scheduler.lines
    finally:
        try:
            assert scheduler.stop() == 0, scheduler.lines
        finally:
            app.close()
    assert runs[0] == 5
    assert "scheduling" in scheduler.lines
    assert not [line for line in scheduler.lines if "Error" in line], scheduler.lines
