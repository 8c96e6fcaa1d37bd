"""A sync generator task run in one worker thread for its whole life, driven from the loop.

Its creation, every step and its close run in the same thread, so what it holds across
``yield`` that is bound to a thread (a sqlite3 connection, a ``threading.local``, a lock) keeps
working when tasks run side by side. That thread holds one token of the app's
``thread_limiter`` for the whole life, as a sync task's call does (:mod:`qtasks.threads`):
between steps it waits for its next order while the loop stores the step.

How it is closed, so that its ``finally`` runs in its own thread:

* it returned or raised: nothing to close, the thread returns;
* ``max_time``, a cancel or the worker's stop while the loop stores a step: the thread closes
  it at once (``GeneratorExit`` at its ``yield``) and the run waits for that up to
  ``shutdown_grace``, as for an async generator's ``aclose()``;
* the same while a step runs in the thread, which Python cannot interrupt: the thread is given
  up on as a sync task's is (:meth:`ThreadCall.abandon`: the run ends at once, a warning, its
  token and concurrency slot kept until it returns), and it closes the generator as soon as
  that step returns. A close that outlasts ``shutdown_grace`` is given up on the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Generator
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any

import anyio

from qtasks.threads import in_thread

if TYPE_CHECKING:
    from qtasks.executor import TaskRun

log = logging.getLogger("qtasks.worker")

_CLOSE = object()  # the order that ends the thread (any other order is the value to send)
_YIELDED, _RETURNED, _RAISED = 0, 1, 2  # what a step replies


class SyncGenerator:
    """One run's sync generator: :meth:`drive` on the loop, :meth:`_thread` in its thread."""

    __slots__ = (
        "close_error",
        "ended",
        "given_up",
        "in_step",
        "make",
        "orders",
        "replied",
        "reply",
        "run",
        "scope",
        "started",
        "wake",
    )

    def __init__(self, run: TaskRun, make: Callable[[], Generator[Any, Any, Any]]) -> None:
        from qtasks.app import _threadsafe  # app imports this module (through executor)

        self.run = run
        self.make = make
        self.orders: SimpleQueue[Any] = SimpleQueue()
        self.reply: tuple[int, Any] | None = None
        self.replied = anyio.Event()
        self.wake = _threadsafe(self._set_replied)
        self.in_step = False
        """Set on the loop from sending an order to reading its reply."""
        self.started = False
        self.ended = anyio.Event()
        """Set when the thread's call returned, or was given up on."""
        self.scope = anyio.CancelScope(shield=True)
        """The thread's call: only :meth:`_end` cancels it (gives the thread up)."""
        self.given_up = False
        self.close_error: BaseException | None = None

    async def drive(self, handle: Callable[[Any], Awaitable[Any]]) -> Any:
        """Run the generator to its end, ``handle`` storing each yielded value; its return
        value, else the list of handled values."""
        has_handler = self.run.task.options.generate_handler is not None
        results: list[Any] = []
        outcome: Any = None
        failure: BaseException | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._serve)
            # Raised past the task group, which would wrap it in an exception group.
            try:
                sent: Any = None
                while True:
                    kind, value = await self._step(sent)
                    if kind == _RETURNED:
                        outcome = results if value is None else value
                        break
                    if kind == _RAISED:
                        failure = value
                        break
                    handled = await handle(value)
                    results.append(handled)
                    # Without a handler nothing is sent back, so ``yield from iterable`` works.
                    sent = handled if has_handler else None
            except BaseException as exc:  # a cancel, or storing a step failed
                failure = exc
            close_error = await self._end()
        if close_error is not None:
            failure = close_error
        if failure is not None:
            try:
                raise failure
            finally:
                failure = None  # no cycle through this frame
        return outcome

    async def _step(self, value: Any) -> tuple[int, Any]:
        self.reply = None
        self.replied = anyio.Event()
        self.in_step = True
        self.orders.put(value)
        await self.replied.wait()
        self.in_step = False
        if self.reply is None:
            raise RuntimeError(f"the thread of task {self.run.task.name!r} ended unexpectedly")
        return self.reply

    async def _end(self) -> BaseException | None:
        """Tell the thread to close the generator; wait for it (bounded), unless a step runs
        in it or it never started: then give it up (it closes after the step). Returns what
        the close raised."""
        stuck = (self.in_step and self.reply is None) or not self.started
        if stuck:
            self.given_up = True  # before the order: the thread reads it once told to close
        self.orders.put(_CLOSE)
        if stuck:
            self.scope.cancel()
        else:
            with anyio.move_on_after(self.run.app.config.shutdown_grace, shield=True):
                await self.ended.wait()
            if not self.ended.is_set():
                self.given_up = True
                self.scope.cancel()
        return self.close_error

    async def _serve(self) -> None:
        try:
            with self.scope:
                await in_thread(self.run, self._thread, ())
        finally:
            self.ended.set()
            self.replied.set()  # no step waits for a thread that ended

    def _set_replied(self) -> None:
        self.replied.set()

    def _thread(self) -> None:
        """In the worker thread, for the generator's whole life: obey orders until it ends or
        is told to close; close it here."""
        self.started = True
        gen: Generator[Any, Any, Any] | None = None
        try:
            while True:
                order = self.orders.get()
                if order is _CLOSE:
                    return
                reply: tuple[int, Any]
                try:
                    if gen is None:
                        gen = self.make()
                    reply = (_YIELDED, gen.send(order))
                except StopIteration as exc:
                    reply = (_RETURNED, exc.value)
                except BaseException as exc:
                    reply = (_RAISED, exc)
                self.reply = reply
                try:
                    self.wake()
                except RuntimeError:  # the loop is closed: nobody waits for the reply
                    pass
                if reply[0] != _YIELDED:
                    return
        finally:
            if gen is not None:
                self._close(gen)

    def _close(self, gen: Generator[Any, Any, Any]) -> None:
        try:
            gen.close()  # runs its ``finally`` (nothing when it ended by itself)
        except BaseException as exc:
            if not self.given_up:
                self.close_error = exc  # the run raises it
                return
            run = self.run
            log.error(
                "closing sync generator task %s (%s) after it was given up on failed",
                run.task.name,
                run.record.uuid,
                exc_info=exc,
            )
