"""The qtasks error tree: every error qtasks raises is a :class:`QTasksError`.

Exceptions carry the ids they are about as attributes and build their own message. Backend
packages subclass these (e.g. ``qtasks_redis`` raises :class:`BrokerConnectionError`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class QTasksError(Exception):
    """Base of every qtasks error.

    Picklable (an error of a worker process reaching a parent through ``multiprocessing`` or
    a process pool, say): most subclasses build their message from other arguments, and
    ``Exception``'s own pickling calls the class with the message alone, which their
    ``__init__`` does not take. Unpickled, an error is rebuilt from its message and its
    attributes, without calling ``__init__`` again."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args), self.__dict__)


def _rebuild(cls: type[QTasksError], args: tuple[Any, ...]) -> QTasksError:
    """A :class:`QTasksError` unpickled: its message (``args``); ``pickle`` sets the rest."""
    error = cls.__new__(cls)
    BaseException.__init__(error, *args)
    return error


class ConfigError(QTasksError):
    """Bad configuration: a wrong type, an unknown key, a missing component."""


class QTasksModuleNotProvidedError(QTasksError, ModuleNotFoundError):
    """A QTasks 1.7 module qtasks does not have was imported (``qtasks.brokers``...); the
    message says what to write instead (see :mod:`qtasks.compat.modules`)."""


class QTasksNameNotProvidedError(QTasksError):
    """A QTasks 1.7 name qtasks does not have was read from one of QTasks' modules that qtasks
    has (``qtasks.plugins.AsyncDependsPlugin``); the message says what to write instead (see
    :mod:`qtasks.compat.names`). Raised as one of its two subclasses."""

    LEAD = "cannot import name {attribute!r} from {module!r}"

    def __init__(self, module: str, attribute: str, advice: str) -> None:
        self.module, self.attribute, self.advice = module, attribute, advice
        lead = self.LEAD.format(module=module, attribute=attribute)
        super().__init__(
            f"{lead}: it is QTasks 1.7's, and qtasks has no such name: {advice} "
            "(see docs/coming-from-qtasks.md)"
        )


class QTasksAttributeNotProvidedError(QTasksNameNotProvidedError, AttributeError):
    """The name read as an attribute (``module.Name``, ``getattr``): an ``AttributeError``, so
    ``hasattr()`` says ``False``."""

    LEAD = "module {module!r} has no attribute {attribute!r}"


class QTasksImportNotProvidedError(QTasksNameNotProvidedError, ImportError):
    """The name imported (``from qtasks.plugins import AsyncDependsPlugin``): an
    ``ImportError``, since CPython replaces an ``AttributeError`` raised there with a bare
    "cannot import name", losing the advice."""


class TaskDeclarationError(QTasksError, TypeError):
    """A task was declared with a duplicate name or an option of the wrong type (or
    ``app.add_middleware`` was given something that is not a middleware)."""


class UnresolvedAnnotationError(TaskDeclarationError):
    """A task parameter's annotation is a string qtasks cannot resolve in the task's module,
    and it names a State or a ``Depends`` (typically a class defined inside a function, with
    ``from __future__ import annotations``): injected it would not be."""

    FIX = "define it at module level, or drop `from __future__ import annotations` from that module"

    def __init__(self, task_name: str, parameter: str, annotation: str) -> None:
        self.task_name = task_name
        self.parameter = parameter
        self.annotation = annotation
        super().__init__(
            f"task {task_name!r}: the annotation {annotation!r} of parameter {parameter!r} "
            "cannot be resolved in the task's module, so what it names (a State or Depends "
            f"defined inside a function) would not be injected; {self.FIX}"
        )


