"""The component contracts. Every pluggable part of qtasks is a protocol in this module.

Implementations live elsewhere (``qtasks.memory``, ``qtasks_redis``, ``qtasks_rabbitmq``) and are
found through entry points. The docstrings here are the contract: what an implementation must
guarantee. ``qtasks_testing.contract`` holds the test suites that check it; every backend in this
repository runs them.

Lifecycle. A component is started with ``await component.start(stack, config)``: it connects and
pushes its own teardown onto ``stack`` (an :class:`~contextlib.AsyncExitStack`), so there is no
``stop()`` to forget. The app starts storage, global config, broker, plugins and worker in that
order and unwinds in reverse. Several apps in one process may share one component instance
(a producer app and a worker app, say): ``start`` is reference-counted and the component stops
when the last stack that started it unwinds. A component used before its first start or after
its last stop raises :class:`~qtasks.errors.ComponentNotStartedError`.

Local components. A broker, storage or global config whose calls complete without I/O (the
in-memory ones) sets the class attribute ``local = True``; configuration and the CLI use it to
tell process-local components from shared ones (see :func:`~qtasks.config.follow_broker`). With a
local broker or storage the app keeps the producer's path strictly sequential (the record is
added, then the message published); with remote components (on asyncio) it overlaps the two
round trips instead (see :meth:`Storage.add`): if the add fails after the publish succeeded,
``add_task`` raises, yet the task runs (the worker's :meth:`Storage.begin` creates the missing
record). Components without the attribute count as remote.

Construction from configuration. Components found by name (``broker="redis"``) are built with
``Cls.from_config(config)``, a classmethod that reads the ``*_url`` and other settings of
:class:`~qtasks.config.QueueConfig` (including ``config.extra``). A remote storage or global
config class may set the class attribute ``default_url`` (a string): the address it connects
to without a URL, named in the warning :func:`~qtasks.config.follow_broker` logs then.

Optional members the core reads without a protocol (each read with a default, so a component
without it loses only what is said here): the class attributes ``local`` and ``default_url``
above; ``flush() -> int`` on a broker, storage or global config (delete everything it holds,
return how many items; ``flush_all`` of :mod:`qtasks.compat.admin` refuses a component without
it); ``purge_dead_letters(ids: list[str] | None = None) -> int`` on a broker (delete dead
letters for good, all when ``ids`` is None; return how many: the dashboard's purge, refused
for a broker without it); ``begun`` on the deliveries of a :class:`BeginOnClaim` broker (see
:meth:`BeginOnClaim.consume_begun`). The optional *capabilities* are the protocols
:class:`SharedServer`, :class:`SettleBegin`, :class:`BeginOnClaim`, :class:`BeginMany`,
:class:`AttemptLog`, :class:`FreshWait`, :class:`LeaseBatch`, :class:`CancelCheck`,
:class:`LeaseLength`, :class:`DeliveryLimit`, :class:`CancelFeed`, :class:`CancelFrom`,
:class:`StorageQuery`, :class:`BulkPublish`,
:class:`BulkPublishNew`, :class:`BuryNotice`,
:class:`BulkAdd`, :class:`WorkflowStore`, :class:`FlowControl`, :class:`RateRelease`,
:class:`HeartbeatEnd` and :class:`UniquePublish`,
checked with :func:`provides` (``isinstance``, with a ``__getattr__`` wrapper keeping the
capabilities of what it wraps); ``qtasks_testing.contract.capabilities``,
``qtasks_testing.contract.query``, ``qtasks_testing.contract.bulk``,
``qtasks_testing.contract.flow`` and ``qtasks_testing.contract.global_config`` hold their
suites.

Over ~500 lines on purpose: every contract of the core lives here, in one place, each
protocol with what its implementers must do (one file to read to write a backend).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self, runtime_checkable

from qtasks.config import QueueConfig
from qtasks.errors import InvalidQueryError
from qtasks.messages import Envelope
from qtasks.record import TaskRecord, TaskStatus

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks


@dataclass(slots=True, frozen=True)
class DeadLetter:
    """A message a broker gave up on, with why."""

    id: str
    body: bytes
    reason: str
    priority: int = 0
    deliveries: int = 0
    dead_at: float = 0.0


@dataclass(slots=True)
class BrokerStats:
    """Live figures a broker reports to ``qtasks inspect``."""

    ready_by_priority: dict[int, int] = field(default_factory=dict)
    delayed: int = 0
    in_flight: int = 0
    dead_letters: int = 0


Counting = Literal["reset", "kept", "earlier"]
"""What :meth:`Delivery.requeue` keeps of the message's delivery count (see there)."""


class Delivery(Protocol):
    """One delivery of one message to one worker. Acknowledgement is carried here.

    A delivery is *held* (leased) by the consumer that received it until exactly one of
    :meth:`ack`, :meth:`nack` or :meth:`requeue` is called, or until its lease runs out without
    :meth:`extend`. When the lease runs out (or the consumer's connection dies), the broker makes
    the message deliverable again, to any consumer, with ``attempt`` increased. After
    its delivery limit (:func:`delivery_limit`) the broker dead-letters the message instead of
    delivering it again, with a reason that says the delivery limit was hit.

    ``token`` fences stale holders: once a message was delivered again, calls made through an
    older delivery must not affect it (ack/nack/requeue do nothing and return ``False``;
    :meth:`extend` returns ``False``).
    """

    @property
    def id(self) -> str:
        """The envelope id (the task uuid)."""
        ...

    @property
    def body(self) -> bytes:
        """The encoded message, exactly as published."""
        ...

    @property
    def priority(self) -> int: ...

    @property
    def attempt(self) -> int:
        """1 for the first delivery since the message was published or requeued, then 2, 3..."""
        ...

    @property
    def token(self) -> str:
        """Unique per delivery; stored on the task record to fence result writes."""
        ...

    async def ack(self) -> bool:
        """Remove the message for good. Call only after the task's final record is stored."""
        ...

    async def nack(self, reason: str) -> bool:
        """Give up on the message: move it to the dead-letter queue with ``reason``."""
        ...

    async def requeue(
        self, *, delay: float | None = None, body: bytes | None = None, count: Counting = "reset"
    ) -> bool:
        """Hand the message back, optionally replacing its body, due after ``delay`` seconds.

        ``count`` says what the delivery count (``attempt``, which the delivery limit reads)
        keeps:

        * ``"reset"``: a deliberate requeue (a retry, a component's failure counted in the
          body): the count starts over, the next delivery has ``attempt == 1``.
        * ``"kept"``: a run a stopping worker interrupted: this delivery counts as one not
          settled, the next has ``attempt + 1``; a message that keeps stopping its workers
          reaches the limit and is dead-lettered, as one that keeps killing them does.
        * ``"earlier"``: held and never begun, handed back by a stopping worker: this
          delivery is taken back, the ones before it still count; the next has this
          ``attempt``. A message only waiting is not charged, and a graceful stop does not
          wipe the deliveries lost with earlier holders.

        A broker written before ``count`` existed takes no such keyword: the worker then
        calls it without (a reset).
        """
        ...

    async def extend(self) -> bool:
        """Renew the lease for another lease length (:func:`delivery_lease`); ``False`` if it
        was lost."""
        ...


