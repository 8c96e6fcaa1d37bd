"""Sync task code in worker threads, each holding a token of the app's ``thread_limiter``
until its thread really returns.

Python cannot stop a thread: when ``max_time`` or a cancel gives up on a sync call, anyio
abandons the thread (the task is settled at once) and the thread runs on. anyio's own limiter
token would be given back then, so every expiry of a hung call would start one more thread.
Here the token is held by the call itself (:class:`ThreadCall`), taken before the thread
starts and given back on the event loop when the call returns: an abandoned thread keeps its
worker thread counted, and the task's concurrency slot waits for :attr:`ThreadCall.done`
(see :meth:`qtasks.flow.FlowGate.release`).

At exit Python waits for every non-daemon thread, an abandoned one too (anyio's threads are
non-daemon when the event loop runs on the main thread: a script's ``asyncio.run``,
``qtasks run``): :func:`_at_threads_shutdown` ends that wait (see there).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import anyio
import anyio.to_thread

from qtasks.errors import AsyncCallInThreadError, TaskInterruptError

if TYPE_CHECKING:
    from qtasks.executor import TaskRun

log = logging.getLogger("qtasks.worker")

_NO_KWARGS: dict[str, Any] = {}

_RETURN_GRACE = 0.1
"""Seconds a thread given up on has to return before the warning that it runs on: a sync
``ctx.sleep`` wakes as its wait is cancelled, and its task ends a moment later."""

_ORPHANS: list[ThreadCall] = []
"""Calls whose thread returned after their event loop closed: their tokens are given back by
the next call that finds the limiter full (see :func:`_acquire`)."""

_RUNNING_ON: set[ThreadCall] = set()
"""Calls given up on whose thread may still run (see :func:`still_running`)."""

_HERE = threading.local()
"""``call``: the :class:`ThreadCall` running in this thread, if any (see :func:`in_task_thread`)."""


def in_task_thread() -> bool:
    """Whether this thread runs sync task code (a :class:`ThreadCall`): a coroutine made here
    has nothing to await it."""
    return getattr(_HERE, "call", None) is not None


F = TypeVar("F", bound=Callable[..., Any])

_running_loop = asyncio._get_running_loop
"""The running asyncio loop or ``None`` (under trio, or outside a loop): the C function behind
``asyncio.get_running_loop``, without an exception when there is none. Comparing it with the
loop the components were started in costs well under a microsecond per call. The one alias
of it: the app, the sync app and tasks import it from here."""


def loop_only(
    app_name: Callable[[Any], str], receiver: str, blocking: Callable[[], type]
) -> Callable[[F], F]:
    """A decorator for the coroutine (and async generator) methods of the async app and its
    records: called in a sync task's thread, where nothing could await what they return, they
    raise :class:`~qtasks.errors.AsyncCallInThreadError` at once instead of handing back a
    coroutine that fails obscurely later (or silently never runs).

    ``app_name(self)``: the app's name for the message; ``receiver``: how the message names
    the object (``"app"``, ``"record"``); ``blocking()``: the sync app's class with the
    blocking form, if it has a method of that name (read only when raising).

    On the event loop it costs the wrapper's call and one C call (a thread without a running
    asyncio loop is the only one asked whether it runs task code); under trio no asyncio loop
    runs, and the event loop's thread is not a task's."""

    def decorate(func: F) -> F:
        short = func.__name__

        @functools.wraps(func)
        def call(self: Any, /, *args: Any, **kwargs: Any) -> Any:
            if _running_loop() is None and in_task_thread():
                sync = blocking()
                raise AsyncCallInThreadError(
                    app_name(self),
                    short if receiver == "app" else f"{receiver}.{short}",
                    call=f"{receiver}.{short}",
                    blocking=f"{sync.__name__}.{short}" if hasattr(sync, short) else None,
                )
            return func(self, *args, **kwargs)

        return cast(F, call)

    return decorate


def still_running() -> list[ThreadCall]:
    """The calls of sync task code given up on (``max_time``, a cancel, the worker's stop)
    whose threads still run, in any app of this process: Python waits for them at exit (but
    see :func:`_at_threads_shutdown`)."""
    return [call for call in list(_RUNNING_ON) if not call.ended]


_EXIT_HOOK: list[Callable[[], object]] = []
"""What threading holds for :func:`_at_threads_shutdown` once it is registered (its wrapper)."""
_EXIT_HOOK_LOCK = threading.Lock()


class _SkipThreadsWait(Exception):
    """Raised out of Python's ``threading._shutdown`` to skip its wait for hung threads."""


def _hook_exit() -> None:
    """Once per process, when a call is first given up on: have Python's shutdown call
    :func:`_at_threads_shutdown` before it joins the non-daemon threads, as concurrent.futures
    has it call its own (``threading._register_atexit``, in CPython 3.11 to 3.13 at least)."""
    if _EXIT_HOOK:
        return
    register = getattr(threading, "_register_atexit", None)
    callbacks = getattr(threading, "_threading_atexits", None)
    if register is None or not isinstance(callbacks, list):
        return
    with _EXIT_HOOK_LOCK:  # loops in two threads
        if _EXIT_HOOK:
            return
        try:
            register(_at_threads_shutdown)
        except RuntimeError:  # the shutdown began (a loop in a thread of its own): too late
            return
        # Found by what it wraps (a functools.partial up to 3.12, a lambda from 3.13):
        # another thread may have registered a callback of its own since.
        ours = [c for c in callbacks if _wraps(c, _at_threads_shutdown)]
        if ours:
            _EXIT_HOOK.append(ours[-1])


def _wraps(callback: object, func: Callable[[], None]) -> bool:
    """Whether ``callback``, as ``threading._register_atexit`` stores it, calls ``func``: a
    ``functools.partial`` of it (CPython 3.11 and 3.12) or a lambda closing over it (3.13)."""
    if getattr(callback, "func", None) is func:
        return True
    for cell in getattr(callback, "__closure__", None) or ():
        try:
            if cell.cell_contents is func:
                return True
        except ValueError:  # an empty cell
            continue
    return False


def _hung_threads() -> list[ThreadCall]:
    """The calls of :func:`still_running` whose thread Python would wait for at exit."""
    return [
        call
        for call in still_running()
        if call.thread is not None and not call.thread.daemon and call.thread.is_alive()
    ]


def _at_threads_shutdown() -> None:
    """In Python's shutdown, on the main thread, before it joins the non-daemon threads: if
    sync task code given up on still runs in some, whose tasks were settled or handed back
    already, the process would wait until it returns (for ever, for a call that hangs).

    The main thread is marked ended, as Python does next (:func:`_main_ended`), and the other
    non-daemon threads (the user's) are waited for first, as Python would, after the
    callbacks Python would call after this one (see :func:`_call_the_rest_now`). If hung
    calls are left then, a warning names them and Python's wait is skipped: the rest of the
    exit is Python's own (the ``atexit`` handlers, the flush of streams and files, the exit
    code of the script, which ``os._exit`` would lose), the hung threads left to end with the
    process as daemon threads are."""
    if not _hung_threads() or not _main_ended():
        return
    _call_the_rest_now()
    me, main = threading.current_thread(), threading.main_thread()
    said: set[threading.Thread] = set()
    while True:
        hung = _hung_threads()
        theirs = {call.thread for call in hung}
        others = [
            t
            for t in threading.enumerate()
            if not t.daemon and t is not me and t is not main and t not in theirs
        ]
        if not others:
            break
        if said != set(others):
            said = set(others)
            log.info(
                "at exit, waiting for %d other non-daemon thread(s) (%s), not for %d thread(s) "
                "of sync task code given up on",
                len(others),
                ", ".join(t.name for t in others),
                len(hung),
            )
        # Not for ever: a loop still running in one of them may give up on its thread.
        others[0].join(1.0)
    if hung:
        log.warning(
            "exiting without waiting for %d thread(s) of sync task code still running after "
            "they were given up on (Python cannot stop a thread; the worker is done with their "
            "tasks: settled, handed back, or left to their leases): %s",
            len(hung),
            ", ".join(f"{call.run.task.name} ({call.run.record.uuid})" for call in hung),
        )
    # Always, now: _shutdown would assert that the main thread has not ended yet.
    _skip_threads_wait()


def _main_ended() -> bool:
    """Mark the main thread ended, as ``threading._shutdown`` does right after the callbacks
    (so threads that wait for it, ``main_thread().join()`` or ``is_alive()``, go on while the
    others are waited for); whether it could be (on the main thread, on CPython 3.11 to
    3.13's internals: else nothing is done and Python waits as usual)."""
    main = threading.main_thread()
    if main.ident != threading.get_ident():
        return False
    handle: Any = getattr(main, "_handle", None)
    if handle is not None and hasattr(handle, "_set_done"):  # 3.13+
        handle._set_done()
        return True
    lock: Any = getattr(main, "_tstate_lock", None)
    stop: Any = getattr(main, "_stop", None)
    if lock is None or stop is None:
        return False
    if lock.locked():
        lock.release()
    stop()
    return True


def _call_the_rest_now() -> None:
    """Call now, once, the ``threading._register_atexit`` callbacks that Python calls after
    :func:`_at_threads_shutdown` (registered before it), so that the threads they end (the
    idle ones of a ``ThreadPoolExecutor`` never shut down) are not waited for in vain."""
    callbacks: list[Callable[[], object]] = getattr(threading, "_threading_atexits", [])
    if not _EXIT_HOOK:
        return
    mine = next((i for i, call in enumerate(callbacks) if call is _EXIT_HOOK[0]), 0)
    for i in reversed(range(mine)):
        call, callbacks[i] = callbacks[i], _nothing  # replaced in place: Python iterates it
        call()


def _nothing() -> None:
    pass


def _skip_threads_wait() -> NoReturn:
    """Leave ``threading._shutdown`` by an exception: Python reports it as unraisable (not
    here: this one is kept quiet) and goes on with its exit, without the wait for threads."""
    previous = sys.unraisablehook

    def quiet(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, _SkipThreadsWait):
            previous(unraisable)

    sys.unraisablehook = quiet
    raise _SkipThreadsWait


class ThreadCall:
    """One call of sync task code in a worker thread; the borrower of its limiter token.

    The thread sets ``started`` and ``ended``, the loop ``abandoned`` (after ``wake``); each
    side writes its flag, then reads the other's, so one of them sees that the token must be
    given back, and :meth:`_release` (on the loop) gives it back once."""

    __slots__ = (
        "abandoned",
        "args",
        "done",
        "ended",
        "func",
        "held",
        "kwargs",
        "limiter",
        "run",
        "since",
        "started",
        "thread",
        "wake",
    )

    def __init__(
        self,
        run: TaskRun,
        limiter: anyio.CapacityLimiter,
        func: Callable[..., Any],
        args: Any,
        kwargs: dict[str, Any],
    ) -> None:
        self.run = run
        self.limiter = limiter
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.held = True
        self.started = self.ended = self.abandoned = False
        self.wake: Callable[[], object] | None = None
        self.done: anyio.Event | None = None
        """Set when the thread of an abandoned call returned (made when it is abandoned)."""
        self.since = 0.0
        self.thread: threading.Thread | None = None
        """The thread that runs it, once it started."""

    def __call__(self) -> Any:  # in the worker thread
        self.thread = threading.current_thread()
        self.started = True
        _HERE.call = self
        try:
            if self.abandoned:
                return None  # given up on before the thread took it: never started
            return self.func(*self.args, **self.kwargs)
        except KeyboardInterrupt as exc:  # no Ctrl-C reaches this thread: the task's code
            raise TaskInterruptError(self.run.task.name) from exc
        finally:
            _HERE.call = None  # anyio's worker threads run other code next
            self.ended = True
            if self.abandoned:
                _RUNNING_ON.discard(self)
                self._wake()

    def _wake(self) -> None:
        """From the thread: give the token back on the loop, or later if the loop is gone."""
        wake = self.wake
        if wake is None:
            return  # the loop saw the call end when it gave up on it: it gave the token back
        self.since = time.monotonic() - self.since  # how long it ran on, for the log
        try:
            wake()
        except RuntimeError:  # the loop is closed (or trio's run finished)
            _ORPHANS.append(self)

    async def give_up(self) -> None:
        """On the loop, when the await of the call ended without its result (cancelled by
        ``max_time`` or a cancel; or the call raised): :meth:`abandon`. A thread that still
        runs has :data:`_RETURN_GRACE` seconds to return (a shielded wait for :attr:`done`,
        on this path only) before it is said to run on, and its run is told
        (``run.abandoned``): one that returns by then was not given up on."""
        if not self.abandon():
            return
        assert self.done is not None
        with anyio.CancelScope(shield=True), anyio.move_on_after(_RETURN_GRACE):
            await self.done.wait()
        if not self.done.is_set():
            self._ran_on()

    def abandon(self) -> bool:
        """On the loop, when the await of the call ended without its result: the token stays
        with the thread while it still runs. Returns whether it does."""
        if not self.ended:
            from qtasks.app import _threadsafe  # app imports this module (through executor)

            self.wake = _threadsafe(self._release)
            self.done = anyio.Event()
            self.since = time.monotonic()
            _RUNNING_ON.add(self)  # before ``abandoned``: the thread's end takes it out
            _hook_exit()
        self.abandoned = True
        if self.ended or not self.started:
            _RUNNING_ON.discard(self)
            self._release()  # returned already, or will never run
            return False
        return True

    def _ran_on(self) -> None:
        """The thread of the call given up on still runs: tell its run, and warn."""
        run = self.run
        run.abandoned = self
        flow = run.task.flow
        if run.cancel_requested:
            why = "cancelled"
        elif run.max_time_scope is not None and run.max_time_scope.cancel_called:
            why = "max_time"
        else:  # the worker's task group, or a test harness's timeout
            why = "its run was stopped: the worker's stop, or a test harness's timeout"
        log.warning(
            "sync task %s (%s) was given up on (%s) while its code still runs in its thread: "
            "the thread keeps one of the worker's threads%s until it returns",
            run.task.name,
            run.record.uuid,
            why,
            "" if flow is None or flow.max_concurrency is None else ", and its concurrency slot,",
        )

    def _release(self) -> None:
        """On the loop: give the limiter token back (once), wake :attr:`done`."""
        if not self.held:
            return
        self.held = False
        self.limiter.release_on_behalf_of(self)
        if self.done is not None:
            self.done.set()
            run = self.run
            if run.abandoned is self:
                log.info(
                    "the thread of sync task %s (%s) returned %.1f s after it was given up on",
                    run.task.name,
                    run.record.uuid,
                    self.since,
                )


async def _acquire(limiter: anyio.CapacityLimiter, call: ThreadCall) -> None:
    """The limiter is full: take back the tokens of orphaned calls of it, then wait."""
    for orphan in [o for o in _ORPHANS if o.limiter is limiter]:
        _ORPHANS.remove(orphan)
        orphan._release()
    try:
        limiter.acquire_on_behalf_of_nowait(call)
    except anyio.WouldBlock:
        await limiter.acquire_on_behalf_of(call)


async def in_thread(
    run: TaskRun,
    func: Callable[..., Any],
    args: Any,
    kwargs: dict[str, Any] = _NO_KWARGS,
) -> Any:
    """``func(*args, **kwargs)`` in a worker thread under ``run.app.thread_limiter``; a
    cancel gives up on the thread (it runs on, holding its token until it returns)."""
    app = run.app
    limiter = app.thread_limiter
    call = ThreadCall(run, limiter, func, args, kwargs)
    try:
        limiter.acquire_on_behalf_of_nowait(call)
    except anyio.WouldBlock:
        await _acquire(limiter, call)
    try:
        # The token is the call's: anyio's own limiter is not the bound here.
        result = await anyio.to_thread.run_sync(
            call, abandon_on_cancel=True, limiter=app._no_thread_limit
        )
    except BaseException:
        await call.give_up()
        raise
    call._release()
    return result
