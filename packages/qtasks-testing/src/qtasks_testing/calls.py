"""The calls of a test into an inline harness, and which call a running task belongs to.

Inline, ``add_task`` (``add_tasks``, ``run_workflow``, ``wait``, ``run_pending``...) is a call
of the test: it runs its task, and every task enqueued while that one runs (a child), within
one budget, the harness's ``timeout``, and raises their failures when it returns. Whether an
enqueue is a child's is not a question of timing (another call of the test may be running then:
``asyncio.gather`` of two ``add_task``, code under test enqueuing from two threads) but of where
it comes from. :data:`RUNNING` says it: the harness sets it while it runs a task, and the task's
code sees it wherever it runs: asyncio copies it into the tasks a task starts, anyio into a sync
task's thread (``to_thread``) and back into the event loop when that code enqueues through the
app's portal. A thread the task starts itself without its context (a ``ThreadPoolExecutor``)
does not see it: its enqueue is a call of the test.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

from qtasks.record import TaskRecord


class Session:
    """One installation of a harness on an app (from ``install`` to ``uninstall``)."""

    __slots__ = ("installed",)

    def __init__(self) -> None:
        self.installed = True


@dataclass(eq=False)
class Call:
    """One call of the test into an inline harness and the tasks it runs, children included."""

    session: Session
    what: str
    """The call, for messages: ``add_task of send('ada') [uuid]``, ``run_pending``..."""
    describe: Callable[[str], str]
    """``name(args) [uuid]`` of a task by its uuid."""
    running: list[str] = field(default_factory=list)
    """Uuids of the tasks running now, the innermost last."""
    cancelled: list[str] = field(default_factory=list)
    """``running`` when a limit (the harness's timeout, add_task's) cancelled them."""
    unreported: list[TaskRecord] = field(default_factory=list)
    """Children that failed during the call, raised when it returns."""
    finished: int = 0
    """Tasks run to their end during the call (for the message of its timeout)."""
    ended: bool = False


@dataclass(frozen=True, slots=True)
class Running:
    """The task ``uuid`` of ``call``, running where :data:`RUNNING` holds this."""

    call: Call
    uuid: str


RUNNING: ContextVar[Running | None] = ContextVar("qtasks_testing.running", default=None)
