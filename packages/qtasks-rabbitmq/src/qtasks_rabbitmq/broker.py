"""The RabbitMQ :class:`~qtasks.components.Broker`.

Guarantees, and how they are kept (see ``docs/rabbitmq.md`` for the whole story):

* Durable queues, persistent messages and publisher confirms: :meth:`RabbitMQBroker.publish`
  returns only once RabbitMQ confirmed the message; an unroutable or nacked message raises
  :class:`~qtasks_rabbitmq.errors.PublishRejectedError`.
* Manual acks: a delivery is acked when the worker calls :meth:`RabbitMQDelivery.ack` (after the
  final record is stored). Unacked messages come back when the channel or connection dies.
* Delivery attempts are counted in the ``x-qtasks-deliveries`` header. A classic queue only says
  *that* a message was delivered before (``redelivered``), so such a message is published again
  with the count increased and the old copy acked; a quorum queue counts itself
  (``x-delivery-count``). After ``max_deliveries`` the message goes to the dead-letter queue
  with the reason in ``x-qtasks-reason``.
* Suspects alone: a message on one of its last two allowed deliveries
  (:func:`~qtasks.components.alone_from`) is handed out alone; its consumer, cancelled, hands
  back uncounted what RabbitMQ pushed to it beside the suspect and consumes again once the
  suspect is settled or lost (:mod:`qtasks_rabbitmq.apart`).
* Delays: the binary wait-queue chain of :mod:`qtasks_rabbitmq.topology`.

This module holds the lifecycle (a :class:`~qtasks_rabbitmq.link.Link` per event loop the
broker is started in, counted starts) and the public methods; each job lives in a module of its
own: settings (:mod:`~qtasks_rabbitmq.settings`), publishing (:mod:`~qtasks_rabbitmq.publisher`),
consuming with its lease and prefetch bookkeeping (:mod:`~qtasks_rabbitmq.consumer`), the
delivery (:mod:`~qtasks_rabbitmq.delivery`), stats and dead letters
(:mod:`~qtasks_rabbitmq.management`), the wire format (:mod:`~qtasks_rabbitmq.wire`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Self

from qtasks.components import BrokerStats, Buried, DeadLetter
from qtasks.config import QueueConfig
from qtasks.errors import ComponentNotStartedError
from qtasks.messages import Envelope
from qtasks_rabbitmq import management
from qtasks_rabbitmq.consumer import Consumer
from qtasks_rabbitmq.delivery import RabbitMQDelivery
from qtasks_rabbitmq.link import Link
from qtasks_rabbitmq.publisher import Published, Publisher
from qtasks_rabbitmq.settings import (
    DEFAULT_URL,
    SERVER_MAX_MESSAGE_SIZE,
    RabbitMQSettings,
    check_url,
)
from qtasks_rabbitmq.topology import QueueType, Topology

__all__ = ["DEFAULT_URL", "RabbitMQBroker", "RabbitMQDelivery"]

PUBLISH_BATCH = 1000
"""Most publishes whose confirms :meth:`RabbitMQBroker.publish_many` awaits together."""


@dataclass(slots=True, eq=False)
class _Session:
    """What the broker holds in one event loop it was started in: a connection belongs to
    its loop, so apps sharing the broker from loops of their own (two sync apps, each with
    its portal thread) each get a link, counted over the starts made in that loop."""

    link: Link
    publisher: Publisher
    starts: int = 1
    consumers: dict[int, Consumer] = field(default_factory=dict)


class RabbitMQBroker:
    """A :class:`~qtasks.components.Broker` on RabbitMQ (aio-pika).

    ``queue`` names the work queue (other objects are named after it); ``queue_type`` is
    ``"classic"`` (priorities through ``x-max-priority``) or ``"quorum"`` (replicated, counts
    deliveries itself; no priorities before RabbitMQ 4). ``queue_version`` is the classic
    queues' ``x-queue-version`` (0, the default, leaves it to the server). ``heartbeat`` is the AMQP
    heartbeat in seconds (unless the URL sets one). ``publish_timeout`` bounds a whole publish:
    one deadline for the wait for a lost connection to come back and for its confirm.
    ``max_message_size`` is the server's limit on a message body (RabbitMQ's default, 128 MiB;
    set it to the server's if that differs): a larger message is refused before it is written,
    with :class:`~qtasks_rabbitmq.errors.OversizedMessageError`.
    They are checked as :class:`~qtasks_rabbitmq.settings.RabbitMQSettings`, and ``url`` by
    :func:`~qtasks_rabbitmq.settings.check_url`, here: a bad value or URL (not ``amqp://`` or
    ``amqps://``, no host, a port that is no number) raises :class:`~qtasks.errors.ConfigError`,
    its message without the password.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        queue: str = "qtasks",
        queue_type: QueueType = "classic",
        max_priority: int = 20,
        queue_version: int = 0,
        heartbeat: int = 30,
        connect_timeout: float = 10.0,
        publish_timeout: float = 30.0,
        max_message_size: int = SERVER_MAX_MESSAGE_SIZE,
    ) -> None:
        settings = RabbitMQSettings(
            queue=queue,
            queue_type=queue_type,
            max_priority=max_priority,
            queue_version=queue_version,
            heartbeat=heartbeat,
            connect_timeout=connect_timeout,
            publish_timeout=publish_timeout,
            max_message_size=max_message_size,
        )
        check_url(url)  # a bad URL is refused here, not at start()
        self._url = url
        self._settings = settings
        self._topology = Topology(
            settings.queue,
            settings.queue_type,
            settings.max_priority,
            version=settings.queue_version,
        )
        self._max_deliveries = 5
        self._max_running = 10
        self._lease = 30.0
        self._sessions: dict[asyncio.AbstractEventLoop, _Session] = {}
        self._published = Published()  # one for the process: a cancel skips in any loop
        self._starting: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}

    @classmethod
    def from_config(cls, config: QueueConfig) -> Self:
        """Build from ``config.broker_url`` and the ``rabbitmq_*`` keys of ``config.extra``."""
        settings = RabbitMQSettings.from_extra(config.extra)
        return cls(config.broker_url or DEFAULT_URL, **dataclasses.asdict(settings))

    @property
    def lease(self) -> float:
        """See :class:`~qtasks.components.LeaseLength`: ``config.lease`` of the first start
        (kept by the consumers, as RabbitMQ has no lease of its own)."""
        return self._lease

    @property
    def max_deliveries(self) -> int:
        """See :class:`~qtasks.components.DeliveryLimit`: ``config.max_deliveries`` of the first
        start (the queue's ``x-delivery-limit`` and the consumers' count)."""
        return self._max_deliveries

    @property
    def settings(self) -> RabbitMQSettings:
        """The checked settings this broker was built with."""
        return self._settings

    @property
    def topology(self) -> Topology:
        """The queues and exchanges this broker declares."""
        return self._topology

    @property
    def reconnects(self) -> int:
        """How many times the connections were restored since start (all event loops')."""
        return sum(session.link.reconnects for session in list(self._sessions.values()))

    def _session(self) -> _Session:
        """The link of the running event loop: each loop the broker was started in has one."""
        try:
            session = self._sessions.get(asyncio.get_running_loop())
        except RuntimeError:
            session = None
        if session is None:
            raise ComponentNotStartedError("RabbitMQBroker used before start() in this event loop")
        return session

    def _require_link(self) -> Link:
        return self._session().link

    def _require_publisher(self) -> Publisher:
        return self._session().publisher

    # lifecycle

    async def start(self, stack: AsyncExitStack, config: QueueConfig) -> None:
        """Connect and declare. Started again in the same event loop (apps sharing this
        broker), it only counts: the connection closes when the last of the stacks closes.
        Started in another running event loop (another sync app, in a thread of its own), it
        opens a link of its own there, counted apart: the two serve side by side, each
        consumer and publish on the link of its loop. A link whose loop is no longer running
        (closed without having closed the link) is forgotten at the next start. The
        ``config`` of the first start (while no loop holds a link) sets the topology's
        limits. An unknown, ill-typed or out-of-range ``rabbitmq_*`` key in ``config.extra``
        raises :class:`~qtasks.errors.ConfigError` (the keys are read by :meth:`from_config`).
        Concurrent starts in one loop (``asyncio.gather`` of two apps' starts) connect once:
        the others wait for that start and count, or connect themselves if it failed."""
        RabbitMQSettings.from_extra(config.extra)  # checked as from_config would: ranges too
        async with self._start_lock():
            await self._start(config)
        stack.push_async_callback(self._release)

    def _start_lock(self) -> asyncio.Lock:
        """The lock serializing starts, one per event loop (an asyncio lock is bound to one)."""
        loop = asyncio.get_running_loop()
        lock = self._starting.get(loop)
        if lock is None:
            lock = self._starting[loop] = asyncio.Lock()
        return lock

    def _forget_stopped_loops(self) -> None:
        """Abandon the links of loops no longer running (closed without closing them), without
        touching those loops: nothing can run there any more. Their stacks' releases become
        no-ops. A loop running in another thread keeps its link."""
        for loop in [loop for loop in list(self._sessions) if not loop.is_running()]:
            session = self._sessions.pop(loop, None)
            if session is not None:
                session.link.abandon()
        for loop in [loop for loop in list(self._starting) if loop.is_closed()]:
            self._starting.pop(loop, None)

    async def _start(self, config: QueueConfig) -> None:
        loop = asyncio.get_running_loop()
        self._forget_stopped_loops()
        session = self._sessions.get(loop)
        if session is not None:
            session.starts += 1
            return
        if not self._sessions:
            self._configure(config)
        settings = self._settings
        link = Link(
            self._url,
            self._topology,
            heartbeat=settings.heartbeat,
            connect_timeout=settings.connect_timeout,
            publish_timeout=settings.publish_timeout,
            max_message_size=settings.max_message_size,
        )
        await link.start(AsyncExitStack())  # closed by _release, when the loop's last user goes
        self._sessions[loop] = _Session(link, Publisher(link, self._topology))

    def _configure(self, config: QueueConfig) -> None:
        """Take the limits of ``config`` into the topology (the first start's)."""
        self._max_deliveries = config.max_deliveries
        self._max_running = config.max_tasks_process
        ttl = config.dead_letter_ttl
        self._topology = dataclasses.replace(
            self._topology,
            delivery_limit=config.max_deliveries,
            dead_letter_ttl_ms=None if ttl is None else max(int(ttl * 1000), 1),
            max_dead_letters=config.max_dead_letters,
        )
        self._lease = config.lease

    async def _release(self) -> None:
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None:
            return  # a stack of a loop already left (see start)
        session.starts -= 1
        if session.starts == 0:
            del self._sessions[loop]
            await session.link.close()

    # publishing (the hot path: one call down to Link.publish_many)

    async def publish(self, envelope: Envelope) -> None:
        publisher = self._require_publisher()
        # Remembered before it is written: a consumer of this process may receive it before
        # the confirm comes back, and must find it to forget (``cancel`` is False after).
        with self._published.publishing((envelope.id,)):
            await publisher.send(envelope.id, envelope.body, envelope.priority, 0, envelope.eta)

    async def publish_many(self, envelopes: Sequence[Envelope]) -> None:
        """See :class:`qtasks.components.BulkPublish`: the publishes of a batch are written
        back to back on the channel and their publisher confirms awaited together (one round
        trip's wait per batch instead of one per message), :data:`PUBLISH_BATCH` at a time.
        It returns once every message is confirmed; a nacked or unroutable one raises."""
        send_many = self._require_publisher().send_many
        publishing = self._published.publishing
        for start in range(0, len(envelopes), PUBLISH_BATCH):
            chunk = envelopes[start : start + PUBLISH_BATCH]
            with publishing([e.id for e in chunk]):  # remembered first, as in publish
                await send_many([(e.id, e.body, e.priority, 0, e.eta) for e in chunk])

    # consuming

    def consume(
        self, *, prefetch: int, wanted: Callable[[], int] | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[RabbitMQDelivery]]:
        """Open a consumer that holds at most ``prefetch`` messages (at least 1) beyond those it
        handed out and that are not settled yet (``basic.qos``, adjusted when what was handed
        out moved far enough: see :mod:`qtasks_rabbitmq.consumer`); on a classic queue at
        most ``wanted()`` too, when given (a quorum queue's qos is fixed when it consumes)."""
        return self._consume(prefetch, None, wanted)

    def consume_noticing(
        self, *, prefetch: int, buried: Buried, wanted: Callable[[], int] | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[RabbitMQDelivery]]:
        """:meth:`consume`, awaiting ``buried(id, reason)`` for each message the consumer
        dead-letters past ``max_deliveries`` (see :class:`~qtasks.components.BuryNotice`)."""
        return self._consume(prefetch, buried, wanted)

    @asynccontextmanager
    async def _consume(
        self, prefetch: int, buried: Buried | None, wanted: Callable[[], int] | None = None
    ) -> AsyncIterator[AsyncIterator[RabbitMQDelivery]]:
        session = self._session()
        link = session.link
        consumer = Consumer(
            link,
            session.publisher,
            self._published,
            prefetch=prefetch,
            lease=self._lease,
            max_running=self._max_running,
            max_deliveries=self._max_deliveries,
            buried=buried,
            wanted=wanted,
        )
        link.register(consumer.key, consumer.reopen, consumer.healthy)
        session.consumers[consumer.key] = consumer
        try:
            connection, generation = await link.connection()
            try:
                await consumer.reopen(connection, generation)
            except Exception as exc:
                link.lost(f"opening a consumer failed: {type(exc).__name__}")
            yield consumer
        finally:
            session.consumers.pop(consumer.key, None)
            await consumer.close()

    # inspection and management

    async def cancel(self, id: str) -> bool:
        """Drop a message published by *this process* and not yet received here.

        RabbitMQ cannot remove a message from the middle of a queue: the id is remembered and
        the message is acked and skipped when a consumer of this process receives it. A message
        taken by another process is not affected here; the worker there skips it because its
        stored record is already cancelled."""
        return self._published.cancel(id)

    def consume_stalled(self) -> float:
        """Seconds the consumer of this process down the longest has not been consuming
        (its channel or connection lost and not open again, or cancelled by the server);
        ``0.0`` while every consumer consumes (see
        :class:`~qtasks.components.ConsumeHealth`)."""
        now = time.monotonic()
        sessions = list(self._sessions.values())
        return max((c.stalled(now) for s in sessions for c in s.consumers.values()), default=0.0)

    async def stats(self) -> BrokerStats:
        """Ready, delayed and dead counts from RabbitMQ; ``in_flight`` counts the deliveries
        held by consumers of this process (AMQP does not report other consumers' unacked
        messages). RabbitMQ does not count by priority: all ready messages are reported
        under priority 0."""
        connection, _ = await self._require_link().connection()
        ready, delayed, dead = await management.counts(connection, self._topology)
        consumers = [c for s in list(self._sessions.values()) for c in list(s.consumers.values())]
        in_flight = sum(len(c.held) + c.buffer.qsize() for c in consumers)
        return BrokerStats({0: ready} if ready else {}, delayed, in_flight, dead)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters (read without removing them; expired ones met on
        the way are removed)."""
        connection, _ = await self._require_link().connection()
        return await management.dead_letters(connection, self._topology, limit)

    async def requeue_dead_letters(self, ids: list[str] | None = None) -> int:
        """Publish dead letters to the work queue again, with their delivery count reset."""
        connection, _ = await self._require_link().connection()
        return await management.requeue_dead_letters(connection, self._require_publisher(), ids)

    async def purge_dead_letters(self, ids: list[str] | None = None) -> int:
        """Delete dead letters for good (all when ``ids`` is None); return how many (the
        dashboard's purge; see :mod:`qtasks.components`)."""
        connection, _ = await self._require_link().connection()
        return await management.purge_dead_letters(connection, self._topology, ids)
