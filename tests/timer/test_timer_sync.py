"""The sync facade, the standalone scheduler (no worker) and ``run_forever``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from timer_helpers import Recorder, wait_until

from qtasks import AsyncQueueTasks, QueueTasks, TaskStatus
from qtasks_timer import AsyncTimer, SyncTimer


def test_sync_timer_runs_inside_the_sync_app() -> None:
    app = QueueTasks()
    ran = threading.Event()
    second = threading.Event()

    @app.task
    def tick() -> None:
        ran.set()

    @app.task
    def later() -> None:
        second.set()

    timer = SyncTimer(app)
    handle = timer.add_task("tick", trigger=timedelta(seconds=0.1))
    try:
        with app:
            assert ran.wait(5)
            handle.pause()
            assert handle.is_paused()
            handle.resume()
            assert not handle.is_paused()
            # Added while running: goes to the portal's loop where the timers live.
            timer.add_task("later", trigger=timedelta(seconds=0.1))
            assert second.wait(5)
            assert len(timer.describe()) == 2
            handle.remove()
            assert [h.task_name for h in timer.timers] == ["later"]
    finally:
        app.close()


@pytest.mark.anyio
@pytest.mark.parametrize("sync_app", [False, True], ids=["async app", "sync app"])
async def test_standalone_timer_enqueues_without_a_worker(sync_app: bool) -> None:
    """Also given the sync app (QTasks' ``AsyncTimer(app=QueueTasks(...))``), which the timer
    runs on through its async core (it awaited the sync ``start()``: review r11 #6)."""
    given: AsyncQueueTasks | QueueTasks = QueueTasks() if sync_app else AsyncQueueTasks()
    app = given.aio if isinstance(given, QueueTasks) else given
    recorder = Recorder()
    given.add_plugin(recorder)
    timer = AsyncTimer(given)
    timer.add_task("tick", trigger=timedelta(seconds=0.1))  # no such task here: fine
    async with timer:
        assert timer.running
        await wait_until(lambda: recorder.count() >= 2, 5)
        record = await app.get(recorder.enqueued[0][2])
        assert record is not None
        assert record.status is TaskStatus.NEW  # nobody serves it in this process
    assert not timer.running
    assert not app.started  # the timer started the app's components, and stopped them
    assert timer.app is app


SCRIPT = textwrap.dedent(
    """
    from datetime import timedelta

    from qtasks import AsyncQueueTasks, hookimpl
    from qtasks.memory import MemoryBroker
    from qtasks_timer import AsyncTimer


    class Announce:
        @hookimpl
        def qtasks_task_enqueued(self, record):
            print("enqueued", record.task_name, flush=True)


    class SharedBroker(MemoryBroker):
        local = False  # stands in for Redis: a timer process needs a shared broker


    app = AsyncQueueTasks(broker=SharedBroker())
    app.add_plugin(Announce())
    timer = AsyncTimer(app)
    timer.add_task("tick", trigger=timedelta(seconds=0.1))
    timer.run_forever()  # a scheduler process: no worker
    """
)


def test_run_forever_stops_on_sigint(tmp_path: Path) -> None:
    script = tmp_path / "scheduler.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "enqueued tick"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_qtasks_timeout_is_accepted_and_ignored_with_a_warning() -> None:
    """QTasks' ``timer.add_task(..., timeout=10)`` (which QTasks ignored) must not make a
    ported module fail at import with "unexpected keyword argument 'timeout'"."""
    from qtasks.compat.config import QTasksCompatWarning

    app = QueueTasks()

    @app.task(name="test")
    def test(num: int) -> int:
        return num

    sync_timer = SyncTimer(app)
    with pytest.warns(QTasksCompatWarning, match=r"timer.add_task\(timeout=...\)") as caught:
        handle = sync_timer.add_task(6, task_name="test", trigger=timedelta(hours=1), timeout=10)  # type: ignore[arg-type]  # QTasks' form add_task(6, task_name=...) is not in the typed signature
    assert caught[0].filename == __file__  # points at the caller's line
    async_timer = AsyncTimer(AsyncQueueTasks())
    with pytest.warns(QTasksCompatWarning):
        other = async_timer.add_task("tick", trigger=timedelta(hours=1), timeout=10)
    assert [(row["args"], row["kwargs"]) for row in sync_timer.describe()] == [([6], {})]
    assert (handle.task_name, other.task_name) == ("test", "tick")
    app.close()


def test_timeout_is_the_tasks_own_argument_when_it_has_one() -> None:
    """A task whose own parameter is called ``timeout`` gets it, without a warning: only for
    a task without one is it QTasks' option, ignored."""
    import warnings

    app = QueueTasks()

    @app.task
    def fetch(url: str, timeout: float = 30.0) -> str:
        return url

    timer = SyncTimer(app)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        timer.add_task("fetch", "https://x", trigger=timedelta(hours=1), timeout=5)
    assert [(row["args"], row["kwargs"]) for row in timer.describe()] == [
        (["https://x"], {"timeout": 5})
    ]
    app.close()


def test_a_timer_process_over_an_in_memory_broker_is_refused() -> None:
    """QTasks' timer process (``timer.run_forever()`` next to a worker) on the default app,
    which is in memory in qtasks: its ticks would reach no worker, so it is refused."""
    from qtasks_timer import TimerError

    sync_app = QueueTasks()
    sync_timer = SyncTimer(sync_app)
    sync_timer.add_task("tick", trigger=timedelta(seconds=0.1))
    async_timer = AsyncTimer(AsyncQueueTasks())
    # Were it not refused, run_forever would serve until SIGINT: end it rather than hang.
    interrupt = threading.Timer(5, os.kill, (os.getpid(), signal.SIGINT))
    interrupt.start()
    try:
        with pytest.raises(TimerError, match=r"in-memory broker \(MemoryBroker\).*run_forever"):
            sync_timer.run_forever()
        with pytest.raises(TimerError, match="cannot reach a worker"):
            async_timer.run_forever()
    finally:
        interrupt.cancel()
    assert not async_timer.app.started and not sync_app.aio.started
