"""The enqueue step: a new task's record is stored and its message published.

There is one step and one way to call it, :func:`store_and_publish`; how it reaches the backends
is chosen once, when the app starts (:func:`choose`), from what the components can do:

- a :class:`~qtasks.components.SharedServer` broker folds both writes into one round trip
  (``publish_new``: the record, then the message, atomically on Redis);
- remote components on asyncio overlap the two round trips: the record is added with
  ``replace=False`` while the message is published, so a worker that got the message first
  (its ``begin`` creates the record) is never set back;
- otherwise (local components, or trio) the record is added, then the message published.

A publish that fails raises its own error; the record may then be stored, as when a sequential
publish fails. An add that fails after a confirmed publish raises too, yet the task runs.
"""

from __future__ import annotations

import asyncio
import reprlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from qtasks import flow
from qtasks.checks import ETA_TAKES, FAR_AHEAD, check_delay, check_priority, far_ahead, finite
from qtasks.compat.calls import bad_task_name
from qtasks.components import Broker, SharedServer, Storage, provides
from qtasks.errors import TaskArgumentsError
from qtasks.messages import Envelope, Message, new_uuid
from qtasks.record import TaskRecord
from qtasks.task import AsyncTask, TaskDef

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks

StoreAndPublish = Callable[[TaskRecord, Envelope], Awaitable[None]]
"""Stores a new task's record and publishes its message (see :func:`choose`)."""


def choose(app: AsyncQueueTasks, on_asyncio: bool) -> tuple[str, StoreAndPublish]:
    """How the started ``app`` enqueues: ``("shared" | "overlapped" | "sequential", step)``
    (see the module docstring); also sets ``app.shared_server``, which the worker's settle
    step uses too."""
    broker, storage = app.broker, app.storage
    shared = cast(SharedServer, broker) if provides(broker, SharedServer) else None
    if shared is not None and not shared.shares_server_with(storage):
        shared = None
    app.shared_server = shared
    if shared is not None:

        async def folded(record: TaskRecord, envelope: Envelope) -> None:
            await shared.publish_new(envelope, storage, record)

        return "shared", folded
    local = getattr(broker, "local", False) or getattr(storage, "local", False)
    if not local and on_asyncio:
        return "overlapped", lambda record, env: _overlapped(storage, broker, record, env)
    return "sequential", lambda record, env: _sequential(storage, broker, record, env)


async def _sequential(
    storage: Storage, broker: Broker, record: TaskRecord, envelope: Envelope
) -> None:
    await storage.add(record)
    await broker.publish(envelope)


async def _overlapped(
    storage: Storage, broker: Broker, record: TaskRecord, envelope: Envelope
) -> None:
    """Add ``record`` and publish ``envelope`` concurrently: one round trip's wait instead of
    two. Raises the publish's error if it failed (the record may be stored), else the add's
    (the message is queued and runs anyway, its record created by ``begin``)."""
    add = storage.add(record, replace=False)
    # A bare asyncio task (only asyncio apps overlap): an anyio task group costs ~30 µs more
    # per enqueue.
    added = asyncio.get_running_loop().create_task(add)
    try:
        await broker.publish(envelope)
    except Exception:
        await asyncio.wait((added,))  # the add runs to its end; the publish error wins
        if not added.cancelled():
            added.exception()  # retrieved: no "never retrieved" warning
        raise
    except BaseException:
        added.cancel()
        raise
    await added


def _eta(value: Any) -> float:
    """``value`` of the ``add_task`` option ``eta`` as a float; raises
    :class:`TaskArgumentsError` unless it is a finite number (nan or inf: a time no broker
    can keep)."""
    number = finite(value)
    if number is None:
        raise TaskArgumentsError(
            f"add_task: eta expects a unix time (a finite number), got {reprlib.repr(value)}"
        )
    return number