@runtime_checkable
class Broker(Protocol):
    """Moves task messages from producers to workers.

    Guarantees an implementation must give:

    * **At-least-once.** Once :meth:`publish` returned, the message is delivered until a
      delivery of it is acked, nacked, or it exceeds ``max_deliveries``.
    * **Priorities** across the whole queue: among due messages, a lower ``priority`` number is
      delivered first; FIFO within a priority.
    * **Delays.** An envelope with ``eta`` is not delivered before that time, and becomes
      deliverable promptly after it (no poll interval longer than ~100 ms; better: woken).
    * **Bounded prefetch.** :meth:`consume` never holds more than ``prefetch`` undelivered
      messages on behalf of one consumer.
    * **Dead letters** keep the body and a reason, are listed by :meth:`dead_letters` and can be
      put back with :meth:`requeue_dead_letters`.
    * **Dead-letter retention.** A dead letter is kept ``config.dead_letter_ttl`` seconds and at
      most ``config.max_dead_letters`` per queue (``None``: no limit), the oldest dropped first.
      Enforce both when dead-lettering, with bounded work per message (a poison flood must not
      make one call slow), never on the path of a message that is not dead-lettered. An expired
      dead letter not dropped yet is never listed, counted by :meth:`stats`, requeued or
      purged: filter or drop on read too.
    * Bad input from the outside (bytes that are not a message) is delivered like any other
      message: deciding that it is poison is the worker's job (it nacks it with a reason).
    * **Suspects alone.** A message on one of its last two allowed deliveries
      (``attempt >= alone_from(limit)``, see :func:`alone_from`: its earlier deliveries were
      lost with their holders, crashes or leases run out) is a suspect: it is never taken
      together with other messages (a broker that receives messages ahead of the worker, as
      RabbitMQ's prefetch does, hands back uncounted what it holds beside it, and receives
      nothing more), and its consumer takes nothing more until it is settled or lost. A task
      that kills its worker at every run then dies alone on its last deliveries, and the
      messages lost beside it on the earlier ones run theirs alone too, instead of following
      it to the dead-letter queue; a delivery lost once (a worker killed by a deploy) costs
      nothing more. A message a consumer took but never handed out is handed back uncounted.
    """

    async def start(self, stack: AsyncExitStack, config: QueueConfig) -> None:
        """Connect, and register teardown on ``stack``."""
        ...

    async def publish(self, envelope: Envelope) -> None:
        """Store the message durably (as durable as the backend is) before returning."""
        ...

    def consume(self, *, prefetch: int) -> AbstractAsyncContextManager[AsyncIterator[Delivery]]:
        """Open a consumer. Iterating yields deliveries as they become due, blocking (not
        polling) while there are none. When the context exits, messages delivered to it and
        not yet settled are handed back at once.

        **Demand** (optional). A broker whose ``consume`` (and ``consume_noticing``,
        ``consume_begun``) also takes the keyword ``wanted: Callable[[], int]`` is given it
        when the worker adapts its prefetch (:mod:`qtasks.hold`): ``wanted()`` is how many
        messages the worker would take now (its free slots, and what it holds beyond them);
        the consumer then holds at most ``min(prefetch, wanted())`` undelivered messages
        (none when it is 0 or less), asked again before each claim (or each change of what it
        lets the server push); a claim the worker asks for takes at least one. A broker
        without the keyword is given none and keeps ``prefetch``."""
        ...

    async def cancel(self, id: str) -> bool:
        """Drop a message that is queued or delayed and not yet delivered; ``True`` if it was."""
        ...

    async def stats(self) -> BrokerStats: ...

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters."""
        ...

    async def requeue_dead_letters(self, ids: list[str] | None = None) -> int:
        """Publish dead letters again (all of them when ``ids`` is None); return how many."""
        ...


@runtime_checkable
class SharedServer(Protocol):
    """Optional broker capability: fold storage writes into the broker's round trips when the
    app's storage lives on the same server (e.g. Redis broker and Redis storage on one
    instance). The app checks it once at start; everything else goes through the plain
    protocols, so a broker without it loses nothing but a round trip.
    """

    def shares_server_with(self, storage: Storage) -> bool:
        """Whether :meth:`publish_new` and :meth:`ack_final` may be used with ``storage``."""
        ...

    async def publish_new(self, envelope: Envelope, storage: Storage, record: TaskRecord) -> None:
        """Exactly ``await storage.add(record)`` then ``await self.publish(envelope)``, in that
        order, in one round trip."""
        ...

    async def ack_final(
        self,
        delivery: Delivery,
        storage: Storage,
        record: TaskRecord,
        *,
        enqueued: list[str] | None = None,
    ) -> bool:
        """Exactly ``await storage.save(record, fence=delivery.token)`` followed, when that
        was accepted or refused only because the stored record is final (the task is over,
        e.g. cancelled while it ran), by ``await delivery.ack()``, in one round trip. Returns
        whether the save was accepted.

        For a workflow member (``record.workflow`` set, the storage a :class:`WorkflowStore`),
        an accepted save is followed in the same atomic step by
        :meth:`WorkflowStore.member_done` and the publish of the messages it returns: "step
        done" and "next step enqueued" are one change. When ``enqueued`` is given (the core
        passes it only for a workflow member, and only when a plugin implements
        ``qtasks_task_enqueued``), the ids of the messages so published are appended to it
        before the call returns, so the core fires that hook for them."""
        ...

    async def ack_finals(
        self,
        storage: Storage,
        finals: Sequence[tuple[Delivery, TaskRecord]],
        *,
        enqueued: list[str] | None = None,
    ) -> list[bool]:
        """:meth:`ack_final` of every ``(delivery, record)`` pair, in order, in one round trip
        (each pair atomic on its own); the i-th result says whether the i-th save was
        accepted; ``enqueued`` as for :meth:`ack_final`. The worker settles the tasks that
        finish while a call is in flight with the next call, so a busy worker makes one call
        per batch instead of one per task."""
        ...


@runtime_checkable
class SettleBegin(Protocol):
    """Optional capability of a :class:`SharedServer` broker: settle the tasks that finished
    and begin the records of the tasks about to start in one round trip. A busy worker's
    runner settles one task and starts the next in the same moment; with this capability the
    two ride in one call (Redis: one script) instead of two.
    """

    async def ack_finals_begin(
        self,
        storage: Storage,
        finals: Sequence[tuple[Delivery, TaskRecord]],
        begins: Sequence[TaskRecord],
        *,
        enqueued: list[str] | None = None,
    ) -> tuple[list[bool], list[TaskRecord | None]]:
        """Exactly ``await self.ack_finals(storage, finals, enqueued=enqueued)`` followed by
        :meth:`Storage.begin` of each record of ``begins`` (publish generation 0) in order, in
        one round trip (either list may be empty). Returns what ``ack_finals`` returns and,
        per record of ``begins``, the record as ``begin`` returned it, or ``None`` where the
        call could not return it (no record stored, or a stored record that cannot be read):
        the caller then begins that one with :meth:`Storage.begin`, which for the same claim
        changes nothing more and raises what ``begin`` raises. A claim whose delivery the
        broker no longer holds under the claim's token (its lease ran out and another
        delivery holds the message) is not begun: its stored record is returned unchanged, its
        token not the claim's, and the worker drops that delivery unstarted, so that the
        record stays with the delivery that runs the task."""
        ...


@runtime_checkable
class BulkPublish(Protocol):
    """Optional broker capability: publish many messages in one round trip (or one per
    batch of a size the backend chooses), for ``app.add_tasks`` and workflows. Without it the
    core publishes them one by one (:func:`qtasks.bulk.publish_many`)."""

    async def publish_many(self, envelopes: Sequence[Envelope]) -> None:
        """Exactly :meth:`Broker.publish` of every envelope, in order: each is durable before
        this returns. When it raises, any prefix of them (none, some, all) may be published,
        as with a publish that failed after the broker took it."""
        ...


@runtime_checkable
class BulkPublishNew(Protocol):
    """Optional capability of a :class:`SharedServer` broker: :meth:`SharedServer.publish_new`
    of many tasks in one round trip (or one per batch). Used only with a storage the broker
    :meth:`~SharedServer.shares_server_with`."""

    async def publish_new_many(
        self,
        storage: Storage,
        tasks: Sequence[tuple[TaskRecord, Envelope]],
        *,
        after: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Exactly ``publish_new(envelope, storage, record)`` of every pair, in order (each
        pair atomic on its own).

        ``after``, when given, is awaited exactly once (``tasks`` empty too), before anything
        of ``tasks`` is written; when it raises, nothing is written and its error propagates.
        Do the work that needs no server (encoding the records, building and packing the
        call) before awaiting it: ``app.add_tasks`` passes the wait for the batch before, so
        that work overlaps the server's.

        ``after`` came later (``publish_new_many(storage, tasks)`` before): a broker written
        to that signature keeps working. The core reads once per broker class whether the
        method names an ``after`` parameter (a ``**kwargs`` alone does not count); when it
        does not, the core awaits ``after`` itself, then calls the method without it (no
        overlap, same order and outcome)."""
        ...


