"""A watchdog thread that notices when a worker's event loop stops running.

A blocking call inside ``async def`` (``time.sleep``, a synchronous HTTP client, heavy CPU)
stops every task of the worker, and its lease renewal with them: after one lease every task
it holds looks dead and runs again elsewhere. The loop cannot report this itself, so a thread
does: the loop stamps a clock every ``threshold / 4`` seconds; when the stamp is older than
``threshold``, the thread reads the loop thread's stack (``sys._current_frames``), names the
task whose code is on it and the line that blocks, and logs how to fix it. It logs once per
stall, and once more when the loop runs again.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from types import CodeType, FrameType

import anyio
from anyio.abc import TaskStatus

log = logging.getLogger("qtasks.worker")

FIX = (
    "a blocking call inside `async def` stops every task of this worker and the renewal of "
    "their leases (after one lease they run again elsewhere): make the task a plain `def` "
    "(it then runs in a thread) or move the call off the loop with "
    "`await anyio.to_thread.run_sync(...)`"
)


class LoopWatchdog:
    """Watches the event loop it is started in; see the module docstring.

    ``suspects()`` returns ``(name, code)`` pairs of the code that may block (the running
    tasks' functions): the stall report names the first one found on the loop's stack."""

    def __init__(
        self, threshold: float, suspects: Callable[[], Iterable[tuple[str, CodeType]]]
    ) -> None:
        self.threshold = threshold
        self._suspects = suspects
        self._beat = time.monotonic()
        self._stop = threading.Event()
        self.stalls = 0
        """Stalls reported so far."""

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Stamp the clock from the loop until cancelled, with the thread watching."""
        loop_thread = threading.get_ident()
        tick = self.threshold / 4
        self._stop.clear()
        self._beat = time.monotonic()
        thread = threading.Thread(
            target=self._watch, args=(loop_thread, tick), name="qtasks-loop-watchdog", daemon=True
        )
        thread.start()
        task_status.started()
        try:
            while True:
                self._beat = time.monotonic()
                await anyio.sleep(tick)
        finally:
            self._stop.set()

    def _watch(self, loop_thread: int, tick: float) -> None:
        stalled_since: float | None = None
        while not self._stop.wait(tick):
            if loop_thread not in sys._current_frames():
                return  # the loop's thread is gone (its loop ended without stopping us)
            beat = self._beat
            lag = time.monotonic() - beat
            if lag > self.threshold and stalled_since is None:
                stalled_since = beat
                self.stalls += 1
                frame = sys._current_frames().get(loop_thread)
                log.warning("event loop blocked for %.1f s %s: %s", lag, self.describe(frame), FIX)
            elif stalled_since is not None and beat > stalled_since:
                log.warning("event loop runs again after a stall of %.1f s", beat - stalled_since)
                stalled_since = None

    def describe(self, frame: FrameType | None) -> str:
        """Which task's code is on the stack of ``frame`` and where it blocks."""
        if frame is None:
            return "(its stack could not be read)"
        stack: list[FrameType] = []
        while frame is not None:
            stack.append(frame)
            frame = frame.f_back
        where = f"{stack[0].f_code.co_filename}:{stack[0].f_lineno}" if stack else "?"
        suspects = list(self._suspects())
        for candidate in stack:
            for name, code in suspects:
                if candidate.f_code is code:
                    line = f"{code.co_filename}:{candidate.f_lineno}"
                    return f"by task {name!r} at {line} (blocked in {where})"
        return f"in {where} (no running task's code is on the stack: a plugin or middleware?)"
