"""Flow control: cluster-wide rate limits, concurrency keys, unique tasks and expiry.

The options are declared on the task (``rate_limit``, ``rate_burst``, ``concurrency_key``,
``max_concurrency``, ``expires``, ``unique_key``) or given to ``add_task`` (``expires``,
``unique_key``, ``unique_for``), and checked where they are given. The shared state lives in a
global config with the :class:`~qtasks.components.FlowControl` capability.

What travels with the message, in its headers:

- ``expires``: the unix time after which the task is not started (its record ends
  ``expired``);
- ``flow_at``: the moment a rate token was reserved for this message (see :class:`FlowGate`);
- ``ckey``: the concurrency key, computed by the producer when it knows the task;
- ``unique``: ``[key, holder, unique_for]`` of a unique task, so its worker frees the key when
  the task is final (unless ``unique_for`` is set: the key is then held for ``unique_for``
  seconds from the add, final or not, and no longer, even for a task still pending).

The worker side is :class:`FlowGate`, called before a message is begun, only for messages of
tasks with a flow option or with headers: other tasks pay one attribute test.

Over ~500 lines: flow control's whole core side (options checked at declaration, the
enqueue step's stamps and unique claim, the worker's gate, inspect rows), kept in one place
so its decisions read together; the backends' parts are in their own modules.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import anyio

from qtasks.checks import finite
from qtasks.components import (
    BringForward,
    Delivery,
    FlowControl,
    RateRelease,
    SlotRenewal,
    SlotWake,
    UniquePublish,
    delivery_lease,
    forwards,
    plain_overridden,
    provides,
    requeue_counting,
    takes_keyword,
)
from qtasks.errors import ConfigError, QTasksError, TaskArgumentsError, TaskDeclarationError
from qtasks.messages import Envelope, Message
from qtasks.record import TaskRecord, TaskStatus, record_of

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from qtasks.app import AsyncQueueTasks
    from qtasks.task import TaskDef, TaskOptions
    from qtasks.threads import ThreadCall

log = logging.getLogger("qtasks.flow")

RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
"""Units of a rate string: ``"100/s"``, ``"30/m"``, ``"500/h"`` (also ``"10/5s"``)."""
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d+\.?\d*|\.\d+)?\s*([smh])\s*$")
_FRACTION = re.compile(r"^\s*(\d*\.\d+)\s*/\s*(\d+\.?\d*|\.\d+)?\s*([smh])\s*$")
"""A rate with a fractional count (Celery's ``"0.5/s"``): refused, with the whole-count form."""

MIN_INTERVAL = 1e-6
"""The shortest interval between two calls a rate may give, in seconds: above 1,000,000
calls a second no backend can keep count (Redis measures in µs), so such a rate is refused."""

LEAD = 0.05
"""Seconds before its reserved moment at which a held message is due back from the broker; the
worker waits out the rest itself (a local timer is exact, a broker's delayed delivery is late
by however busy it is). A token due within ``2 * LEAD`` is waited for without a requeue."""

UNIQUE_GRACE = 10.0
"""Seconds during which a unique key whose task has no stored record yet is taken to be
enqueued right now (its record is on its way); past this, the key is taken over."""


@dataclass(slots=True, frozen=True)
class Rate:
    """``count`` calls per ``period`` seconds."""

    count: int
    period: float

    @property
    def interval(self) -> float:
        """Seconds between two calls at the steady rate."""
        return self.period / self.count

    def __str__(self) -> str:
        return f"{self.count}/{self.period:g}s"


def parse_rate(text: str) -> Rate:
    """``"100/s"``, ``"30/m"``, ``"500/h"`` or ``"10/5s"`` as a :class:`Rate`; raises
    :class:`ValueError` saying what is expected."""
    match = _RATE.match(text) if isinstance(text, str) else None
    if match is None:
        hint = ""
        fraction = _FRACTION.match(text) if isinstance(text, str) else None
        if fraction is not None and float(fraction[1]) > 0:
            # One call per (period / count): '0.5/s' is '1/2s', '0.25/m' is '1/4m'.
            every = (float(fraction[2]) if fraction[2] else 1.0) / float(fraction[1])
            hint = f"; the count is whole: write {f'1/{every:g}{fraction[3]}'!r} instead"
        raise ValueError(
            f"expected '<count>/<unit>' with unit s, m or h (e.g. '100/s', '1/2s'), got "
            f"{text!r}{hint}"
        )
    count, amount, unit = int(match[1]), match[2], match[3]
    period = (float(amount) if amount else 1.0) * RATE_UNITS[unit]
    if count <= 0 or period <= 0:
        raise ValueError(f"a rate needs a count and a period above 0, got {text!r}")
    if period / count < MIN_INTERVAL:
        raise ValueError(f"a rate may be at most 1,000,000 calls a second, got {text!r}")
    return Rate(count, period)


def _key_text(value: Any) -> str | None:
    """A concurrency or unique key as a string: str, int or a tuple of them; else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, tuple) and value and all(_key_text(v) is not None for v in value):
        return ":".join(str(_key_text(v)) for v in value)
    return None


@dataclass(slots=True, frozen=True)
class FlowSpec:
    """The flow options of one task, checked (see :func:`flow_spec`)."""

    task: str
    rate: Rate | None
    burst: int
    key: Callable[..., Any] | str | None
    max_concurrency: int | None
    expires: float | None
    unique_key: Callable[..., Any] | None
    unique_for: float | None = None
    """How long an add's unique key is held by default (``add_task(unique_for=...)`` wins)."""
    signature: inspect.Signature | None = None
    """The caller's signature of the task, to find a key argument passed by position."""

    def concurrency_key(self, args: Sequence[Any], kwargs: dict[str, Any]) -> str:
        """The concurrency key of a call; :class:`TaskArgumentsError` when the key function
        fails or gives something that is not a str, an int or a tuple of them."""
        if isinstance(self.key, str):
            value = self._argument(self.key, args, kwargs)
        else:
            assert self.key is not None
            value = _call_key(self.task, "concurrency_key", self.key, args, kwargs)
        text = _key_text(value)
        if text is None:
            raise TaskArgumentsError(_bad_key(self.task, "concurrency_key", value))
        return text

    def _argument(self, name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        """The value of the task's parameter ``name`` in a call (by keyword, by position or
        its default)."""
        if name in kwargs:
            return kwargs[name]
        if self.signature is not None:
            try:
                bound = self.signature.bind_partial(*args, **kwargs)
            except TypeError:
                bound = None
            if bound is not None:
                bound.apply_defaults()
                if name in bound.arguments:
                    return bound.arguments[name]
        raise TaskArgumentsError(
            f"task {self.task!r}: the call passes no argument {name!r} (its concurrency_key)"
        )

    def default_unique_key(self, args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
        """The task-level unique key of a call (``None`` without a key function)."""
        if self.unique_key is None:
            return None
        value = _call_key(self.task, "unique_key", self.unique_key, args, kwargs)
        text = _key_text(value)
        if text is None:
            raise TaskArgumentsError(_bad_key(self.task, "unique_key", value))
        return text


async def _step_input(app: AsyncQueueTasks, message: Message) -> tuple[Any] | None:
    """The input of a workflow step that takes its predecessors' result (the ``INPUT``
    header), as ``(value,)``; ``None`` for another message. Read from storage as the
    executor reads it, so that a concurrency key of that argument is of the value the task
    gets (the run is given it: it is read once). Raises
    :class:`~qtasks.errors.WorkflowInputError` when the input cannot be read."""
    from qtasks.workflows.plan import INPUT
    from qtasks.workflows.runtime import step_input

    if INPUT not in message.headers:
        return None
    return (await step_input(app, message),)


def _call_key(
    task: str, option: str, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]
) -> Any:
    try:
        return func(*args, **kwargs)
    except Exception as exc:
        raise TaskArgumentsError(f"task {task!r}: {option} function failed: {exc!r}") from exc


def _bad_key(task: str, option: str, value: Any) -> str:
    kind = "" if isinstance(value, Hashable) else ", not hashable"
    return (
        f"task {task!r}: {option} gave {value!r} ({type(value).__name__}{kind}); a key must "
        f"be a str, an int or a tuple of them"
    )


def check_options(options: TaskOptions) -> None:
    """Raise :class:`TaskDeclarationError` for bad flow options of a task declaration."""

    def bad(option: str, why: str) -> TaskDeclarationError:
        return TaskDeclarationError(f"task {options.name!r}: option {option} {why}")

    if options.rate_limit is not None:
        try:
            parse_rate(options.rate_limit)
        except ValueError as exc:
            raise bad("rate_limit", str(exc)) from None
    if options.rate_burst is not None:
        if options.rate_limit is None:
            raise bad("rate_burst", "needs rate_limit")
        if not _positive_int(options.rate_burst):
            raise bad("rate_burst", f"expects an int >= 1, got {options.rate_burst!r}")
    if options.max_concurrency is not None:
        if not _positive_int(options.max_concurrency):
            raise bad("max_concurrency", f"expects an int >= 1, got {options.max_concurrency!r}")
        if options.concurrency_key is None:
            raise bad(
                "max_concurrency",
                "needs concurrency_key (a kwarg name or a function of the task's arguments)",
            )
    if options.concurrency_key is not None:
        if not (isinstance(options.concurrency_key, str) or callable(options.concurrency_key)):
            raise bad(
                "concurrency_key",
                f"expects a kwarg name or a callable, got {options.concurrency_key!r}",
            )
        if options.max_concurrency is None:
            raise bad("concurrency_key", "needs max_concurrency")
    if options.expires is not None:
        check_expires(options.expires, f"task {options.name!r}: option expires")
    if options.unique_key is not None and not callable(options.unique_key):
        raise bad(
            "unique_key", f"expects a callable of the task's arguments, got {options.unique_key!r}"
        )
    if options.unique_for is not None:
        check_expires(options.unique_for, f"task {options.name!r}: option unique_for")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_expires(value: Any, what: str, error: type[QTasksError] = TaskDeclarationError) -> float:
    """``value`` as seconds > 0; raises ``error`` otherwise."""
    seconds = finite(value)
    if seconds is None or seconds <= 0:
        raise error(f"{what} expects seconds > 0, got {value!r}")
    return seconds


def flow_spec(options: TaskOptions, signature: inspect.Signature | None = None) -> FlowSpec | None:
    """The checked flow options of a task whose callers use ``signature``, ``None`` when it
    has none (the common case). Raises :class:`TaskDeclarationError` when ``concurrency_key``
    names no parameter of ``signature``."""
    if (
        options.rate_limit is None
        and options.max_concurrency is None
        and options.expires is None
        and options.unique_key is None
        and options.unique_for is None
    ):
        return None
    key = options.concurrency_key
    if isinstance(key, str) and signature is not None:
        params = signature.parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if key not in params and not takes_any:
            raise TaskDeclarationError(
                f"task {options.name!r}: option concurrency_key {key!r} is not a parameter "
                f"of the task ({', '.join(params) or 'it takes none'})"
            )
    return FlowSpec(
        task=options.name,
        rate=None if options.rate_limit is None else parse_rate(options.rate_limit),
        burst=options.rate_burst or 1,
        key=options.concurrency_key,
        max_concurrency=options.max_concurrency,
        expires=options.expires,
        unique_key=options.unique_key,
        unique_for=options.unique_for,
        signature=signature,
    )


def flow_control(app: AsyncQueueTasks, why: str) -> FlowControl:
    """The app's global config as :class:`FlowControl`; :class:`ConfigError` naming ``why``
    when it is not one."""
    gc = app.global_config
    if not provides(gc, FlowControl):  # a wrapper forwarding to one (__getattr__) is one
        raise ConfigError(
            f"{why} needs a global config with flow control (the in-memory or Redis one); "
            f"{type(gc).__name__} has none"
        )
    return gc  # type: ignore[return-value]  # provides() checked it


# --- producer side ---------------------------------------------------------------------------


def prepare(
    app: AsyncQueueTasks,
    task: TaskDef[..., Any] | None,
    message: Message,
    *,
    expires: float | None,
    unique_key: str | None,
    unique_for: float | None,
) -> None:
    """Stamp ``message`` with its flow headers (the unique key is claimed by
    :func:`publish_unique`, with the enqueue step). Raises for bad options before anything is
    written."""
    spec = None if task is None else task.flow
    if expires is not None:
        expires = check_expires(expires, "add_task: expires", TaskArgumentsError)
    elif spec is not None:
        expires = spec.expires
    if unique_for is not None:
        unique_for = check_expires(unique_for, "add_task: unique_for", TaskArgumentsError)
    if unique_key is None and spec is not None:
        unique_key = spec.default_unique_key(message.args, message.kwargs)
    elif unique_key is not None and not isinstance(unique_key, str):
        raise TaskArgumentsError(f"add_task: unique_key expects a str, got {unique_key!r}")
    if unique_key is None and unique_for is not None:
        raise TaskArgumentsError("add_task: unique_for needs a unique_key")
    if unique_key is not None and unique_for is None and spec is not None:
        unique_for = spec.unique_for  # the task's default
    headers = message.headers
    if expires is not None:
        headers["expires"] = message.created_at + expires
    if spec is not None and spec.max_concurrency is not None:
        headers["ckey"] = spec.concurrency_key(message.args, message.kwargs)
    if unique_key is None:
        return None
    flow_control(app, "unique_key")  # a clear error now, not after the message is encoded
    holder = f"{message.uuid}@{message.created_at:.3f}@{'k' if unique_for else ''}"
    headers["unique"] = [f"unique:{unique_key}", holder, unique_for or 0]
    return None


async def publish_unique(
    app: AsyncQueueTasks, record: TaskRecord, envelope: Envelope, message: Message
) -> TaskRecord | None:
    """The enqueue step of a task with a unique key (its ``unique`` header set by
    :func:`prepare`): claim the key and store and publish the task, or return the record of
    the task holding the key. With a :class:`UniquePublish` broker on the global config's
    server both are one atomic round trip; otherwise the key is claimed first and given back
    if the publish fails. A key whose task is over is taken over (compare-and-set)."""
    key, holder, unique_for = message.headers["unique"]
    ttl: float | None = unique_for or None
    gc = app.global_config
    fc = flow_control(app, "unique_key")
    shared = app.shared_server
    folded = cast(UniquePublish, shared) if provides(shared, UniquePublish) else None
    if folded is not None and not folded.shares_server_with_config(gc):
        folded = None
    replace: str | None = None
    for _ in range(3):
        if folded is not None:
            claim = (key, holder, ttl, replace)
            held = await folded.publish_new_unique(envelope, app.storage, record, gc, claim)
        else:
            held = await fc.claim_unique(key, holder, ttl, replace)
            if held is None:
                try:
                    await app._store_and_publish(record, envelope)
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await unclaim(app, message)
                    raise
        if held is None:
            return None
        existing = await _holder_record(app, held, message)
        if existing is not None:
            return existing
        replace = held  # its task is over: take the key over, unless another adder just did
    raise ConfigError(f"unique key {key!r} changed hands three times during one add")


async def _holder_record(app: AsyncQueueTasks, held: str, message: Message) -> TaskRecord | None:
    """The record of the task holding a unique key (``uuid@created_at@k``, ``k`` when
    ``unique_for`` keeps the key after the task is over; its TTL also ends the hold of a task
    still pending), or ``None`` when that task is over and the key may be taken over."""
    uuid, since, keep = [*held.split("@"), "", ""][:3]
    record = await app.storage.get(uuid)
    if record is None:
        if not keep and app.clock() - float(since or 0) > UNIQUE_GRACE:
            return None  # its record is gone (expired): the task is long over
        # Being enqueued right now: its record is on its way.
        return TaskRecord(
            uuid=uuid,
            task_name=message.task_name,
            args=message.args,
            kwargs=message.kwargs,
            priority=message.priority,
            created_at=float(since or 0),
        )
    return None if record.status.final and not keep else record


async def unclaim(app: AsyncQueueTasks, message: Message) -> None:
    """Free the unique key claimed for ``message`` (its publish failed). Never raises: the
    publish's error is the one to report, and a key left behind is taken over by the first
    add after :data:`UNIQUE_GRACE` (its task has no record)."""
    unique = message.headers.get("unique")
    if unique:
        try:
            await flow_control(app, "unique_key").release_unique(unique[0], unique[1])
        except Exception as exc:
            log.warning("could not free unique key %s after a failed add: %s", unique[0], exc)


async def dropped(app: AsyncQueueTasks, record: TaskRecord) -> None:
    """The message of ``record``'s task was dropped from the broker unstarted (cancelled):
    give back the rate token it may hold (a message the worker held for its reserved moment
    holds one; one never taken yet does not, and giving one back for it only moves a later
    reservation earlier, where the start tokens still keep the starts within the rate).
    Without this, the reservations of a cancelled backlog push back every later task."""
    task = app.tasks.get(record.task_name)
    spec = None if task is None else task.flow
    gc = app.global_config
    if spec is not None and spec.rate is not None and provides(gc, RateRelease):
        try:
            await cast(RateRelease, gc).release_rate(f"rate:{spec.task}")
        except Exception as exc:  # the cancel is done; the token is spent at its moment
            log.warning("could not give back the rate token of %s: %s", record.uuid, exc)


# --- worker side -----------------------------------------------------------------------------


class Slot(NamedTuple):
    """A concurrency slot held by this worker: its key, holder and the key's limit."""

    key: str
    holder: str
    limit: int


ADMIT_HEADERS = frozenset({"expires", "unique"})
"""The message headers :meth:`FlowGate.admit` acts on for a task without flow options (the
others it reads, ``ckey`` and ``flow_at``, matter only with them): a message without any of
these, of such a task, skips admission (a traced or workflow message carries other headers)."""


class FlowGate:
    """The flow checks of one worker, before a message is begun, and what it holds meanwhile.

    - **Expiry.** A message past its ``expires`` is not run: its record is saved ``expired``,
      the message acked and ``qtasks_task_expired`` fires.
    - **Rate.** A message of a rate-limited task reserves a token (GCRA). A token within
      ``2 * LEAD`` is waited for here. A later one sends the message back to the broker,
      due ``LEAD`` before the moment, with the moment in its ``flow_at`` header
      (``Delivery.requeue``: not a delivery attempt, the body's ``attempt`` is unchanged);
      when it comes back the worker waits out the rest. Right before the run it takes a
      *start* token of a second GCRA key (``rate:<task>:starts``), waiting up to
      ``2 * LEAD`` for it: the reservations spread the messages out, the start tokens keep
      the starts themselves within the rate however late a message came back (one that is
      far behind reserves again). One reservation, one start token and at most one requeue
      per limited message, whatever the backlog: no herd of retries.
    - **Concurrency.** A message of a task with ``max_concurrency`` takes a slot of its key,
      held by its delivery (``<uuid>/<token>``: an older delivery of the same task, whose
      lease was lost or which is being retried, frees only its own) under a lease the
      worker's lease pass renews, and freed when the task is settled, before a retry or a
      hand-back is requeued. A sync task whose thread runs on after ``max_time`` or a cancel
      gave up on it keeps its slot (renewed) until the thread returns (see :meth:`release`).
      Without a free slot it goes back delayed to about when one frees (see
      :meth:`FlowControl.acquire_slot`); a killed worker's slot frees when its lease ends.
    """

    def __init__(self) -> None:
        self.slots: dict[str, Slot] = {}
        """The slots held by delivery token, for renewal and release."""
        self.lingering: dict[str, Slot] = {}
        """The slots of settled runs whose sync thread still runs, by delivery token."""
        self.over: set[str] = set()
        """The holders whose slot's key was over its limit at its last renewal (logged once)."""
        self.unique: dict[str, list[Any]] = {}
        """The ``unique`` header of running messages, by delivery token."""
        self.aside: TaskGroup | None = None
        """Where the waits for those threads run: the serving worker's task group (``None``
        otherwise: the slot is freed at once, as for any run)."""

    def check(self, app: AsyncQueueTasks) -> None:
        """Raise :class:`ConfigError` if a task needs flow control the global config lacks."""
        for task in app.tasks.values():
            spec = task.flow
            if spec is not None and (spec.rate is not None or spec.max_concurrency is not None):
                flow_control(app, f"task {task.name!r} (rate_limit/max_concurrency)")

    def held(self) -> list[tuple[str, Slot]]:
        """Every slot held now by delivery token, for the lease pass."""
        return [*self.slots.items(), *self.lingering.items()]

    async def admit(
        self,
        app: AsyncQueueTasks,
        task: TaskDef[..., Any],
        message: Message,
        delivery: Delivery,
    ) -> tuple[bool, tuple[Any] | None]:
        """Whether ``message`` may start now (``False``: it was handled here, expired or
        handed back delayed, and the worker is done with ``delivery``), and the workflow
        step's input as ``(value,)`` when a concurrency key of it read it (``None`` else):
        the run is given it (:attr:`~qtasks.executor.TaskRun.step_input`)."""
        headers = message.headers
        read: tuple[Any] | None = None
        now = app.clock()
        expires = headers.get("expires")
        if expires is not None and now >= expires:
            await self._expire(app, message, delivery)
            return False, None
        spec = task.flow
        if spec is not None and (spec.rate is not None or spec.max_concurrency is not None):
            fc = flow_control(app, f"task {task.name!r}")
            if spec.rate is not None:
                if not await self._take_token(app, fc, spec, message, delivery, now, expires):
                    return False, None
                if expires is not None and app.clock() >= expires:  # it waited for its token
                    await self._expire(app, message, delivery)
                    return False, None
            if spec.max_concurrency is not None:
                key = headers.get("ckey")
                if not isinstance(key, str):
                    args = message.args
                    read = await _step_input(app, message)
                    if read is not None:
                        args = [read[0], *args[1:]]
                    key = spec.concurrency_key(args, message.kwargs)
                slot = f"slots:{task.name}:{key}"
                # Held by this delivery, waiting as the task (see FlowControl.acquire_slot).
                holder = f"{message.uuid}/{delivery.token}"
                lease = delivery_lease(app.broker, app.config)  # renewed with the delivery
                if takes_keyword(fc, "acquire_slot", "waiter"):
                    wait = await fc.acquire_slot(
                        slot, spec.max_concurrency, holder, lease, waiter=message.uuid
                    )
                else:
                    wait = await fc.acquire_slot(slot, spec.max_concurrency, holder, lease)
                if wait > 0:
                    # Without its slot the task does not start: a rate token it held is
                    # spent (never exceeding the rate), and reserved again when it returns.
                    headers.pop("flow_at", None)
                    await self._defer(app, message, delivery, wait, expires, now)
                    return False, None
                self.slots[delivery.token] = Slot(slot, holder, spec.max_concurrency)
        unique = headers.get("unique")
        if unique and not unique[2]:
            self.unique[delivery.token] = unique
        return True, read

    async def _take_token(
        self,
        app: AsyncQueueTasks,
        fc: FlowControl,
        spec: FlowSpec,
        message: Message,
        delivery: Delivery,
        now: float,
        expires: float | None,
    ) -> bool:
        """Reserve (or use the reservation of) a rate token, then take a start token right
        before the run; ``False`` when the message was handed back (or expired)."""
        rate = spec.rate
        assert rate is not None
        headers = message.headers
        at = headers.pop("flow_at", None)
        if not isinstance(at, int | float):
            max_wait = None if expires is None else expires - now
            wait = await fc.reserve_rate(f"rate:{spec.task}", rate.interval, spec.burst, max_wait)
            if wait is None:  # no token before it expires
                await self._expire(app, message, delivery)
                return False
            at = now + wait
        if at - now > 2 * LEAD:
            # Back to the broker, due LEAD before its moment (the moment travels with it).
            headers["flow_at"] = at
            await self._defer(app, message, delivery, at - now - LEAD, expires, now)
            return False
        if not await self._wait_until(app, message, delivery, at):
            return False
        # The start token: the reservations spread the messages out; this keeps the starts
        # themselves within the rate however late a message came back.
        wait = await fc.reserve_rate(
            f"rate:{spec.task}:starts", rate.interval, spec.burst, 2 * LEAD
        )
        if wait is None:
            # Far behind (a backlog back at once after an outage): reserve again, and come
            # back then.
            now = app.clock()
            wait = await fc.reserve_rate(f"rate:{spec.task}", rate.interval, spec.burst, None)
            assert wait is not None  # no bound, no refusal
            headers["flow_at"] = now + wait
            await self._defer(app, message, delivery, max(wait - LEAD, 0.0), expires, now)
            return False
        return await self._wait_until(app, message, delivery, app.clock() + wait)

    async def _wait_until(
        self, app: AsyncQueueTasks, message: Message, delivery: Delivery, at: float
    ) -> bool:
        """Wait (holding ``delivery``, at most ``2 * LEAD``) until ``at``; ``True`` then. A
        worker that begins to stop meanwhile hands the message back, due at ``at``."""
        wait = at - app.clock()
        if wait <= 0:
            return True
        sleep_until = app.time_source.sleep_until
        if sleep_until is not None:  # a test's fake clock: moved there, not slept through
            await sleep_until(at)
            return True
        stopping = getattr(app.worker, "stopping", None)
        if stopping is None:
            await anyio.sleep(wait)
            return True
        with anyio.move_on_after(wait):
            await stopping.wait()
            message.headers["flow_at"] = at
            now = app.clock()
            await self._defer(app, message, delivery, at - now, None, now)
            return False
        return True

    async def _defer(
        self,
        app: AsyncQueueTasks,
        message: Message,
        delivery: Delivery,
        wait: float,
        expires: float | None,
        now: float,
        *,
        rewrite: bool = True,
    ) -> None:
        """Hand ``delivery`` back due in ``wait`` seconds (at most until it expires), with the
        message's headers as they are now when ``rewrite``."""
        if expires is not None:
            wait = min(wait, max(expires - now, 0.0))
        begun: TaskRecord | None = getattr(delivery, "begun", None)
        if begun is not None and not begun.status.final:
            # Begun on claim (BeginOnClaim): the task is waiting, not running; the record
            # says so again (fenced: a newer delivery's begin wins).
            begun.status, begun.eta, begun.updated_at = TaskStatus.NEW, now + wait, now
            await app.storage.save(begun, fence=delivery.token)
        body = app.codec.encode(message).body if rewrite else None
        # Not a delivery attempt: the ones lost before it still count (a reset wiped them).
        await requeue_counting(delivery, "earlier", delay=wait, body=body)
        if "qtasks_broker_requeued" in app.hooks.active:
            await app.hooks.notify("qtasks_broker_requeued", app=app, delivery=delivery, delay=wait)

    async def _expire(self, app: AsyncQueueTasks, message: Message, delivery: Delivery) -> None:
        stored = await app.storage.get(message.uuid)
        if stored is not None and stored.status.final:
            await delivery.ack()  # cancelled while queued, or already over
            return
        if stored is None:
            stored = record_of(message)
        record = stored
        record.status = TaskStatus.EXPIRED
        record.error = f"expired: not started by {message.headers.get('expires')}"
        record.updated_at = app.clock()
        record.token = None
        saved = await app.storage.save(record)
        hooks = app.hooks
        if saved and "qtasks_storage_saved" in hooks.active:
            await hooks.notify("qtasks_storage_saved", app=app, record=record)
        if saved and record.workflow is not None:  # before the ack: redelivered if it dies
            from qtasks.workflows import runtime as workflows  # imports this module

            await workflows.member_ended(app, record)
        await delivery.ack()
        if "qtasks_broker_acked" in hooks.active:
            await hooks.notify("qtasks_broker_acked", app=app, record=record)
        unique = message.headers.get("unique")
        if unique and not unique[2]:
            await flow_control(app, "unique_key").release_unique(unique[0], unique[1])
        if saved:
            log.info("task %s (%s) expired before it started", record.uuid, record.task_name)
            await hooks.notify("qtasks_task_expired", app=app, record=record)

    async def hand_back(
        self, app: AsyncQueueTasks, token: str, thread: ThreadCall | None = None
    ) -> None:
        """Free the slot of delivery ``token`` before its message is requeued (a retry, a
        shutdown hand-back): its next delivery may take a slot at once (``thread``: see
        :meth:`release`)."""
        if token in self.slots:
            await self.release(app, token, None, thread)

    async def release(
        self,
        app: AsyncQueueTasks,
        token: str,
        record: TaskRecord | None,
        thread: ThreadCall | None = None,
    ) -> None:
        """After the run of delivery ``token`` is settled: free its slot, and its unique key
        when ``record`` is final (``None``: the delivery was not run; its key is left to the
        next add, which takes it over from a final task). ``thread``: the run's sync call
        given up on while its thread still runs; the slot is freed when the thread returns
        (the unique key goes with the final record all the same)."""
        slot = self.slots.pop(token, None)
        unique = self.unique.pop(token, None)
        if slot is not None and thread is not None and self._linger(app, token, slot, thread):
            slot = None
        try:
            if slot is not None:
                await self._free(app, slot)
            if unique is not None and record is not None and record.status.final:
                await flow_control(app, "unique_key").release_unique(unique[0], unique[1])
        except Exception as exc:  # the lease frees the slot; the next add takes the key over
            log.warning("freeing the flow-control hold of delivery %s failed: %s", token, exc)

    def _linger(self, app: AsyncQueueTasks, token: str, slot: Slot, thread: ThreadCall) -> bool:
        """Keep ``slot`` (renewed) until ``thread`` returns; ``False`` when it returned, or
        when no serving worker can wait for it."""
        aside, done = self.aside, thread.done
        if aside is None or done is None or done.is_set():
            return False
        try:
            aside.start_soon(self._free_when_done, app, token, done)
        except RuntimeError:  # its task group ended (the worker stopped): freed at once
            return False
        self.lingering[token] = slot
        return True

    async def _free_when_done(self, app: AsyncQueueTasks, token: str, done: anyio.Event) -> None:
        try:
            await done.wait()
        except BaseException:
            # The worker stops first: the slot is left to its lease (not renewed from now).
            slot = self.lingering.pop(token)
            log.info(
                "worker stopping: concurrency slot %s of a sync thread still running is left "
                "to its lease",
                slot.holder,
            )
            raise
        slot = self.lingering.pop(token)
        try:
            await self._free(app, slot)
        except Exception as exc:  # its lease frees it
            log.warning("freeing the concurrency slot of delivery %s failed: %s", token, exc)

    async def _free(self, app: AsyncQueueTasks, slot: Slot) -> None:
        """Free ``slot``; with a :class:`SlotWake` global config and a :class:`BringForward`
        broker, bring the key's next waiter forward too, so the slot does not sit idle until
        that waiter's delayed message comes back by itself (one more broker call, only when a
        waiter was woken). A waiter whose message is not delayed on this broker (being handed
        back right now, or on another app's queue) comes back at its own time, as without."""
        fc = flow_control(app, "max_concurrency")
        broker = app.broker
        self.over.discard(slot.holder)
        if not _wakes(fc, broker):
            await fc.release_slot(slot.key, slot.holder)
            return
        waiter = await cast(SlotWake, fc).release_slot_waking(slot.key, slot.holder)  # _wakes
        if waiter is not None:
            try:
                await cast(BringForward, broker).bring_forward(waiter)
            except Exception as exc:  # it comes back at its own time
                log.warning(
                    "could not bring forward the waiter %s of %s: %s", waiter, slot.key, exc
                )

    async def extend(self, app: AsyncQueueTasks) -> None:
        """Renew every held slot's lease (a call of the worker's lease pass). A slot whose
        lease ran out while its run goes on is taken back under the same holder, past the
        limit when others took it meanwhile (see :meth:`FlowControl.extend_slots`)."""
        held = self.held()
        if not held:
            return
        fc = flow_control(app, "max_concurrency")
        slots = [(slot.key, slot.holder) for _, slot in held]
        lease = delivery_lease(app.broker, app.config)
        try:
            if takes_keyword(fc, "extend_slots", "limits"):
                found = await fc.extend_slots(slots, lease, limits=[s.limit for _, s in held])
            else:
                found = await fc.extend_slots(slots, lease)
        except Exception as exc:
            log.warning("renewal of %d concurrency slots failed: %s", len(held), exc)
            return
        for (token, slot), answer in zip(held, found, strict=True):
            renewal = SlotRenewal(int(answer))
            if renewal in (SlotRenewal.TAKEN_BACK, SlotRenewal.OVER_LIMIT) and not (
                token in self.slots or token in self.lingering
            ):
                # Freed while this renewal was on its way, which then took it back: free it.
                try:
                    await self._free(app, slot)
                except Exception as exc:  # its lease frees it
                    log.warning("freeing the concurrency slot %s failed: %s", slot.holder, exc)
                continue
            self._note(slot, renewal)

    def _note(self, slot: Slot, renewal: SlotRenewal) -> None:
        """Log what a renewal did with ``slot`` when it was not a plain renewal, and when its
        key goes over its limit or back within it."""
        if renewal is SlotRenewal.LOST:  # a global config that does not take slots back
            log.warning(
                "concurrency slot %s of delivery %s was lost (lease ran out)", slot.key, slot.holder
            )
        elif renewal is SlotRenewal.TAKEN_BACK:
            log.warning(
                "concurrency slot %s of delivery %s ran out while its run went on (the global "
                "config did not answer within the lease, or lost its keys); taken back",
                slot.key,
                slot.holder,
            )
        if renewal is SlotRenewal.OVER_LIMIT and slot.holder not in self.over:
            self.over.add(slot.holder)
            log.warning(
                "concurrency key %s runs over its max_concurrency=%d: a slot ran out while its "
                "run went on and another run took it meanwhile; no new run of the key starts "
                "until enough of them end (delivery %s holds one)",
                slot.key,
                slot.limit,
                slot.holder,
            )
        elif renewal is not SlotRenewal.OVER_LIMIT and slot.holder in self.over:
            self.over.discard(slot.holder)
            log.info(
                "concurrency key %s is back within its max_concurrency=%d", slot.key, slot.limit
            )


_WAKES: dict[tuple[type, type], bool] = {}
""":func:`_wakes` by the classes of the global config and the broker: the protocol checks
(``isinstance`` of a runtime protocol looks up every member) are made once per pair, not at
every freed slot (not kept when either forwards with ``__getattr__``: a wrapper answers as
what it wraps)."""


def _wakes(flow_control: object, broker: object) -> bool:
    """Whether a freed slot wakes its key's next waiter: a :class:`SlotWake` global config
    that does not override ``release_slot`` below the class giving it ``release_slot_waking``
    (a subclass of a built-in global config counting or auditing its releases keeps its
    override called, see :class:`SlotWake`), and a :class:`BringForward` broker."""
    pair = (type(flow_control), type(broker))
    known = _WAKES.get(pair)
    if known is None:
        known = (
            provides(flow_control, SlotWake)
            and provides(broker, BringForward)
            and not plain_overridden(pair[0], "release_slot", "release_slot_waking")
        )
        if not (forwards(pair[0]) or forwards(pair[1])):
            _WAKES[pair] = known
    return known
