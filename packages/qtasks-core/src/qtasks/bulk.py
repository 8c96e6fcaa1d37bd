"""Bulk enqueue: many new tasks stored and published in one round trip per batch.

``app.add_tasks([...])`` and ``task.add_tasks(args_list)`` prepare every task as ``add_task``
does (arguments checked, ``qtasks_task_enqueue`` applied, the message encoded), all of them
before any is stored, so a bad item stores nothing (its error names its index); then they
store and publish them in batches of :data:`BATCH`, through the best the components offer:

- a :class:`~qtasks.components.SharedServer` broker that is a
  :class:`~qtasks.components.BulkPublishNew`: records and messages of a batch in one call
  (Redis: one script);
- otherwise the records of a batch are added (:class:`~qtasks.components.BulkAdd`: in one
  call; else concurrently on remote storages), then the
  messages published with :class:`~qtasks.components.BulkPublish` when the broker has it
  (RabbitMQ: pipelined publishes whose confirms are awaited together), else one by one.

The hooks after the enqueue (``qtasks_storage_added``, ``qtasks_task_enqueued``) fire per task
once its batch is stored, and only when a plugin implements them.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import anyio
import anyio.lowlevel

from qtasks import enqueue as enqueue_step
from qtasks.components import (
    Broker,
    BulkAdd,
    BulkPublish,
    BulkPublishNew,
    Storage,
    forwards,
    provides,
)
from qtasks.errors import QTasksError, TaskArgumentsError
from qtasks.messages import Envelope
from qtasks.record import TaskRecord

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks
    from qtasks.task import AsyncTask
    from qtasks.workflows.canvas import Signature

BATCH = 1000
"""Most tasks stored and published in one call (one Redis script never holds the server for
long; a RabbitMQ batch's confirms are awaited together)."""

_YIELD_EVERY = 100
"""While the items are checked and prepared (nothing in flight yet), the preparation yields to
the loop every this many items, so a long call does not hold up the loop's other tasks (a
worker's lease renewals, say) for its whole length."""


def check_items(items: Any, what: str) -> None:
    """Raise :class:`TaskArgumentsError` unless ``items`` is an iterable of items: a string
    (``task.add_tasks("abc")`` would make three tasks of one letter each), a mapping (its keys)
    or a value that is not iterable (a bare ``TypeError`` otherwise) is refused."""
    if isinstance(items, str | bytes | bytearray | Mapping) or not isinstance(items, Iterable):
        raise TaskArgumentsError(
            f"{what} expects an iterable of items (a list, a generator...), one per task, "
            f"not {type(items).__name__} {items!r:.60}"
        )


def as_args(item: Any) -> tuple[Any, ...]:
    """The positional arguments of one item of ``task.add_tasks(args_list)``: a tuple or list
    is the arguments, anything else the single argument."""
    return tuple(item) if isinstance(item, tuple | list) else (item,)


async def add_tasks(app: AsyncQueueTasks, signatures: Iterable[Signature]) -> list[AsyncTask]:
    """Enqueue every signature (see the module docstring); return their records in order.

    Every item is checked and prepared (:func:`prepare_all`) before anything is stored: one
    bad item, wherever it is, raises and leaves nothing stored or published. Then, on asyncio
    with remote components, up to two batches are in flight: a batch's records are stored while
    the one before waits for its publish (publisher confirms); its messages are published once
    that batch is done, so messages reach the broker, and hooks fire, in batch order."""
    check_items(signatures, "add_tasks")
    prepared = await prepare_all(app, signatures)
    running: list[asyncio.Task[None]] = []  # in batch order, at most two
    # The batches whose enqueue_batch began: it ends their tasks' hooks itself, the others
    # are ended here when the call fails (a task cancelled before it ran began nothing).
    begun: set[int] = set()

    async def stored(start: int, before: asyncio.Task[None] | None) -> None:
        begun.add(start)
        batch = prepared[start : start + BATCH]
        await enqueue_batch(app, batch, None if before is None else _after(before))

    # Only on asyncio (trio has no bare tasks), and not with local components.
    overlap = app.enqueue_path != "sequential" and asyncio._get_running_loop() is not None
    try:
        for start in range(0, len(prepared), BATCH):
            if not overlap:
                await stored(start, None)
                continue
            if len(running) == 2:
                await _ended(running[0])
                running.pop(0)
            before = running[-1] if running else None
            running.append(asyncio.get_running_loop().create_task(stored(start, before)))
        while running:
            await _ended(running[0])
            running.pop(0)
    except BaseException as exc:
        # Cancelled (or interrupted): the batches in flight are cancelled too, and every task
        # prepared gets its hook before the cancel goes on (shielded). An error: a batch
        # behind a failed one fails too (it publishes only after it); let those end, so
        # their hooks fire, then raise the first error.
        cancelled = not isinstance(exc, Exception)
        with anyio.CancelScope(shield=cancelled):
            if running:
                for task in running if cancelled else ():
                    # Once: a second Task.cancel would break into the hooks it fires then
                    # (an anyio shield does not hold a bare task's cancel back).
                    if not task.cancelling():
                        task.cancel()
                await asyncio.wait(running)
            for task in running:
                if not task.cancelled():
                    task.exception()  # retrieved: no "never retrieved" warning
            running.clear()
            # The batches never begun were prepared too (qtasks_task_enqueue applied).
            for start in range(0, len(prepared), BATCH):
                if start not in begun:
                    await notify_failed(app, prepared[start : start + BATCH], exc)
        raise
    finally:
        for task in running:
            task.cancel()
    return [record for record, _ in prepared]


async def prepare_all(
    app: AsyncQueueTasks, signatures: Iterable[Signature]
) -> list[tuple[AsyncTask, Envelope]]:
    """Every item of ``signatures`` (a sequence or any iterable, read once) checked and
    prepared as ``add_task`` prepares one (:func:`qtasks.enqueue.prepare`, in its two halves:
    no coroutine per item unless a plugin implements ``qtasks_task_enqueue``), its record and
    envelope, in order. A bad item (not a signature, arguments that do not fit, a task with a
    unique key, a value the serializer cannot encode, a message too large, a hook that raises)
    raises its error, of the type ``add_task`` would raise, its message starting
    ``add_tasks item <index>: ``.

    Holding all of them costs the encoded bodies on top of the records, which the call returns
    anyway: the price of storing nothing when any item is bad. When an item fails, or the call
    is cancelled, the items prepared before get ``qtasks_task_enqueue_failed``
    (:func:`notify_failed`)."""
    from qtasks.workflows.canvas import Signature  # the package imports this module

    hooked = "qtasks_task_enqueue" in app.hooks.active
    new_message, finish = enqueue_step.new_message, enqueue_step.finish
    prepared: list[tuple[AsyncTask, Envelope]] = []
    append = prepared.append
    index = -1  # the iterable may fail before its first item
    try:
        for index, item in enumerate(signatures):
            if index % _YIELD_EVERY == _YIELD_EVERY - 1:
                await anyio.lowlevel.checkpoint()
            sig = item if type(item) is Signature else _signature(item)
            task, message, eta = new_message(
                app,
                sig.task_name,
                sig.args,
                sig.kwargs,
                sig.priority,
                sig.delay_seconds,
                None,
                None,
                sig.retry,
            )
            if hooked:
                message = await app.hooks.transform(
                    "qtasks_task_enqueue", "message", app=app, message=message
                )
            record, envelope, unique = finish(app, task, message, eta, None)
            if unique is not None:
                raise TaskArgumentsError(
                    f"task {sig.task_name!r} has a unique key: add_tasks cannot claim it "
                    "with a batch; enqueue it with add_task"
                )
            append((record, envelope))
    except BaseException as exc:
        if index == len(prepared) and isinstance(exc, Exception):
            _name_item(exc, index)  # item ``index`` failed (not the iterable, after it)
        # The items before had qtasks_task_enqueue applied: what a plugin began there (a
        # span) ends here, as for a failed batch; on a cancel too, before it goes on.
        await notify_failed(app, prepared, exc)
        raise
    return prepared


def _signature(item: Any) -> Signature:
    """``item`` when it is a signature (of a subclass), else the error ``add_tasks`` raises."""
    from qtasks.workflows.canvas import as_signature  # the package imports this module

    return as_signature(item, "add_tasks", TaskArgumentsError)


def _name_item(exc: Exception, index: int) -> None:
    """Name item ``index`` in ``exc``: a tree error keeps its type (an ``except`` written for
    ``add_task`` catches it), its message (each of the tree's errors holds it as its one
    argument) starting with the item; another error gets a note."""
    if isinstance(exc, QTasksError):
        exc.args = (f"add_tasks item {index}: {exc}", *exc.args[1:])
    else:
        exc.add_note(f"add_tasks item {index}")


def _after(before: asyncio.Task[None]) -> Callable[[], Awaitable[None]]:
    """For a batch in flight behind ``before``: wait for that batch to end; raise its error
    (its messages were not all published, so this batch's must not be either)."""
    return lambda: _ended(before)


async def _ended(task: asyncio.Task[None]) -> None:
    """Wait for ``task`` to end; raise its error. Unlike ``await task``, a cancel of the
    waiter is not passed on to ``task`` (anyio delivers a scope's cancel again and again
    until the waiter has left: each would break into the hooks ``task`` fires then)."""
    await asyncio.wait((task,))
    task.result()


async def enqueue_batch(
    app: AsyncQueueTasks,
    batch: Sequence[tuple[TaskRecord, Envelope]],
    after: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """:func:`store_and_publish_many` (``after`` as there), then the hooks after the enqueue
    of each task (:func:`notify_stored`); when it raises, or is cancelled,
    ``qtasks_task_enqueue_failed`` of each task of the batch, then the error."""
    try:
        await store_and_publish_many(app, batch, after)
    except BaseException as exc:
        await notify_failed(app, batch, exc)
        raise
    await notify_stored(app, [record for record, _ in batch], enqueued=True)


async def notify_failed(
    app: AsyncQueueTasks, tasks: Iterable[tuple[TaskRecord, Any]], exc: BaseException
) -> None:
    """``qtasks_task_enqueue_failed`` of every task of ``tasks`` (``(record, _)`` pairs:
    prepared, not enqueued; the call raises ``exc``), when a plugin implements it; shielded
    from the cancel when ``exc`` is one (any ``BaseException`` that is not an
    ``Exception``), so the hooks still run. ``add_task``, ``add_tasks`` and ``run_workflow``
    all end a failed or cancelled enqueue here."""
    hooks = app.hooks
    if "qtasks_task_enqueue_failed" not in hooks.active:
        return
    with anyio.CancelScope(shield=not isinstance(exc, Exception)):
        for record, _ in tasks:
            await hooks.notify("qtasks_task_enqueue_failed", app=app, record=record, exc=exc)


async def notify_stored(
    app: AsyncQueueTasks, records: Sequence[TaskRecord], *, enqueued: bool
) -> None:
    """``qtasks_storage_added`` of every record just stored and, when ``enqueued`` (its
    message is published too), ``qtasks_task_enqueued``; only the hooks a plugin
    implements."""
    hooks = app.hooks
    added = "qtasks_storage_added" in hooks.active
    enqueued = enqueued and "qtasks_task_enqueued" in hooks.active
    if not (added or enqueued):
        return
    for record in records:
        if added:
            await hooks.notify("qtasks_storage_added", app=app, record=record)
        if enqueued:
            await hooks.notify("qtasks_task_enqueued", app=app, record=record)


async def store_and_publish_many(
    app: AsyncQueueTasks,
    tasks: Sequence[tuple[TaskRecord, Envelope]],
    after: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Store the records of ``tasks`` and publish their messages (one batch); ``await
    after()`` (when given) before anything is published (with a shared server, before
    anything is written: records and messages go in one call, which a
    :class:`~qtasks.components.BulkPublishNew` broker builds before it awaits ``after``, so
    that work overlaps the batch ``after`` waits for)."""
    broker, storage = app.broker, app.storage
    shared = app.shared_server
    if shared is not None:
        if provides(broker, BulkPublishNew):
            bulk = cast(BulkPublishNew, broker)
            if _takes_after(bulk):
                await bulk.publish_new_many(storage, tasks, after=after)
                return
            if after is not None:  # a broker written before ``after`` existed
                await after()
            await bulk.publish_new_many(storage, tasks)
            return
        if after is not None:
            await after()
        for record, envelope in tasks:
            await shared.publish_new(envelope, storage, record)
        return
    await add_many(storage, [record for record, _ in tasks])
    if after is not None:
        await after()
    await publish_many(broker, [envelope for _, envelope in tasks])


_TAKES_AFTER: dict[type, bool] = {}
""":func:`_takes_after` by broker class: its signature is read once per class, not per batch
(but at each batch for a class that forwards with ``__getattr__``: it answers for what it
wraps)."""

_BY_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _takes_after(broker: BulkPublishNew) -> bool:
    """Whether ``broker.publish_new_many`` names the keyword ``after`` (see
    :class:`~qtasks.components.BulkPublishNew`). A ``**kwargs`` alone does not count: it may
    drop ``after`` unawaited, and calling without it is right for either signature."""
    kind = type(broker)
    known = _TAKES_AFTER.get(kind)
    if known is None:
        try:
            param = inspect.signature(broker.publish_new_many).parameters.get("after")
        except (TypeError, ValueError):  # no signature to read: call it the older way
            param = None
        known = param is not None and param.kind in _BY_KEYWORD
        if not forwards(kind):
            _TAKES_AFTER[kind] = known
    return known


async def add_many(storage: Storage, records: Sequence[TaskRecord]) -> None:
    """``storage.add`` of every record: in one call with :class:`BulkAdd`, else one after the
    other on a local storage, concurrently on a remote one."""
    if provides(storage, BulkAdd):
        await cast(BulkAdd, storage).add_many(records)
        return
    if getattr(storage, "local", False) or len(records) < 2:
        for record in records:
            await storage.add(record)
        return
    async with anyio.create_task_group() as tg:
        for record in records:
            tg.start_soon(storage.add, record)


async def publish_many(broker: Broker, envelopes: Sequence[Envelope]) -> None:
    """Publish ``envelopes`` in order: in one call with :class:`BulkPublish`, else one by
    one (the plain default built from :meth:`Broker.publish`)."""
    if not envelopes:
        return
    if provides(broker, BulkPublish):
        await cast(BulkPublish, broker).publish_many(envelopes)
        return
    for envelope in envelopes:
        await broker.publish(envelope)