@runtime_checkable
class BulkAdd(Protocol):
    """Optional storage capability: :meth:`Storage.add` of many records in one round trip
    (or one per batch), for ``app.add_tasks`` when the broker does not share its server."""

    async def add_many(self, records: Sequence[TaskRecord]) -> None:
        """Exactly ``add(record)`` (replacing) of every record, in order."""
        ...


@runtime_checkable
class WorkflowStore(Protocol):
    """Optional storage capability: the state of workflows (:mod:`qtasks.workflows`), kept
    next to their members' records. Workflows need it; ``app.run_workflow`` refuses a storage
    without it.

    A workflow is a set of member tasks and *gates*. Each gate has a counter (how many members
    must succeed before it opens) and the messages it publishes when it opens; each member
    feeds at most one gate. The gate named ``"final"`` publishes nothing: when it opens, the
    workflow record turns ``success``. The gate named ``"error"`` (counter 1) opens when a
    member fails: the workflow record turns ``error``, every other member whose record is not
    final turns ``cancel``, and its messages (an error callback) are published.

    The workflow record is a task record whose uuid is the workflow id (``task_name``
    ``"qtasks.workflow"``); it is stored, waited for and cancelled like any record.

    A member's final record lives as long as its workflow needs it (a later step and the
    workflow's result read it): while the workflow runs it does not expire, whatever
    ``result_ttl`` says; once the workflow ended (its final or error gate opened, or
    :meth:`cancel_workflow`), the records of the members that feed a gate expire
    ``result_ttl`` from then. A record that turns final after its workflow ended (the error
    callback's, say) expires as any.
    """

    async def add_workflow(
        self,
        workflow: TaskRecord,
        members: Sequence[TaskRecord],
        gates: dict[str, tuple[int, list[GateMessage]]],
        feeds: dict[str, str],
    ) -> None:
        """Store the workflow record, the records of ``members`` (replacing: the members that
        wait in a gate; the caller stores the others with their messages), the gates (name ->
        (counter, messages)) and which gate each member feeds (uuid -> gate name; every member
        but the error callback feeds one), before any member's message is published."""
        ...

    async def member_done(self, record: TaskRecord) -> list[GateMessage]:
        """The final ``record`` (already stored) of a member of ``record.workflow`` arrived:
        atomically, once per member (a set of settled members makes a repeated call change
        nothing), and only while the workflow record is not final: a success decrements the
        counter of the gate it feeds and opens the gate at zero; an ``error`` or ``cancel``
        opens the ``"error"`` gate, with an error naming the member. Returns the messages of
        the gate this member opened; a repeated call by the member that opened a gate returns
        them again (a worker that died before publishing them publishes them on redelivery).
        """
        ...

    async def republish(self, uuids: Sequence[str]) -> list[int]:
        """Before the messages of a gate are published a second time (by the redelivered
        member that opened it, see :meth:`member_done`): for each uuid whose stored record
        is still ``new``, increase its *publish generation* by one and return the new value;
        return 0 for every other uuid (the step began, ended, or its record is gone: its
        message reached a worker, it is not published again). The check and the increase
        are one atomic step per record (a Redis script; in memory, no await between them),
        so a record is never begun between them.

        The caller publishes each message whose generation is not 0 with it in the header
        :data:`qtasks.workflows.plan.GENERATION`; a record's generation is 0 until this is
        called, and a first publish carries no header. The generation is kept with the
        record by every write but this one, and goes with it; :meth:`Storage.begin` refuses
        a copy of an older generation, so of the copies of a step only the one published
        last can run, and a step that began is never published again."""
        ...

    async def get_many(self, uuids: Sequence[str]) -> list[TaskRecord | None]:
        """:meth:`Storage.get` of every uuid, in one round trip (or one per batch)."""
        ...

    async def cancel_workflow(self, workflow: str, reason: str) -> TaskRecord | None:
        """:meth:`Storage.cancel` of the workflow record ``workflow``, then, when that left it
        ``cancel``, delete its gates, counters and member lists: nothing a continuation would
        read is kept. A member that ends later finds the record final: :meth:`member_done`
        returns ``[]`` and writes nothing (no state of the workflow is created again).
        Returns what :meth:`Storage.cancel` returns."""
        ...

    async def workflows(self, limit: int = 20) -> list[TaskRecord]:
        """The records of the newest ``limit`` workflows still stored (running or ended), by
        ``created_at``, newest first, for ``qtasks inspect``. Costs a bounded number of round
        trips whatever the number of workflows; workflows whose record expired are skipped
        (and may be forgotten on the way)."""
        ...


@dataclass(slots=True, frozen=True)
class GateMessage:
    """A message a workflow gate publishes when it opens: ``delay`` seconds counted from
    then."""

    id: str
    body: bytes
    priority: int = 0
    delay: float = 0.0


@runtime_checkable
class FailedMember(Protocol):
    """Optional :class:`WorkflowStore` capability, added after it (a store without it still
    keeps workflows; their state then has no ``failed_member``): which member failed a
    workflow."""

    async def failed_member(self, workflow: str) -> str | None:
        """The uuid of the member whose failure ended ``workflow`` (the one that opened its
        ``error`` gate in :meth:`WorkflowStore.member_done`), kept as long as the workflow's
        record; ``None`` when none did (running, succeeded or cancelled)."""
        ...


@runtime_checkable
class LeaseBatch(Protocol):
    """Optional broker capability: renew the leases of many deliveries in one round trip, so a
    worker's renewal pass costs the same with 1 or 500 tasks held (a worker without it renews
    its deliveries concurrently, one call each)."""

    async def extend_many(self, deliveries: Sequence[Delivery]) -> list[bool]:
        """:meth:`Delivery.extend` of every delivery (all received from this broker), in one
        round trip; the i-th result says whether the i-th lease was renewed."""
        ...


@runtime_checkable
class LeaseDeadline(Protocol):
    """Optional delivery capability: the delivery tells until when its lease surely holds, so
    the worker begins a task fenced by the lease without a call to the broker.

    Without it, the worker renews a delivery (:meth:`Delivery.extend`) before it begins its
    task (a round trip for a remote broker): a delivery another worker took over meanwhile
    must not begin, and no storage knows the broker's leases."""

    @property
    def held_until(self) -> float:
        """A ``time.monotonic()`` time before which no other delivery of this message can be
        handed out: the lease counted from when the call that last took or renewed it (the
        claim, :meth:`Delivery.extend`, :meth:`LeaseBatch.extend_many`) was sent, not from its
        reply. Never later than the broker's own deadline; it may be earlier."""
        ...


@runtime_checkable
class LeaseLength(Protocol):
    """Optional broker capability: the broker tells how long its deliveries are held. A
    broker with a lease of its own (a ``lease=`` option of its constructor) must have it:
    the worker renews what it holds every third of this lease, and without it the core
    assumes ``config.lease`` (see :func:`delivery_lease`)."""

    @property
    def lease(self) -> float:
        """Seconds a delivery stays held without :meth:`Delivery.extend`, as fixed by the
        broker's last :meth:`Broker.start`: its own option when set, else ``config.lease``."""
        ...


_PROVIDES: dict[tuple[type, type], bool] = {}
""":func:`provides` by (class, capability), for classes that forward nothing."""


def forwards(kind: type) -> bool:
    """Whether instances of ``kind`` forward the attributes it does not define
    (``__getattr__``): what such an instance has depends on what it wraps, so nothing read
    from it is kept per class."""
    return getattr(kind, "__getattr__", None) is not None


def provides(component: object, capability: type) -> bool:
    """Whether ``component`` has the optional ``capability`` (a runtime-checkable protocol of
    this module): ``isinstance(component, capability)`` with Python 3.11's answer on every
    version. The core checks every capability with it.

    A wrapper that forwards with ``__getattr__`` (as instrumentation wrappers do) keeps the
    capabilities of what it wraps: it provides ``capability`` when every member of it is
    found on it, forwarded or not, as 3.11's ``isinstance`` said; Python 3.12 made
    ``isinstance`` look members up statically (``inspect.getattr_static``), which does not
    see forwarded ones. A wrapper around a component without the capability does not
    provide it (reading a missing member raises ``AttributeError``), nor does one whose
    method member reads as ``None``.

    Decided once per class, except for a class with ``__getattr__`` (one wrapper class may
    wrap components with and without it): on Python 3.11 a runtime-checkable protocol's
    ``isinstance`` walks its members at every call, microseconds that :func:`delivery_limit`
    would pay on every settle."""
    kind = type(component)
    key = (kind, capability)
    found = _PROVIDES.get(key)
    if found is None:
        found = isinstance(component, capability)
        if forwards(kind):
            return found or _forwarded(component, capability)
        _PROVIDES[key] = found
    return found