class UnknownTaskError(QTasksError, LookupError):
    """A task name that is not in the app's registry. Given the ``known`` names, the message
    suggests the closest one; ``fix`` is appended to it."""

    def __init__(self, task_name: str, known: Iterable[str] = (), fix: str = "") -> None:
        self.task_name = task_name
        close = difflib.get_close_matches(task_name, list(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        super().__init__(
            f"unknown task {task_name!r}{hint}: it is not registered in this app"
            + (f"; {fix}" if fix else "")
        )


class TaskNotFoundError(QTasksError, LookupError):
    """No record is stored for this task uuid (never added, or expired)."""

    def __init__(self, uuid: str) -> None:
        self.uuid = uuid
        super().__init__(f"no task record for uuid {uuid!r}")


class InvalidQueryError(QTasksError, ValueError):
    """A storage query (:class:`~qtasks.components.RecordQuery`) that cannot be run: a page size
    out of bounds, a time range that ends before it starts, a cursor from elsewhere."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(f"invalid task query: {problem}")


class PermanentError(QTasksError):
    """An error no new attempt heals: a task that ends with one is not retried, whatever its
    retry policy (a broken plugin, a result the serializer cannot encode, a workflow input
    that is gone)."""


class SerializationError(PermanentError, ValueError):
    """A value could not be encoded or decoded by the app's serializer."""


class MessageTooLargeError(SerializationError):
    """An encoded message is larger than ``max_message_size``."""

    def __init__(self, size: int, limit: int, task: str | None = None) -> None:
        self.size = size
        self.limit = limit
        self.task = task
        """The name of the task whose message it is, when known (an enqueue, a workflow's
        member): which one of a workflow's members is too large."""
        of = "" if task is None else f"task {task!r}: "
        super().__init__(f"{of}encoded message is {size} bytes, above max_message_size={limit}")


class AsyncCallInThreadError(PermanentError, RuntimeError):
    """A coroutine method of the async app (``app.add_task``, ``app.get``, ``app.wait``,
    ``app.cancel``..., ``task.add_task``, a record's ``wait_result``) was called in a sync
    task's thread, where nothing awaits the coroutine it returns: the call would be lost. The
    message says what works there.

    ``method``: what was called (``"get"``, ``"child.add_task"``, ``"record.wait_result"``);
    ``call``: how to name it to ``anyio.from_thread.run`` (``"app.get"``); ``blocking``: the
    blocking form of the sync app, if it has one (``"QueueTasks.get"``)."""

    ENQUEUES = ("add_task", "enqueue", "add_tasks")

    def __init__(
        self,
        app_name: str,
        method: str,
        *,
        call: str | None = None,
        blocking: str | None = None,
    ) -> None:
        self.app_name = app_name
        self.method = method
        short = method.rpartition(".")[2]
        call = call or f"app.{short}"
        head = (
            f"app {app_name!r}: {method}(...) was called in a sync task (def), whose thread "
            "cannot await the coroutine it returns"
        )
        if short in self.ENQUEUES:
            lost = "nothing would be enqueued"
            ways = (
                f"`self.add_task(...)` (echo=True) or `anyio.from_thread.run({call}, ...)`, "
                "make the task `async def` and await the call"
            )
            blocking = blocking or f"QueueTasks.{short}"
        else:
            lost = "it would never run"
            ways = f"`anyio.from_thread.run({call}, ...)` or make the task `async def` and await it"
        sync = f", or use the sync app, whose `{blocking}` blocks" if blocking else ""
        message = f"{head}, so {lost}; there, call {ways}{sync}"
        super().__init__(message)


class TaskArgumentsError(QTasksError, TypeError):
    """The arguments do not fit the task's signature."""


class TaskCodeError(QTasksError):
    """Raised by a hook implementation, chained from an exception of the task's own code (a
    dependency function run for it, say): the core re-raises that exception as it is, for
    retries and the record, instead of blaming the plugin with a :class:`PluginError`."""


class TaskTimeoutError(QTasksError, TimeoutError):
    """Waiting for a task's final record took longer than the timeout (``what`` is
    ``"workflow"`` when it was a workflow's, ``uuid`` then its id)."""

    def __init__(
        self, uuid: str, timeout: float | None, why: str = "", *, what: str = "task"
    ) -> None:
        self.uuid = uuid
        self.timeout = timeout
        self.what = what
        super().__init__(f"{what} {uuid} did not finish within {timeout} s{why}")


class InvalidTimeoutError(QTasksError, ValueError):
    """A wait's ``timeout`` (``wait``, ``wait_result``, ``stream``, ``wait_workflow``) that is
    neither ``None`` nor seconds >= 0 (an int or a float, not a bool; ``math.inf`` waits
    without limit): refused before anything waits."""


class TaskMaxTimeError(QTasksError, TimeoutError):
    """A task ran longer than its ``max_time``; stored on the record as the error."""

    def __init__(self, task_name: str, max_time: float) -> None:
        self.task_name = task_name
        self.max_time = max_time
        super().__init__(f"task {task_name!r} exceeded max_time={max_time} s")


class TaskCancelledError(QTasksError):
    """Raised inside a task (``self.ctx.cancel``) or by a waiter to end it as cancelled."""

    def __init__(self, reason: str = "") -> None:
        self.reason = reason
        super().__init__(f"task cancelled: {reason}" if reason else "task cancelled")


class StrayCancellationError(QTasksError):
    """Code the worker ran raised a ``CancelledError`` that neither a cancel of the task nor
    the worker's stop asked for: it awaited something that was cancelled, or a library let an
    inner cancellation escape. A task's record says ``error`` with it (retried as any error
    is); chained from the ``CancelledError``, whose traceback the record keeps."""

    def __init__(self, culprit: str) -> None:
        self.culprit = culprit
        super().__init__(
            f"{culprit} raised CancelledError, but no cancel of the task and no stop of the "
            "worker asked for it (it awaited something that was cancelled, or a library let "
            "an inner cancellation escape)"
        )


class TaskExitError(QTasksError):
    """A task's code raised ``SystemExit`` (``sys.exit()``, or a command-line entry point it
    called, such as a click command, which exits when done): the task fails with this error,
    chained from it, instead of the ``SystemExit`` ending the worker's process and with it
    every task that runs there. Retried as any error is."""

    def __init__(self, task: str, code: str) -> None:
        self.task = task
        self.code = code
        """The exit code given to ``sys.exit``, as ``repr`` shows it (``'3'``, ``'None'``)."""
        super().__init__(
            f"task {task!r} raised SystemExit({code}) (sys.exit() in its code): it fails "
            "the task, not the worker"
        )


class TaskInterruptError(QTasksError):
    """A task's code raised ``KeyboardInterrupt`` where no Ctrl-C can arrive: in a worker
    thread (a sync task) or on an event loop outside the main thread (the sync app's), as
    Python delivers signals to the main thread only. The task fails with this error, chained
    from it, instead of the ``KeyboardInterrupt`` ending the loop that serves every task
    (the sync app's next call failed, obscurely). Retried as any error is. On the main
    thread (an async task of ``qtasks run``, ``asyncio.run``) it may be a real Ctrl-C: it
    propagates there."""

    def __init__(self, task: str) -> None:
        self.task = task
        super().__init__(
            f"task {task!r} raised KeyboardInterrupt in its code, not a Ctrl-C (none reaches "
            "a worker thread or an event loop outside the main thread): it fails the task, "
            "not the app"
        )


class TaskFailedError(QTasksError):
    """A waited-for task ended with status ``error``; ``task`` holds its record."""

    def __init__(self, task: object, message: str) -> None:
        self.task = task
        super().__init__(message)


class ComponentError(QTasksError):
    """A component (broker, storage, global config) failed or was used wrongly."""


class ComponentNotStartedError(ComponentError):
    """A component was used before ``start`` or after its stop (or the sync app was closed
    while a call waited on it)."""


class BrokerConnectionError(ComponentError, ConnectionError):
    """The broker or storage server cannot be reached. The message never contains a password."""


class StorageError(ComponentError):
    """The storage could not read or write a task record."""


class UnstorableRecordError(StorageError, PermanentError):
    """The storage refused a task's final record for what it holds, not for want of a
    connection: a result over its server's size limit (Redis's ``proto-max-bulk-len``), a value
    it cannot encode, an error reply. Saving it again would fail the same way, so the worker
    ends the task ``error`` with this as its reason instead, without the result."""

    def __init__(self, uuid: str, what: str, reason: str) -> None:
        self.uuid = uuid
        self.reason = reason
        super().__init__(f"{what} could not be stored: {reason}")


class StorageConnectionError(StorageError, BrokerConnectionError):
    """The storage's server cannot be reached. Also a :class:`BrokerConnectionError` (and a
    :class:`ConnectionError`), which code written before it existed catches."""


class ServerFullError(BrokerConnectionError):
    """The broker's or storage's server refused a write for want of memory (Redis at its
    ``maxmemory`` with the ``noeviction`` policy): nothing of the call was written, and the
    same call succeeds once memory is freed. A :class:`BrokerConnectionError`, so a worker
    rides it out as an outage (its tasks are retried, never failed or dead-lettered for it)
    and a producer handles it as the server being unavailable."""


class StorageFullError(ServerFullError, StorageConnectionError):
    """The storage's server refused a write for want of memory (see :class:`ServerFullError`)."""


class CredentialsRefusedError(BrokerConnectionError):
    """The server answered and refused the connection: wrong password or user, no
    permission, a virtual host not allowed; or the connection's TLS failed its checks (a
    certificate that does not verify, a server that does not speak TLS: Redis's
    ``rediss://``). A configuration error that no retry mends: a
    worker waiting for its servers at start (``start_timeout``, see :mod:`qtasks.waiting`)
    does not wait on it. A :class:`BrokerConnectionError`, as it was before it existed."""


class StorageCredentialsRefusedError(CredentialsRefusedError, StorageConnectionError):
    """The storage's server refused the credentials (see :class:`CredentialsRefusedError`)."""


class LeaseLostError(ComponentError):
    """A worker presented a stale delivery token: another attempt owns this message now."""


class PluginError(PermanentError):
    """A plugin is broken: it names an unknown hook, or a hook implementation raised."""

    def __init__(self, plugin: str, message: str) -> None:
        self.plugin = plugin
        super().__init__(f"plugin {plugin!r}: {message}")


class DependencyError(QTasksError):
    """A ``Depends`` dependency could not be resolved or torn down."""


class StateError(QTasksError):
    """A State subclass is declared or used wrongly (bad ``scope``, wrong colour for the task)."""


class WorkflowError(QTasksError, ValueError):
    """A workflow that cannot be built or run as given: an empty group or chain, a cycle, a
    value that is not a signature, a storage without workflow support."""


class WorkflowInputError(WorkflowError, PermanentError):
    """A workflow step's input could not be read from its predecessors' records (one is
    missing, expired, or did not succeed); the step fails with this error."""

    def __init__(self, uuid: str, reason: str) -> None:
        self.uuid = uuid
        super().__init__(f"input of workflow step {uuid} cannot be read: {reason}")