async def prepare(
    app: AsyncQueueTasks,
    task_name: str,
    args: Sequence[Any],
    kwargs: dict[str, Any] | None,
    priority: int | None,
    delay: float | None,
    eta: float | None,
    parent_uuid: str | None,
    retry: int | None = None,
    *,
    expires: float | None = None,
    unique_key: str | None = None,
    unique_for: float | None = None,
) -> tuple[AsyncTask, Envelope, Message | None]:
    """A new task's record and envelope, and its message when it has a unique key to claim
    with the enqueue (:func:`qtasks.flow.publish_unique`), else ``None``: the arguments
    checked against a registered task, its default priority, the due time
    (:func:`new_message`), ``qtasks_task_enqueue`` applied, then the flow options stamped and
    the message encoded (:func:`finish`), for ``add_task`` and ``add_tasks`` alike
    (``retry``: the call's own, see :class:`~qtasks.workflows.Signature`)."""
    task, message, eta = new_message(
        app, task_name, args, kwargs, priority, delay, eta, parent_uuid, retry
    )
    if "qtasks_task_enqueue" in app.hooks.active:
        message = await app.hooks.transform(
            "qtasks_task_enqueue", "message", app=app, message=message
        )
    return finish(
        app,
        task,
        message,
        eta,
        parent_uuid,
        expires=expires,
        unique_key=unique_key,
        unique_for=unique_for,
    )


def new_message(
    app: AsyncQueueTasks,
    task_name: str,
    args: Sequence[Any],
    kwargs: dict[str, Any] | None,
    priority: int | None,
    delay: float | None,
    eta: float | None,
    parent_uuid: str | None,
    retry: int | None,
) -> tuple[TaskDef[..., Any] | None, Message, float | None]:
    """The first half of :func:`prepare`, before the hook: the registered task (``None``:
    not registered here), the new message, its due time; raises for arguments that do not
    fit the task and bad options."""
    if not isinstance(task_name, str):  # else the worker finds an undecodable message
        raise bad_task_name(task_name, kwargs or {})
    kwargs = dict(kwargs) if kwargs else {}
    if priority is not None:
        priority = check_priority(priority, "add_task: priority", TaskArgumentsError)
    task = app.tasks.get(task_name)
    if task is not None:
        task.check_arguments(args, kwargs)
        if priority is None:
            priority = task.options.priority
    if priority is None:
        priority = app.config.default_priority
    now = app.clock()
    # One comparison more, and only for a task given a delay or an eta.
    if delay is not None:
        seconds = check_delay(delay, "add_task: delay", TaskArgumentsError)
        if seconds > FAR_AHEAD:
            raise far_ahead("add_task: delay", seconds, seconds, "seconds", TaskArgumentsError)
        eta = now + seconds
    elif eta is not None:
        eta = _eta(eta)
        if eta - now > FAR_AHEAD:
            raise far_ahead("add_task: eta", eta, eta - now, ETA_TAKES, TaskArgumentsError)
    headers: dict[str, Any] = {}
    if parent_uuid is not None:
        headers["parent_uuid"] = parent_uuid
    if retry is not None:
        headers["retry"] = retry  # qtasks.workflows.canvas.RETRY_HEADER
    message = Message(new_uuid(), task_name, list(args), kwargs, priority, now, 0, headers)
    return task, message, eta


def finish(
    app: AsyncQueueTasks,
    task: TaskDef[..., Any] | None,
    message: Message,
    eta: float | None,
    parent_uuid: str | None,
    *,
    expires: float | None = None,
    unique_key: str | None = None,
    unique_for: float | None = None,
) -> tuple[AsyncTask, Envelope, Message | None]:
    """The second half of :func:`prepare`, after the hook: the flow options stamped, the
    message encoded, the record made (see :func:`prepare` for what it returns)."""
    if (
        expires is not None
        or unique_key is not None
        or unique_for is not None
        or (task is not None and task.flow is not None)
    ):
        flow.prepare(
            app, task, message, expires=expires, unique_key=unique_key, unique_for=unique_for
        )
    envelope = app.codec.encode(message, eta)
    now = message.created_at
    record = AsyncTask(
        uuid=message.uuid,
        task_name=message.task_name,
        priority=message.priority,
        args=message.args,
        kwargs=message.kwargs,
        created_at=now,
        updated_at=now,
        eta=eta,
        parent_uuid=parent_uuid,
        _client=app,
    )
    return record, envelope, message if "unique" in message.headers else None