def _forwarded(component: object, capability: type) -> bool:
    """Python 3.11's ``isinstance(component, capability)`` on Python 3.12+, where it looks
    members up statically: every member found by ``getattr``, a method one not ``None``."""
    members = getattr(capability, "__protocol_attrs__", None)
    if members is None:  # Python 3.11: isinstance looked them up this way already
        return False
    for name in members:
        try:
            value = getattr(component, name)
        except AttributeError:
            return False
        if value is None and callable(getattr(capability, name, None)):
            return False
    return True


def delivery_lease(broker: object, config: QueueConfig) -> float:
    """The lease of ``broker``'s deliveries: its :class:`LeaseLength`, else ``config.lease``.
    The worker's renewal pass and the concurrency slots it renews are timed by it."""
    return broker.lease if provides(broker, LeaseLength) else config.lease  # type: ignore[attr-defined]


@runtime_checkable
class DeliveryLimit(Protocol):
    """Optional broker capability: the broker tells after how many deliveries it dead-letters
    a message. A broker with a limit of its own (a ``max_deliveries=`` option of its
    constructor) must have it: the worker decides by it whether a delivery whose lease ran
    out was the last one (its record then says dead-lettered) and how many failures of a
    component dead-letter a message (:mod:`qtasks.poison`); without it the core assumes
    ``config.max_deliveries`` (see :func:`delivery_limit`)."""

    @property
    def max_deliveries(self) -> int:
        """Deliveries of one message before the broker dead-letters it, as fixed by the
        broker's last :meth:`Broker.start`: its own option when set, else
        ``config.max_deliveries``."""
        ...


def alone_from(limit: int) -> int:
    """The first delivery of a message that a broker with delivery limit ``limit`` hands out
    alone (the Broker protocol's "Suspects alone"): its last two allowed deliveries, never
    its first. From the second when ``limit`` is 2 or 3, so that a message lost once is kept
    apart before its last delivery; later with a larger limit, so that the deliveries lost
    to one crash (a deploy, a node gone) come back claimed as usual."""
    return max(2, limit - 1)


def delivery_limit(broker: object, config: QueueConfig) -> int:
    """The delivery limit of ``broker``: its :class:`DeliveryLimit`, else
    ``config.max_deliveries``."""
    if provides(broker, DeliveryLimit):
        limit: int = broker.max_deliveries  # type: ignore[attr-defined]
        return limit
    return config.max_deliveries


Buried = Callable[[str, str], Awaitable[bool | None]]
"""Called with a message's id and the reason of its dead letter (see :class:`BuryNotice`);
returns False when the notice could not be dealt with (its record not written)."""

Ended = Callable[[TaskRecord], Awaitable[None]]
"""Called with a record a claim ended because it dead-lettered the record's message (see
:meth:`BeginOnClaim.consume_begun`)."""


@runtime_checkable
class BuryNotice(Protocol):
    """Optional broker capability: tell the consuming worker about the messages the broker
    dead-letters on its own (past ``max_deliveries``, when it claims or receives them), so
    the worker ends their records. Without it a task whose every delivery was lost (its
    worker killed each time) keeps the status ``process`` for ever; a :class:`BeginOnClaim`
    broker ends such records itself and the worker uses this only without that."""

    def consume_noticing(
        self, *, prefetch: int, buried: Buried
    ) -> AbstractAsyncContextManager[AsyncIterator[Delivery]]:
        """Exactly :meth:`Broker.consume`, except that ``await buried(id, reason)`` is
        called for every message this consumer dead-letters itself past
        ``max_deliveries``, with the reason its dead letter has, before the consumer goes on
        (once per dead letter by this consumer, not for a :meth:`Delivery.nack`).
        Dead-lettered while the consumer is being closed, it is called before the context
        exits. ``buried`` must not raise.

        A broker may keep each notice until ``buried`` returned for it, so that one whose
        consumer died first (killed, or closed with a claim's reply unread) is told by a
        consumer that starts later (the Redis broker does, see docs/redis.md): ``buried`` must
        then be safe to call again, and at once from two consumers, for the same id
        (:func:`qtasks.poison.buried` is: the record ends once, the hook fires once). Every
        noticing broker keeps a notice for which ``buried`` returns False (its record could
        not be written: the storage failed) and tells it again later, on its own, backing off to
        a bound of seconds (not in a loop that hammers the storage), without holding its
        deliveries back; None or True: dealt with. What a consumer that closes does with a
        notice still untold is the broker's to say (in its docs)."""
        ...


@runtime_checkable
class ConsumeHealth(Protocol):
    """Optional :class:`Broker` capability: whether its consumers still hear from the server,
    for the worker's health probe (``/livez``, ``/readyz``: :mod:`qtasks.health`) and its
    heartbeat. Without it the probe cannot tell a worker that is alive but no longer
    consuming (a connection that hangs, a consumer the server dropped) from an idle one."""

    def consume_stalled(self) -> float:
        """Seconds the most stalled consumer of this broker has been trying to receive
        without the server answering: a fetch outstanding past the wait it asked the server
        for (a polling broker's own bounded wait for messages does not count, only what comes
        after it, beyond a round trip's grace: an idle, healthy consumer stays at ``0.0``),
        retried through an outage, or a push consumer whose channel is down and not open
        again yet. ``0.0`` when every consumer is answered or within its wait, waits on
        purpose (a suspect kept apart, nothing asked for while the worker's slots are busy),
        or none consumes. Called on the event loop: it must neither block nor call the
        server."""
        ...


@runtime_checkable
class CancelCheck(Protocol):
    """Optional storage capability: find which of many records are cancelled in one round
    trip (the worker's safety net for cancels its :class:`CancelFeed` missed)."""

    async def cancelled(self, uuids: Sequence[str]) -> dict[str, str]:
        """The reason of each of ``uuids`` whose stored status is ``cancel``, by uuid."""
        ...


@runtime_checkable
class BeginOnClaim(Protocol):
    """Optional capability of a :class:`SharedServer` broker: begin the records of the
    messages it hands out in the same round trip that claims them, so a worker makes one call
    per message less. Used by the worker only together with :class:`SharedServer` (the
    broker shares a server with the app's storage).
    """

    def consume_begun(
        self,
        *,
        prefetch: int,
        storage: Storage,
        worker: str,
        starts: Callable[[], int],
        published: Callable[[Sequence[str]], None] | None = None,
        ended: Ended | None = None,
    ) -> AbstractAsyncContextManager[AsyncIterator[Delivery]]:
        """Exactly :meth:`Broker.consume`, except that every delivery has one more
        attribute, ``begun``. At each claim the broker asks ``starts()`` how many of the
        messages it claims will start at once (runners free with nothing waiting before them)
        and begins, in the same round trip, the records of that many of them, first claimed
        first: their ``begun`` is the stored record as :meth:`Storage.begin` would return it
        for this delivery (status ``process``, the delivery's ``token``, ``worker``; unchanged
        if final; the stored ``attempt`` is the body's ``attempt`` + 1 when the body is JSON,
        else left). The records of the others are not touched (still queued) and their
        ``begun`` is ``None``, as when the storage holds no record: the worker begins them
        when they start. A claim whose deliveries the consumer never hands out (it is closed
        meanwhile: the worker stops) puts their begun records back to ``new`` (fenced by the
        delivery's token, worker cleared) as the consumer hands the messages back; the
        worker does the same for those it was handed and did not start.

        So a task begun with its claim has started as far as the storage knows, and a cancel
        made after the claim cancels a running task; a task that waits in the worker stays
        queued in storage, and a cancel made while it waits is seen when it would start: it
        never runs. Decided by the stored state, with no time window.

        A claim does not check publish generations (:meth:`Storage.begin`'s
        ``generation``): such a broker must replace a message published again under the same
        id, even a delivered one, so the copy it claims is always the one published last (a
        delivery of the older copy still held by a worker is begun by the worker, which
        checks).

        A message the claim dead-letters (past ``max_deliveries``) has its record, unless
        final, stored as ``error`` with the error ``"dead-lettered: <the dead letter's
        reason>"`` and the token ``"dead-letter"``, its waiters woken: a task whose every
        delivery was lost (its worker killed each time) ends, rather than staying ``process``.
        ``ended``, when given, is then awaited with each record a claim so ended, as the claim
        stored it, once (also when a claim whose reply was lost is made again: the repeat
        carries the records its first run ended), before the consumer goes on (the worker fires
        ``qtasks_task_dead_lettered``); not for a message without a record nor one whose
        record was final already (its last worker ended it, and fired the hook). Ended by a
        claim made while the consumer is being closed, it is awaited before the context
        exits. ``ended`` must not raise. (A broker written before ``ended`` existed, without
        the parameter, is called without it.)

        A claim may publish messages itself: a workflow member it dead-letters fails its
        workflow, whose error callback is published in the same round trip. ``published``,
        when given, is called with their ids right after that claim (the worker fires
        ``qtasks_task_enqueued`` for them)."""
        ...


