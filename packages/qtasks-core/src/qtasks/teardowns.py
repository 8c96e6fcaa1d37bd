"""The teardown of what a run registered with :meth:`~qtasks.executor.TaskRun.on_close`
(task-scoped ``Depends``), once its code ended.

A sync task given up on (``max_time``, a cancel) is settled at once, but its thread runs on
(:mod:`qtasks.threads`) and may still use what it was given: a pooled connection handed back
now would go to the next task while the old thread still sends queries on it. So the teardown
of such a run waits for its thread to return (told the same :attr:`TaskRun.ended_by`), as its
concurrency slot does (:meth:`qtasks.flow.FlowGate.release`). A worker that stops first tears
it down at its stop, before its worker-scoped dependencies, with a log line.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio

from qtasks.cancels import is_error

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from qtasks.executor import TaskRun

log = logging.getLogger("qtasks.worker")


class Teardowns:
    """The task-scope teardowns of one worker (see the module docstring)."""

    def __init__(self) -> None:
        self.aside: TaskGroup | None = None
        """Where the waits for threads run: the serving worker's task group (``None``
        otherwise: a teardown runs at once)."""
        self._waiting: dict[anyio.CancelScope, TaskRun] = {}
        """The waits not ended yet, each cancelled by :meth:`stop`."""
        self._ended: anyio.Event | None = None

    async def close(self, run: TaskRun) -> None:
        """Tear ``run``'s registrations down now or, for a sync call given up on whose thread
        still runs, when that thread returns; once either way."""
        thread, aside = run.abandoned, self.aside
        done = None if thread is None else thread.done
        if aside is not None and done is not None and not done.is_set():
            scope = anyio.CancelScope()
            try:
                aside.start_soon(self._close_when_done, run, done, scope)
            except RuntimeError:  # its task group ended (the worker stopped): at once
                pass
            else:
                self._waiting[scope] = run
                return
        await close_now(run)

    async def _close_when_done(
        self, run: TaskRun, done: anyio.Event, scope: anyio.CancelScope
    ) -> None:
        try:
            with scope:
                await done.wait()
        finally:
            if not done.is_set():
                log.info(
                    "worker stopping: what sync task %s (%s) was given (task-scoped Depends) "
                    "is torn down while its thread still runs",
                    run.task.name,
                    run.record.uuid,
                )
            with anyio.CancelScope(shield=True):
                await close_now(run)
            del self._waiting[scope]
            if self._ended is not None and not self._waiting:
                self._ended.set()

    async def stop(self) -> None:
        """At the worker's stop, before its worker-scoped dependencies close: end every wait,
        tearing down at once what a thread still uses; returns when all are torn down."""
        self.aside = None
        for scope in self._waiting:
            scope.cancel()
        while self._waiting:
            self._ended = anyio.Event()
            await self._ended.wait()
        self._ended = None


async def close_now(run: TaskRun) -> None:
    """Await what :meth:`TaskRun.on_close` registered, the last first; errors are logged (a
    stray cancellation too: the teardown's own, see :mod:`qtasks.cancels`)."""
    closers, run.closers = run.closers or [], None
    for close in reversed(closers):
        try:
            await close()
        except BaseException as exc:
            if not is_error(exc):
                raise
            log.error("closing what task %s used failed (ignored)", run.record.uuid, exc_info=exc)