@runtime_checkable
class Storage(Protocol):
    """Keeps task records and results, and wakes those waiting for them.

    Guarantees:

    * :meth:`save` with ``fence`` writes only while the stored record's ``token`` equals the
      fence (or the stored record has no token), so a worker that lost its lease cannot
      overwrite a newer attempt's result; it returns ``False`` when refused.
    * Final is final: a record whose stored status is final (``success``, ``error``,
      ``cancel``, ``expired``) is never overwritten by :meth:`save` with another status,
      fenced or not (``False``). A cancel made while the task ran therefore stays a cancel
      when the task's result comes in; only :meth:`add` (a deliberate reset) replaces a final
      record.
    * :meth:`wait` returns as soon as a final record is saved (woken, not polled) and raises
      :class:`~qtasks.errors.TaskTimeoutError` at the deadline.
    * Generator steps appended with :meth:`add_step` are readable in order by :meth:`steps`
      within milliseconds, which follows them live until the record is final.
    * :meth:`add_step` with ``fence`` is fenced as :meth:`save` is (refused, ``None``, unless
      the stored record's ``token`` is the fence or it has none), so a run whose lease was
      lost cannot add steps to a newer run's stream; and it marks where a new run starts
      over (:class:`~qtasks.steps.StepsRestarted`), in the same atomic write.
    * Final records expire after ``config.result_ttl`` seconds (when set). A record's steps
      are kept exactly as long as the record: never expired while it is kept (not final, no
      ``result_ttl``, or kept longer, e.g. a running workflow's member).
    """

    async def start(self, stack: AsyncExitStack, config: QueueConfig) -> None: ...

    async def add(self, record: TaskRecord, *, replace: bool = True) -> None:
        """Store ``record``. With ``replace`` (the default), unconditionally, replacing any
        stored one whole, its steps (:meth:`add_step`) and what an :class:`AttemptLog` kept of
        it too: deliberate resets (requeueing a dead letter). With ``replace=False``, only
        when no record of that uuid is stored, atomically (a stored record, and its expiry,
        stay as they are): a new task's record, written while its message is already
        published, so a worker that got there first (:meth:`begin` creates the record) is
        never set back."""
        ...

    async def get(self, uuid: str) -> TaskRecord | None: ...

    async def begin(self, record: TaskRecord, *, generation: int = 0) -> TaskRecord:
        """Atomically mark a task started by one delivery; return the stored record.

        ``record`` holds the message's fields and the new attempt's ``status`` (``process``),
        ``attempt``, ``token`` and ``worker``. If the stored record is final (cancelled while
        queued, or finished by an attempt whose ack was lost), return it unchanged and write
        nothing. Otherwise write the new attempt's status, attempt, token, worker and a fresh
        ``updated_at`` over the stored record (keeping its other fields), or store ``record``
        when there is none, and return what is stored. One round trip for remote backends.

        ``generation`` is the publish generation the delivered message carries (its header
        :data:`qtasks.workflows.plan.GENERATION`, 0 without it). When the stored record's
        generation (see :meth:`WorkflowStore.republish`) is greater, the delivery is a stale
        copy of a workflow step that was published again: return the stored record
        unchanged and write nothing, as for a final one (its ``token`` is then not the
        claim's; the worker acks the copy without running it). Checked atomically with the
        begin, so a copy begins only while no later one was published. A storage that is no
        :class:`WorkflowStore` keeps no generations (every record's is 0) and may ignore it;
        the worker passes it only when it is not 0.
        """
        ...

    async def save(self, record: TaskRecord, *, fence: str | None = None) -> bool:
        """Write ``record`` whole. See the class docstring for fencing; wakes waiters when the
        status is final."""
        ...

    async def cancel(self, uuid: str, reason: str) -> TaskRecord | None:
        """Atomically mark a not-yet-final record ``cancel`` (whatever its status: ``new``,
        ``process`` or ``retry``) and wake its waiters; return the stored record (final
        records are returned unchanged), ``None`` when unknown. A storage that is also a
        :class:`CancelFeed` tells the workers when the record was ``process``."""
        ...

    async def wait(self, uuid: str, timeout: float | None) -> TaskRecord:
        """Block until the record is final; return it."""
        ...

    async def add_step(self, uuid: str, value: Any, *, fence: str | None = None) -> int | None:
        """Append one generator step (JSON-like) to the stream of ``uuid``; return its index
        among the task's steps (0-based: the stored record's ``steps`` is then index + 1).

        ``fence`` is the token of the delivery whose run yielded the step (the worker always
        passes it). Atomically with the append:

        * Refused, returning ``None`` and storing nothing, fenced or not, when no record of
          ``uuid`` is stored (a stream beside no record would be read by nobody and kept for
          ever: nothing expires or deletes it), or when the stored record is final (final is
          final: a late step, e.g. of a run cancelled as it yielded, changes neither the
          record's ``steps`` nor the stream).
        * Refused too, with ``fence``, when the stored record's ``token`` is another one (a
          newer delivery began the task: this run's lease was lost). A record with no token
          accepts it, as :meth:`save` does.
        * When steps are stored already and the last one fenced was not this fence's (or none
          was fenced: steps stored before fences existed), a new run starts over: a
          :class:`~qtasks.steps.StepsRestarted` marker, ``run`` = 1 + how many such markers
          the stream holds, is stored right before the step.

        Without ``fence`` (a caller that is no worker's run; a storage written before fences
        existed is called so), the token is not checked and nothing is marked. A call made
        again after its reply was lost must not append twice, for a remote backend."""
        ...

    def steps(self, uuid: str, start: int = 0) -> AsyncIterator[Any]:
        """Yield the stream of ``uuid`` from position ``start`` on, waiting for new items
        until the record is final (then the iterator ends). The stream is the stored steps in
        order, with a :class:`~qtasks.steps.StepsRestarted` where :meth:`add_step` stored one;
        ``start`` counts both (a reader that read ``n`` items goes on from ``n``). Best an
        async generator: a reader that stops early calls its ``aclose()`` when it has one, so
        a live follow is released at once."""
        ...

    async def stats(self) -> dict[str, int]:
        """Number of stored records by status."""
        ...


@runtime_checkable
class FreshWait(Protocol):
    """Optional storage capability: wait for the record of a task this caller has just added
    (``add_task(..., timeout=...)``), skipping what only an old record needs."""

    async def wait_fresh(self, uuid: str, timeout: float | None) -> TaskRecord:
        """Exactly :meth:`Storage.wait`, for a record added a moment ago by the caller (a
        storage may rely on its final-record wake-up not having expired: Redis blocks at once
        instead of reading the record first, one round trip less)."""
        ...


@runtime_checkable
class AttemptLog(Protocol):
    """Optional storage capability: keep how each earlier attempt of a task ended, for a
    task's history (the dashboard's task page, ``qtasks get``).

    A record holds its latest attempt only. When :meth:`Storage.begin` (or a claim that
    begins, :class:`BeginOnClaim`) starts a new attempt over a record an earlier delivery
    began (status ``retry``: it failed and is retried; ``process``: its worker was lost or
    its lease ran out), the storage keeps that record as it was, before overwriting it. A
    re-begin by the same delivery (same token) keeps nothing. A task that succeeds at its
    first attempt costs nothing. The kept records expire with the task's record, and go when
    :meth:`Storage.add` replaces it (a reset record starts with no earlier attempts)."""

    async def attempts(self, uuid: str) -> list[TaskRecord]:
        """The records of the earlier attempts of ``uuid``, oldest first, each as its attempt
        left it; ``[]`` when there were none (or the task is unknown)."""
        ...


@runtime_checkable
class BeginMany(Protocol):
    """Optional capability of a :class:`Storage`: begin several records in one round trip.
    A worker whose tasks start together (a burst of queued work) begins them in one call."""

    async def begin_many(self, records: Sequence[TaskRecord]) -> list[TaskRecord]:
        """Exactly :meth:`Storage.begin` of each record (``generation`` 0: a stale copy of a
        workflow step is refused as ``begin`` refuses it), in order, in one round trip (or a
        few, for thousands). Raises what ``begin`` raises; a record that cannot be read
        raises :class:`~qtasks.errors.SerializationError` for the whole call (the caller
        then begins the records one by one)."""
        ...


@runtime_checkable
class CancelFeed(Protocol):
    """Optional storage capability: tell workers, in every process, of the cancels made
    through :meth:`Storage.cancel`, so a running task is cancelled at once instead of at its
    worker's next lease renewal (``lease / 3``), which stays the safety net for a cancel the
    feed missed (e.g. made while its connection was down). Best effort, at most once.
    """

    async def follow_cancels(
        self,
        on_cancel: Callable[[str, str], None],
        *,
        on_live: Callable[[bool], None] | None = None,
        task_status: Any = ...,
    ) -> None:
        """Call ``on_cancel(uuid, reason)`` for each cancel of a ``process`` record made from
        now on, by any process, until cancelled; ``on_live(True)`` each time it starts
        listening, ``on_live(False)`` each time it stops (a lost connection): while it is live,
        no cancel escapes it. Started with ``task_group.start``: reports started once it
        listens (or, when the backend is unreachable, once it tried; it keeps retrying in the
        background). Never raises for a lost connection."""
        ...


@runtime_checkable
class CancelFrom(Protocol):
    """Optional storage capability: a cancel that says what it changed, so the process that
    cancels a queued task (not one a worker runs) fires ``qtasks_task_cancelled`` for it, and
    only for it (see the hook). A storage without it: the canceller fires the hook only when
    the broker dropped the message unstarted (:meth:`Broker.cancel` returned ``True``).
    A subclass of a storage that has it and overrides ``cancel`` (to audit cancels, say)
    keeps its override called: ``app.cancel`` then uses ``cancel``, as without it."""

    async def cancel_from(self, uuid: str, reason: str) -> tuple[TaskRecord, TaskStatus] | None:
        """Exactly :meth:`Storage.cancel`, in the same atomic step, returning the stored
        record and the status it had just before this call (a final one when the call changed
        nothing; ``process`` when a worker held it); ``None`` when unknown."""
        ...


MAX_PAGE = 500
"""The largest ``limit`` of a :class:`RecordQuery`."""
SCAN_BUDGET = 0.25
"""Seconds a :meth:`StorageQuery.query` that has found nothing yet may go on scanning index
entries (a uuid prefix, or filters the indexes do not answer) before it returns an empty page
with a cursor, unless its :attr:`RecordQuery.scan_budget` says otherwise."""


@dataclass(slots=True, frozen=True)
class RecordQuery:
    """One page of stored records to list (see :class:`StorageQuery`); every filter is
    optional and they combine (AND).

    ``since``/``until`` bound the record's *index time* (unix seconds, ``since`` inclusive,
    ``until`` exclusive); ``cursor`` is the ``cursor`` of the previous :class:`RecordPage`.
    :meth:`checked` raises :class:`~qtasks.errors.InvalidQueryError` for a bad one.
    """

    status: TaskStatus | None = None
    task_name: str | None = None
    since: float | None = None
    until: float | None = None
    uuid_prefix: str | None = None
    limit: int = 50
    cursor: str | None = None
    parent_uuid: str | None = None
    """Only the tasks added by this task (``self.add_task`` of an ``echo`` task)."""
    scan_budget: float | None = None
    """Seconds the scan may go on while it has found nothing (``None``: :data:`SCAN_BUDGET`).
    ``0`` ends it after its first step, where a scan that found something ends anyway: the
    page is then the default's whenever that step found a record (a cheap repeat of a query,
    such as a live refresh, that tells when it needs the longer search)."""

    def checked(self) -> RecordQuery:
        """Itself, once its values are valid; raises :class:`InvalidQueryError` otherwise."""
        if isinstance(self.limit, bool) or not isinstance(self.limit, int):
            raise InvalidQueryError(f"limit must be an integer, not {self.limit!r}")
        if not 1 <= self.limit <= MAX_PAGE:
            raise InvalidQueryError(f"limit must be between 1 and {MAX_PAGE}, not {self.limit}")
        if self.status is not None and not isinstance(self.status, TaskStatus):
            raise InvalidQueryError(f"unknown status {self.status!r}")
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or value != value
            ):
                raise InvalidQueryError(f"{name} must be a unix time, not {value!r}")
        if self.since is not None and self.until is not None and self.until < self.since:
            raise InvalidQueryError("the time range ends before it starts")
        if self.parent_uuid is not None and (
            not isinstance(self.parent_uuid, str) or not self.parent_uuid
        ):
            raise InvalidQueryError(f"parent_uuid must be a task uuid, not {self.parent_uuid!r}")
        budget = self.scan_budget
        if budget is not None and (
            isinstance(budget, bool)
            or not isinstance(budget, int | float)
            or not 0 <= budget < math.inf
        ):
            raise InvalidQueryError(f"scan_budget must be seconds (0 or more), not {budget!r}")
        return self


@dataclass(slots=True, frozen=True)
class RecordPage:
    """What :meth:`StorageQuery.query` returns: records newest first, and the cursor of the
    next page (``None`` when there is nothing more)."""

    records: list[TaskRecord]
    cursor: str | None = None


@runtime_checkable
class StorageQuery(Protocol):
    """Optional storage capability: list stored records without scanning them all, for
    dashboards (``qtasks-web``). A storage without it still works everywhere else; a
    dashboard then says it cannot list tasks. Counts by status are :meth:`Storage.stats`.

    Guarantees:

    * Records come newest first by *index time*: when the record last changed status as the
      storage indexed it (a backend may keep a record that is not final at the time it was
      stored). Every stored record is listed by the query without filters.
    * Filters (``status``, ``task_name``, ``since``/``until`` on the index time,
      ``uuid_prefix``, ``parent_uuid``) combine; a record is listed only when it matches all
      of them.
    * The cost of one call is bounded whatever the number of stored records: it reads at most
      ``limit`` records when the filters are indexed (status, task name, parent, time) and
      scans a bounded number of index entries otherwise, so a page may hold fewer than
      ``limit`` records and still have a ``cursor``. A page is empty with a ``cursor`` only
      when the scan found nothing for :data:`SCAN_BUDGET` seconds, or the query's
      ``scan_budget`` (the caller says it is still searching, not that nothing matches); the
      scan goes in steps (about 10,000 entries) and ends after the first step that found a
      record or ran out of time. Following cursors until ``None`` lists every
      matching record that did not change meanwhile, each once.
    * A ``uuid_prefix`` that is a stored record's whole uuid is looked up, not scanned for:
      when that record matches the other filters it comes first on the first page (before
      newer records whose uuid extends the prefix), however many records came after it, and
      no later page lists it again.
    * Index entries expire with their records (``result_ttl``); an entry whose record is gone
      is skipped (and may be pruned), never returned.
    * ``query.checked()`` is applied: a bad query raises
      :class:`~qtasks.errors.InvalidQueryError`, as does a cursor this storage did not make.
    """

    async def query(self, query: RecordQuery) -> RecordPage:
        """One page of records matching ``query``, newest first."""
        ...

    async def count(
        self, status: TaskStatus, since: float | None = None, until: float | None = None
    ) -> int:
        """How many records have ``status`` and an index time in ``[since, until)`` (for the
        dashboard's rates: records that turned ``success`` in the last ten seconds...). Read
        from the status index (a remote backend answers in O(log n)); may count, for a
        moment, a record that just expired."""
        ...


@runtime_checkable
class GlobalConfig(Protocol):
    """Cluster-wide settings, shared state and worker heartbeats, in namespaces of keys.

    Values are JSON-like. ``set_if_absent`` and ``increment`` are atomic across every process
    that uses the same backend; keys with a ``ttl`` vanish after it.
    """

    async def start(self, stack: AsyncExitStack, config: QueueConfig) -> None: ...

    async def get(self, namespace: str, key: str, default: Any = None) -> Any: ...

    async def set(
        self, namespace: str, key: str, value: Any, *, ttl: float | None = None
    ) -> None: ...

    async def set_if_absent(
        self, namespace: str, key: str, value: Any, *, ttl: float | None = None
    ) -> bool:
        """Set only if the key does not exist; ``True`` if this call set it."""
        ...

    async def delete(self, namespace: str, key: str) -> bool: ...

    async def get_all(self, namespace: str) -> dict[str, Any]: ...

    async def clear(self, namespace: str) -> None: ...

    async def increment(self, namespace: str, key: str, amount: float = 1) -> float:
        """Atomically add ``amount`` (a missing key counts as 0); return the new value."""
        ...

    async def heartbeat(self, worker_id: str, info: dict[str, Any], ttl: float) -> None:
        """Record that ``worker_id`` is alive with ``info`` for the next ``ttl`` seconds."""
        ...

    async def workers(self) -> dict[str, dict[str, Any]]:
        """The workers whose last heartbeat has not expired, by id."""
        ...


@runtime_checkable
class HeartbeatEnd(Protocol):
    """Optional :class:`GlobalConfig` capability: forget a worker's heartbeat at once. A worker
    that stops cleanly calls it, so that it is listed as gone at once (``qtasks inspect``,
    ``app.ping()``), not for up to three heartbeat intervals more; without it the worker sends
    a last heartbeat, which expires. A worker that is killed stops beating and expires either
    way."""

    async def end_heartbeat(self, worker_id: str) -> None:
        """Remove the heartbeat of ``worker_id``: :meth:`GlobalConfig.workers` no longer lists
        it (a no-op when it is not there)."""
        ...


@runtime_checkable
class CompareDelete(Protocol):
    """Optional :class:`GlobalConfig` capability: delete a key only while it holds a given
    value, in one atomic step. The core releases the lock of ``State.update_with`` with it, so
    a holder whose lock ran out (its TTL) never deletes the lock the next holder took; without
    it, a ``get`` then a ``delete``, which can."""

    async def delete_if_equal(self, namespace: str, key: str, value: Any) -> bool:
        """Delete ``key`` if it exists and holds ``value`` (a string or a number: values are
        compared as stored); ``True`` if it did. Atomic across every process using the same
        backend."""
        ...


@runtime_checkable
class FlowControl(Protocol):
    """Optional global config capability: the cluster-wide state of flow control (rate
    limits, concurrency slots and unique keys, see :mod:`qtasks.flow`). Every method is one
    atomic decision across every process using the same backend (on Redis: one script, timed
    by the server's clock, never a client's). Without it, tasks declaring ``rate_limit``,
    ``max_concurrency`` or a unique key fail when the app starts
    (:class:`~qtasks.errors.ConfigurationError`).

    Keys are opaque strings chosen by the core (``"rate:<task>"``, ``"slots:<task>:<key>"``,
    ``"unique:<key>"``); an implementation keeps them apart from :class:`GlobalConfig`
    namespaces.
    """

    async def reserve_rate(
        self, key: str, interval: float, burst: int, max_wait: float | None
    ) -> float | None:
        """GCRA: reserve the earliest moment at which one more call of ``key`` keeps to one
        call per ``interval`` seconds, with up to ``burst`` calls at once; return the seconds
        from now until that moment (``0.0``: now). When it is more than ``max_wait`` seconds
        away (``None``: no bound), reserve nothing and return ``None``."""
        ...

    async def acquire_slot(
        self, key: str, limit: int, holder: str, lease: float, waiter: str | None = None
    ) -> float:
        """Take one of ``limit`` slots of ``key`` for ``holder`` (taking one it holds renews
        it) until ``lease`` seconds from now; ``0.0`` when taken. Otherwise count ``waiter``
        (default: ``holder``) as waiting and return the seconds to wait before trying again:
        about when a slot frees, from the mean time slots were held lately and the number of
        waiters due back before ``waiter`` (every waiter, for one not waiting yet), never later
        than the earliest lease ends (a killed holder's slot frees then). Waiters so come back
        one round of ``limit`` after another, about first come, first served, rather than all
        at once. Taking a slot ends ``waiter``'s wait.

        The core's holder is one *delivery* of a task (its uuid and the delivery's token):
        two deliveries of one task are two holders, so a stale delivery's release or renewal
        never touches a newer delivery's slot. Its waiter is the task (its uuid): a message
        handed back and delivered again is still one waiter. (An implementation written
        before ``waiter`` existed is called without it: its waiters are its holders.)"""
        ...

    async def release_slot(self, key: str, holder: str) -> None:
        """Free the slot ``holder`` holds in ``key``, if any (never another holder's)."""
        ...

    async def extend_slots(
        self, slots: Sequence[tuple[str, str]], lease: float, limits: Sequence[int] | None = None
    ) -> Sequence[int]:
        """Renew each ``(key, holder)`` slot until ``lease`` seconds from now, in one atomic
        round trip; the i-th result is a :class:`SlotRenewal` for the i-th slot.

        With ``limits`` (the i-th key allows ``limits[i]`` holders), a slot no longer held is
        *taken back* under the same holder in the same step, past the limit if others took it
        meanwhile: the core renews only the slots of runs still going on, whose lease ran out
        while the global config did not answer, or whose keys it lost (a restart, a failover).
        Such a run counts, so a key over its limit lets no holder in (ahead of every waiter)
        until enough holders leave. A taken-back slot has no start time (it stays out of the
        mean hold time). Without ``limits`` a slot no longer held stays free (``LOST``). An
        implementation written before ``limits`` existed is called without them and may
        answer ``True``/``False`` (``RENEWED``/``LOST``)."""
        ...

    async def claim_unique(
        self, key: str, holder: str, ttl: float | None, replace: str | None = None
    ) -> str | None:
        """Set ``key`` to ``holder`` (for ``ttl`` seconds) when it is free, or when it holds
        ``replace``; return ``None`` when set, else the holder it keeps."""
        ...

    async def release_unique(self, key: str, holder: str) -> bool:
        """Free ``key`` if it holds ``holder``; ``True`` if it did."""
        ...

    async def flow_state(self) -> dict[str, dict[str, float]]:
        """Live figures of the keys used lately, for ``qtasks inspect``: for a rate key
        ``tokens`` (calls that may start now), ``burst``, ``per_second`` and ``waiting``
        (calls reserved for later); for a slot key ``held``, ``limit`` and ``waiting``
        (holders told to try again within the last second or later)."""
        ...


class SlotRenewal(IntEnum):
    """What :meth:`FlowControl.extend_slots` did with one slot (``0``/``1`` are ``False``/
    ``True``, the answers of an implementation written before slots were taken back)."""

    LOST = 0
    """Not held by that holder, and not taken back."""
    RENEWED = 1
    """Still held: renewed, the key within its limit."""
    TAKEN_BACK = 2
    """No longer held: taken back under the same holder, the key within its limit."""
    OVER_LIMIT = 3
    """Held now (renewed or taken back), but the key has more live holders than its limit."""


@runtime_checkable
class RateRelease(Protocol):
    """Optional :class:`FlowControl` capability: give a rate reservation back. The core
    calls it when a cancel drops a message unstarted, so the reservations of a cancelled
    backlog do not push back every later task; without it they are spent at their moment."""

    async def release_rate(self, key: str) -> bool:
        """Give back one reservation of ``key`` (its task will not run): the next moment
        :meth:`FlowControl.reserve_rate` gives is one interval earlier, never earlier than
        now. ``True`` when a reservation ahead of now was given back."""
        ...


_TAKES: dict[tuple[type, str, str], bool] = {}
""":func:`takes_keyword` by component class, method and keyword (read once per class)."""


def takes_keyword(component: object, method: str, keyword: str) -> bool:
    """Whether ``component``'s ``method`` takes ``keyword``, added to the protocol since
    (``waiter`` of ``acquire_slot``, ``limits`` of ``extend_slots``, ``fence`` of
    ``add_step``, ``ended`` of ``consume_begun``, ``wanted`` of the consume methods): an
    implementation written before it existed does not, and is called the older way. Read from
    the bound method (a delegating wrapper answers through ``__getattr__``), once per class
    but for a class that forwards (:func:`forwards`: it answers for what it wraps), a
    parameter of that name that is not positional-only or a ``**kwargs`` counting as taking
    it; a method without a signature to read is taken to follow the current protocol."""
    key = (type(component), method, keyword)
    known = _TAKES.get(key)
    if known is None:
        try:
            params = inspect.signature(getattr(component, method)).parameters.values()
        except (AttributeError, TypeError, ValueError):  # nothing to read: the current protocol
            known = True
        else:
            known = any(
                p.kind is p.VAR_KEYWORD or (p.name == keyword and p.kind is not p.POSITIONAL_ONLY)
                for p in params
            )
        if not forwards(key[0]):
            _TAKES[key] = known
    return known


async def requeue_counting(
    delivery: Delivery, count: Counting, *, delay: float | None = None, body: bytes | None = None
) -> bool:
    """``delivery.requeue(delay=delay, body=body, count=count)``; without ``count`` (a reset)
    for a broker written before it existed (see :meth:`Delivery.requeue`)."""
    if takes_keyword(delivery, "requeue", "count"):
        return await delivery.requeue(delay=delay, body=body, count=count)
    return await delivery.requeue(delay=delay, body=body)


def plain_overridden(kind: type, plain: str, capability: str) -> bool:
    """Whether ``kind`` overrides method ``plain`` below the class that gives it method
    ``capability``, a capability's faster form of it (``release_slot`` and
    ``release_slot_waking``, ``cancel`` and ``cancel_from``). The core then calls ``plain``:
    a subclass of a built-in component that overrides the plain method (to count or audit
    its calls) keeps its override called rather than bypassed through the capability it
    inherits."""
    for klass in kind.__mro__:
        if plain in vars(klass):
            return capability not in vars(klass)
        if capability in vars(klass):
            return False
    return False


@runtime_checkable
class SlotWake(Protocol):
    """Optional :class:`FlowControl` capability: free a concurrency slot and bring its key's
    next waiter forward. The core uses it with a :class:`BringForward` broker, so a freed slot
    does not sit idle until the next waiter's delayed message comes back by itself: it then
    frees slots with :meth:`release_slot_waking`, not ``release_slot``. A subclass that
    overrides ``release_slot`` alone (to count or audit releases) keeps it called: the core
    frees its slots with ``release_slot`` and wakes no waiter."""

    async def release_slot_waking(self, key: str, holder: str) -> str | None:
        """:meth:`FlowControl.release_slot`, then, when ``holder`` held a slot, take the
        waiter of ``key`` due back first among those not due yet, count it as due now, and
        return it (``None``: no such waiter). One atomic step: two releases never return the
        same waiter while it is still waiting."""
        ...


@runtime_checkable
class BringForward(Protocol):
    """Optional broker capability: make a delayed message due now (the core brings forward
    the message of a concurrency-slot waiter when a slot frees, see :class:`SlotWake`)."""

    async def bring_forward(self, id: str) -> bool:
        """Make message ``id`` due now when it is delayed (its body, priority and attempt
        count unchanged, delivered once); ``False`` when it is not delayed here (ready, in
        flight, gone, or never published to this broker)."""
        ...


@runtime_checkable
class UniquePublish(Protocol):
    """Optional capability of a :class:`SharedServer` broker: claim a unique key of a
    :class:`FlowControl` global config on the same server in the round trip that stores and
    publishes the new task, atomically, so no crash can leave a key claimed for a task that was
    never enqueued. Without it the core claims the key first and gives it back if the publish
    fails (see :mod:`qtasks.flow`)."""

    def shares_server_with_config(self, global_config: GlobalConfig) -> bool:
        """Whether :meth:`publish_new_unique` may be used with ``global_config``."""
        ...

    async def publish_new_unique(
        self,
        envelope: Envelope,
        storage: Storage,
        record: TaskRecord,
        global_config: GlobalConfig,
        claim: tuple[str, str, float | None, str | None],
    ) -> str | None:
        """Exactly ``held = await global_config.claim_unique(*claim)`` (key, holder, ttl,
        replace) followed, when ``held`` is ``None``, by :meth:`SharedServer.publish_new` of
        ``envelope`` and ``record``, in one atomic round trip; returns ``held``."""
        ...


@runtime_checkable
class Worker(Protocol):
    """Takes deliveries from the broker and runs them through an executor.

    A worker must: hold at most ``max_tasks_process`` running tasks and ``prefetch`` waiting
    ones; run waiting ones lowest priority number first; renew leases of running tasks; store the
    final record (fenced with the delivery token) *before* acking; nack undecodable or unknown
    messages with a reason; never die of one task's failure; on stop, requeue waiting deliveries
    at once, give running tasks ``shutdown_grace`` seconds, then cancel and requeue them.

    The app serves with a :class:`~qtasks.worker.QueueWorker` (``AsyncQueueTasks.worker`` is
    typed so) and reads more than this protocol declares: ``id`` (a unique name, logged and
    stored on records), ``stop()`` (begin a graceful stop), and, each read with a default,
    ``stopping`` (an ``anyio.Event`` set when it begins to stop: a task's
    ``TaskContext.sleep`` wakes on it), ``executor`` (the :class:`TaskExecutor` of tasks
    without their own; a plain one otherwise) and ``hurry()`` (cut the grace period of its
    stop short, for ``app.stop(now=True)``; without it the grace is never cut short).
    """

    async def run(self, app: AsyncQueueTasks, *, task_status: Any = ...) -> None:
        """Serve until cancelled; report readiness through ``task_status.started()``."""
        ...

    @property
    def running(self) -> int:
        """Tasks running now."""
        ...

    def cancel_local(self, uuid: str, reason: str) -> bool:
        """Cancel a task running on this worker; ``True`` if it was running here."""
        ...


@runtime_checkable
class EarlyProbe(Protocol):
    """Optional :class:`Worker` capability: answer the health probe (``health_port``,
    :mod:`qtasks.health`) from before the app's components start, so that a probe asked while
    the app waits for its servers (``start_timeout``, :mod:`qtasks.waiting`) is answered, not
    refused (a Kubernetes liveness probe refused kills the pod). The
    :class:`~qtasks.starter.SignalStarter` (``run_forever``, ``serve``, ``qtasks run``) uses
    it; without it the probe listens once :meth:`Worker.run` serves."""

    async def serve_probe(self, app: AsyncQueueTasks, *, task_status: Any = ...) -> None:
        """Listen on the probe's address, then report ``task_status.started()`` (a port that
        cannot be listened on raises :class:`~qtasks.errors.ConfigError` before), and answer
        until cancelled; the listener is closed then. While the components start, ``/livez``
        answers 200 and ``/readyz`` 503, both with the state ``starting``; :meth:`Worker.run`
        answers through this listener meanwhile (it does not listen itself). Without
        ``health_port`` it reports started and returns."""
        ...


class TaskExecutor(Protocol):
    """Runs one task call: argument injection, the call itself, generators, result encoding."""

    async def execute(self, run: Any) -> Any:
        """Run ``run`` (a :class:`qtasks.executor.TaskRun`) and return the encoded result.

        Raises what the task raised (the worker records it)."""
        ...


class Starter(Protocol):
    """Owns the process lifecycle for ``run_forever``: signals, the event loop, shutdown."""

    def run(self, app: AsyncQueueTasks) -> None:
        """Block serving ``app`` until ``app.stop()`` (``await app.wait_for_stop()`` returns
        then) or SIGINT/SIGTERM, then stop gracefully. May be called from any thread."""
        ...


ComponentFactory = Callable[[QueueConfig], Any]
"""What an entry point may name: a class with ``from_config`` or a factory taking the config."""


class SupportsFromConfig(Protocol):
    @classmethod
    def from_config(cls, config: QueueConfig) -> Self: ...
