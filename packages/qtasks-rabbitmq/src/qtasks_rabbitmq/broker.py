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
* Delays: the binary wait-queue chain of :mod:`qtasks_rabbitmq.topology`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import time
import uuid as uuid_mod
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime
from typing import Any, Self, cast

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from qtasks.components import BrokerStats, DeadLetter
from qtasks.config import QueueConfig
from qtasks.errors import ComponentNotStartedError
from qtasks.messages import Envelope
from qtasks_rabbitmq.link import Link
from qtasks_rabbitmq.settings import DEFAULT_URL, RabbitMQSettings, check_options
from qtasks_rabbitmq.topology import (
    LEVELS,
    QueueType,
    Topology,
    delay_ms,
    delay_routing_key,
)

__all__ = ["DEFAULT_URL", "RabbitMQBroker", "RabbitMQDelivery"]

log = logging.getLogger("qtasks_rabbitmq")

PERSISTENT = 2
"""AMQP ``delivery_mode`` of a message written to disk by a durable queue."""

H_ID = "x-qtasks-id"
"""The message id when it does not fit AMQP's ``message-id`` property (else that is used)."""
H_PRIORITY = "x-qtasks-priority"
"""The qtasks priority (absent: 0)."""
H_DELIVERIES = "x-qtasks-deliveries"
"""Deliveries already made of this message (absent: 0, when published or requeued)."""
H_ETA = "x-qtasks-eta-ms"
H_REASON = "x-qtasks-reason"
H_DEAD_AT = "x-qtasks-dead-at-ms"
# Times travel as integer milliseconds: AMQP tables carry Python floats as 32-bit floats.

_MAX_MESSAGE_ID = 255
"""Longest AMQP ``message-id`` (a short string)."""

_TRACKED_IDS = 100_000
"""How many ids published by this process :meth:`RabbitMQBroker.cancel` remembers."""


def _as_int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _ms(unix_time: float) -> int:
    return math.ceil(unix_time * 1000)


def _as_str(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return value if isinstance(value, str) and value else None


class RabbitMQDelivery:
    """One delivery from :class:`RabbitMQBroker`; settles on the channel it came from."""

    __slots__ = (
        "_attempt",
        "_consumer",
        "_generation",
        "_id",
        "_message",
        "_priority",
        "_settled",
        "lease_until",
        "token",
    )

    def __init__(
        self,
        consumer: _Consumer,
        generation: int,
        message: DeliveredMessage,
        id: str,
        priority: int,
        attempt: int,
    ) -> None:
        self._consumer = consumer
        self._generation = generation
        self._message = message
        self._id = id
        self._priority = priority
        self._attempt = attempt
        self._settled = False
        self.lease_until = 0.0
        self.token = f"{consumer.uid}.{generation}.{message.delivery_tag}"

    @property
    def id(self) -> str:
        return self._id

    @property
    def body(self) -> bytes:
        return self._message.body

    @property
    def priority(self) -> int:
        return self._priority

    @property
    def attempt(self) -> int:
        return self._attempt

    @property
    def generation(self) -> int:
        return self._generation

    def _live(self) -> bool:
        return not self._settled and self._consumer.holds(self._generation)

    async def _finish(self) -> bool:
        """Ack on the original channel; ``False`` if that channel is gone."""
        self._consumer.release(self.token)
        try:
            await _settle(self._message, ack=True)
        except Exception:
            return False
        return True

    async def _then_finish(self, publish: Callable[[], Awaitable[None]]) -> bool:
        """Publish (a copy, a dead letter) and only then ack this delivery."""
        if not self._live():
            return False
        self._settled = True
        try:
            await publish()
        except BaseException:
            self._settled = False
            raise
        return await self._finish()

    async def ack(self) -> bool:
        if not self._live():
            return False
        self._settled = True
        return await self._finish()

    async def nack(self, reason: str) -> bool:
        broker = self._consumer.broker
        return await self._then_finish(
            lambda: broker._bury(self._id, self.body, self._priority, self._attempt, reason)
        )

    async def requeue(self, *, delay: float | None = None, body: bytes | None = None) -> bool:
        broker = self._consumer.broker
        eta = time.time() + delay if delay else None
        return await self._then_finish(
            lambda: broker._send(
                self._id, self.body if body is None else body, self._priority, 0, eta
            )
        )

    async def extend(self) -> bool:
        if not self._live():
            return False
        self.lease_until = time.monotonic() + self._consumer.broker._lease
        return True

    async def hand_back(self) -> None:
        """Return an unstarted delivery without counting it: publish a copy, ack this one."""
        broker = self._consumer.broker
        headers = self._message.header.properties.headers or {}
        deliveries = _as_int(headers.get(H_DELIVERIES), 0)
        with contextlib.suppress(Exception):
            await self._then_finish(
                lambda: broker._send(self._id, self.body, self._priority, deliveries, None)
            )


class _Consumer:
    """A consumer channel on the current connection, re-opened after every reconnect."""

    _keys = itertools.count()

    def __init__(self, broker: RabbitMQBroker, prefetch: int) -> None:
        self.broker = broker
        self.prefetch = max(prefetch, 1)
        self.uid = uuid_mod.uuid4().hex[:12]
        self.key = next(self._keys)
        self.generation = 0
        self.channel: AbstractChannel | None = None
        self.tag: str | None = None
        self.underlay: aiormq.Channel | None = None
        self.buffer: asyncio.Queue[RabbitMQDelivery] = asyncio.Queue()
        self.held: dict[str, RabbitMQDelivery] = {}
        self.closing = False
        self.pending = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.qos = 0
        self.dynamic = broker.topology.queue_type == "classic"
        self._qos_wanted = asyncio.Event()
        self._qos_task: asyncio.Task[None] | None = None
        self._lease_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # basic.qos counts every unacked message, but ``prefetch`` bounds only those not yet handed
    # to the worker. Classic queues: a channel-wide (global) qos of ``prefetch`` plus what the
    # worker holds, updated in the background (coalesced: a settle followed by a take sends
    # nothing); RabbitMQ applies a changed global limit at once. Quorum queues refuse global
    # qos and per-consumer qos is fixed at basic.consume, so there it is ``prefetch`` plus
    # ``max_tasks_process`` (what a worker may hold running).

    def take(self, delivery: RabbitMQDelivery) -> None:
        delivery.lease_until = time.monotonic() + self.broker._lease
        self.held[delivery.token] = delivery
        self._qos_wanted.set()

    async def _lease_loop(self) -> None:
        """RabbitMQ holds an unacked message until its channel closes; the contract's lease is
        kept here: a delivery not settled or extended within ``config.lease`` is handed back
        (``basic.nack`` with requeue, so it counts as a delivery) and its holder is fenced."""
        lease = self.broker._lease
        while not self.closing:
            await asyncio.sleep(min(lease / 4, 1.0))
            now = time.monotonic()
            for delivery in [d for d in self.held.values() if d.lease_until <= now]:
                if not delivery._live():
                    continue
                delivery._settled = True
                self.release(delivery.token)
                with contextlib.suppress(Exception):
                    await _settle(delivery._message, ack=False)

    def release(self, token: str) -> None:
        if self.held.pop(token, None) is not None:
            self._qos_wanted.set()

    async def _qos_loop(self) -> None:
        while True:
            await self._qos_wanted.wait()
            self._qos_wanted.clear()
            if self.closing:
                return
            target = len(self.held) + self.prefetch
            channel = self.channel
            if channel is None or channel.is_closed or target == self.qos or not self.dynamic:
                continue
            try:
                # Shielded: aiormq closes a channel whose RPC is cancelled mid-flight.
                await asyncio.shield(channel.set_qos(prefetch_count=target, global_=True))
                self.qos = target
            except Exception:
                continue  # the channel is dying; reopen sets qos again

    def holds(self, generation: int) -> bool:
        channel = self.channel
        return generation == self.generation and channel is not None and not channel.is_closed

    def alive(self) -> bool:
        channel = self.channel
        if channel is None or channel.is_closed or self.tag is None:
            return False
        return self.underlay is not None and self.tag in self.underlay.consumers

    async def reopen(self, connection: AbstractConnection, generation: int) -> None:
        async with self._lock:
            if self.closing or (self.generation == generation and self.alive()):
                return
            link = self.broker._require_link()
            channel = await connection.channel(publisher_confirms=False)
            self.held.clear()  # deliveries of the old channel are stale now
            if self.dynamic:
                self.qos = self.prefetch
                await channel.set_qos(prefetch_count=self.qos, global_=True)
            else:
                self.qos = self.prefetch + self.broker._max_running
                await channel.set_qos(prefetch_count=self.qos)
            if self._qos_task is None:
                self._qos_task = asyncio.create_task(self._qos_loop(), name="qtasks-rabbitmq-qos")
                self._lease_task = asyncio.create_task(
                    self._lease_loop(), name="qtasks-rabbitmq-lease"
                )
            channel.close_callbacks.add(
                lambda _s, exc: self._closed(generation, "consumer channel closed", exc)
            )
            underlay = await channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(
                lambda _frame: self._closed(generation, "consumer cancelled by the server", None)
            )
            self.generation = generation
            self.channel = channel
            self.underlay = cast(aiormq.Channel, underlay)
            # Straight on aiormq: aio-pika would wrap every message in an IncomingMessage and
            # a second task; the worker needs the raw frame only.
            ok = await underlay.basic_consume(
                link.topology.queue, functools.partial(self._on_message, generation)
            )
            self.tag = ok.consumer_tag

    def _closed(self, generation: int, what: str, exc: BaseException | None) -> None:
        if generation == self.generation and not self.closing and self.broker._link is not None:
            self.broker._link.lost(what if exc is None else f"{what}: {type(exc).__name__}")

    async def _on_message(self, generation: int, message: DeliveredMessage) -> None:
        if generation != self.generation:
            return  # from a channel already replaced; RabbitMQ redelivers it
        self.pending += 1
        self.idle.clear()
        try:
            delivery = await self.broker._receive(self, generation, message)
            if delivery is None:
                return
            if self.closing:
                await delivery.hand_back()
                return
            self.buffer.put_nowait(delivery)
        except Exception:
            log.exception("qtasks_rabbitmq: handling a received message failed; requeued")
            with contextlib.suppress(Exception):
                await _settle(message, ack=False)
        finally:
            self.pending -= 1
            if not self.pending:
                self.idle.set()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> RabbitMQDelivery:
        # A class, not an async generator: a cancelled ``anext`` (a timeout around it) must
        # leave the iterator usable.
        while True:
            delivery = await self.buffer.get()
            if delivery._live():
                self.take(delivery)
                return delivery
            # Its channel died: RabbitMQ delivers the message again.

    async def close(self) -> None:
        self.closing = True
        if self._lease_task is not None:
            self._lease_task.cancel()
        if self._qos_task is not None:
            self._qos_wanted.set()
            try:
                await asyncio.wait_for(self._qos_task, 5)
            except (TimeoutError, asyncio.CancelledError):
                pass
        link = self.broker._link
        if link is not None:
            link.unregister(self.key)
        channel = self.channel
        if channel is None:
            return
        if channel.is_closed:
            # Closed already (server, lost connection, the loop's end): still closed through
            # aio-pika, which waits for its close callbacks' tasks.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), 5)
            return
        try:
            if self.tag is not None and self.underlay is not None:
                await self.underlay.basic_cancel(self.tag)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self.idle.wait()
            # Received but never handed to the worker: not a delivery attempt.
            while not self.buffer.empty():
                delivery = self.buffer.get_nowait()
                if delivery._live():
                    await delivery.hand_back()
            # Handed to the worker and not settled: back to the queue at once (counted).
            for delivery in list(self.held.values()):
                if delivery._live():
                    delivery._settled = True
                    with contextlib.suppress(Exception):
                        await _settle(delivery._message, ack=False)
            self.held.clear()
        finally:
            with contextlib.suppress(Exception):
                await channel.close()


class RabbitMQBroker:
    """A :class:`~qtasks.components.Broker` on RabbitMQ (aio-pika).

    ``queue`` names the work queue (other objects are named after it); ``queue_type`` is
    ``"classic"`` (priorities through ``x-max-priority``) or ``"quorum"`` (replicated, counts
    deliveries itself; no priorities before RabbitMQ 4). ``queue_version`` is the classic
    queues' ``x-queue-version`` (0, the default, leaves it to the server). ``heartbeat`` is the AMQP
    heartbeat in seconds (unless the URL sets one). ``publish_timeout`` bounds how long a
    publish waits for a lost connection to come back before raising. They are checked as
    :class:`~qtasks_rabbitmq.settings.RabbitMQSettings` (a bad value raises
    :class:`~qtasks.errors.ConfigError`).
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
    ) -> None:
        settings = RabbitMQSettings(
            queue=queue,
            queue_type=queue_type,
            max_priority=max_priority,
            queue_version=queue_version,
            heartbeat=heartbeat,
            connect_timeout=connect_timeout,
            publish_timeout=publish_timeout,
        )
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
        self._starts = 0
        self._link: Link | None = None
        self._consumers: dict[int, _Consumer] = {}
        self._published: OrderedDict[str, None] = OrderedDict()
        self._cancelled: set[str] = set()

    @classmethod
    def from_config(cls, config: QueueConfig) -> Self:
        """Build from ``config.broker_url`` and the ``rabbitmq_*`` keys of ``config.extra``."""
        settings = RabbitMQSettings.from_extra(config.extra)
        return cls(config.broker_url or DEFAULT_URL, **dataclasses.asdict(settings))

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
        """How many times the connection was restored since start."""
        return self._link.reconnects if self._link is not None else 0

    def _require_link(self) -> Link:
        if self._link is None:
            raise ComponentNotStartedError("RabbitMQBroker used before start()")
        return self._link

    async def start(self, stack: AsyncExitStack, config: QueueConfig) -> None:
        """Connect and declare. Started again (apps sharing this broker), it only counts: the
        connection closes when the last of the stacks closes. Started from another event loop
        while the link's loop is gone without having closed it, it forgets that link and
        connects again. An unknown or ill-typed ``rabbitmq_*`` key in ``config.extra`` raises
        :class:`~qtasks.errors.ConfigError` (the keys are read by :meth:`from_config`)."""
        check_options(config.extra)
        if self._link is not None and self._link.loop is not asyncio.get_running_loop():
            self._link.abandon()
            self._link, self._starts = None, 0
            self._consumers.clear()
        if self._link is not None:
            self._starts += 1
            stack.push_async_callback(self._release)
            return
        self._max_deliveries = config.max_deliveries
        self._max_running = config.max_tasks_process
        topology = self._topology
        self._topology = dataclasses.replace(topology, delivery_limit=config.max_deliveries)
        self._lease = config.lease
        settings = self._settings
        link = Link(
            self._url,
            self._topology,
            heartbeat=settings.heartbeat,
            connect_timeout=settings.connect_timeout,
            publish_timeout=settings.publish_timeout,
        )
        await link.start(AsyncExitStack())  # closed by _release, when the last user goes
        self._link = link
        self._starts = 1
        stack.push_async_callback(self._release)

    async def _release(self) -> None:
        if self._link is None or self._link.loop is not asyncio.get_running_loop():
            return  # a stack of a loop already left (see start)
        self._starts -= 1
        if self._starts == 0 and self._link is not None:
            link, self._link = self._link, None
            await link.close()

    # publishing

    def _message(
        self, id: str, priority: int, deliveries: int, extra: dict[str, Any] | None = None
    ) -> Basic.Properties:
        # Only what differs from the defaults travels in headers: encoding an AMQP table is a
        # good part of a publish's cost. The id is the message id (a short string); an id too
        # long for that goes in a header instead.
        headers: dict[str, Any] = dict(extra) if extra else {}
        if priority:
            headers[H_PRIORITY] = priority
        if deliveries:
            headers[H_DELIVERIES] = deliveries
        message_id: str | None = id
        if len(id) > _MAX_MESSAGE_ID or not id.isascii():
            headers[H_ID] = id
            message_id = None
        return Basic.Properties(
            headers=headers or None,
            priority=self._topology.amqp_priority(priority),
            delivery_mode=PERSISTENT,
            message_id=message_id,
        )

    async def _send(
        self, id: str, body: bytes, priority: int, deliveries: int, eta: float | None
    ) -> None:
        link = self._require_link()
        wait = delay_ms(eta - time.time()) if eta is not None else 0
        if wait > 0:
            assert eta is not None
            properties = self._message(id, priority, deliveries, {H_ETA: _ms(eta)})
            await link.publish(
                body, properties, self._topology.entry_exchange, delay_routing_key(wait), id
            )
        else:
            properties = self._message(id, priority, deliveries)
            await link.publish(body, properties, "", self._topology.queue, id)

    async def _bury(
        self, id: str, body: bytes, priority: int, deliveries: int, reason: str
    ) -> None:
        extra = {H_REASON: reason[:4000], H_DEAD_AT: _ms(time.time())}
        properties = self._message(id, priority, deliveries, extra)
        await self._require_link().publish(
            body, properties, "", self._topology.dead, id, what="dead letter"
        )

    async def publish(self, envelope: Envelope) -> None:
        await self._send(envelope.id, envelope.body, envelope.priority, 0, envelope.eta)
        self._published[envelope.id] = None
        if len(self._published) > _TRACKED_IDS:
            self._published.popitem(last=False)

    # consuming

    async def _receive(
        self, consumer: _Consumer, generation: int, message: DeliveredMessage
    ) -> RabbitMQDelivery | None:
        """Turn a raw message into a delivery, or deal with it here and return ``None``.

        Normal messages take no ``await`` on the way, so they reach the worker in order."""
        properties = message.header.properties
        headers = properties.headers or {}
        id = (
            _as_str(headers.get(H_ID)) or properties.message_id or f"unknown-{uuid_mod.uuid4().hex}"
        )
        priority = _as_int(headers.get(H_PRIORITY), 0)
        deliveries = max(_as_int(headers.get(H_DELIVERIES), 0), 0)
        eta_ms = _as_int(headers.get(H_ETA), 0)
        eta = eta_ms / 1000 if eta_ms else None
        body = message.body
        if eta is not None and eta - time.time() > 0.001:
            # Longer than one pass through the delay chain (or a clock ahead): wait again.
            await self._settle_with(message, self._send(id, body, priority, deliveries, eta))
            return None
        if self._published:
            self._published.pop(id, None)
        if self._cancelled and id in self._cancelled:
            self._cancelled.discard(id)
            await _settle(message, ack=True)
            return None
        redelivered = bool(message.redelivered)
        if self._topology.queue_type == "quorum":
            done = deliveries + max(_as_int(headers.get("x-delivery-count"), 0), 0)
        else:
            done = deliveries + (1 if redelivered else 0)
        if done >= self._max_deliveries:
            reason = (
                f"delivery limit reached: delivered {done} times without being settled "
                f"(max_deliveries={self._max_deliveries})"
            )
            await self._settle_with(message, self._bury(id, body, priority, done, reason))
            return None
        if redelivered and self._topology.queue_type == "classic":
            # A classic queue does not count deliveries: count this one in the header.
            await self._settle_with(message, self._send(id, body, priority, done, None))
            return None
        return RabbitMQDelivery(consumer, generation, message, id, priority, done + 1)

    @staticmethod
    async def _settle_with(message: DeliveredMessage, publish: Awaitable[None]) -> None:
        await publish
        await _settle(message, ack=True)

    @asynccontextmanager
    async def consume(self, *, prefetch: int) -> AsyncIterator[AsyncIterator[RabbitMQDelivery]]:
        """Open a consumer that holds at most ``prefetch`` messages (at least 1) beyond those it
        handed out and that are not settled yet (``basic.qos``, adjusted as deliveries are
        taken and settled)."""
        link = self._require_link()
        consumer = _Consumer(self, prefetch)
        link.register(consumer.key, consumer.reopen, consumer.alive)
        self._consumers[consumer.key] = consumer
        try:
            connection, generation = await link.connection()
            try:
                await consumer.reopen(connection, generation)
            except Exception as exc:
                link.lost(f"opening a consumer failed: {type(exc).__name__}")
            yield consumer
        finally:
            self._consumers.pop(consumer.key, None)
            await consumer.close()

    # inspection and management

    async def cancel(self, id: str) -> bool:
        """Drop a message published by *this process* and not yet received here.

        RabbitMQ cannot remove a message from the middle of a queue: the id is remembered and
        the message is acked and skipped when a consumer of this process receives it. A message
        taken by another process is not affected here; the worker there skips it because its
        stored record is already cancelled."""
        if id in self._published:
            del self._published[id]
            self._cancelled.add(id)
            return True
        return False

    async def _channel(self) -> AbstractChannel:
        connection, _ = await self._require_link().connection()
        return await connection.channel(publisher_confirms=False)

    async def stats(self) -> BrokerStats:
        """Ready, delayed and dead counts from RabbitMQ; ``in_flight`` counts the deliveries
        held by consumers of this process (AMQP does not report other consumers' unacked
        messages). RabbitMQ does not count by priority: all ready messages are reported
        under priority 0."""
        channel = await self._channel()
        try:

            async def count(name: str) -> int:
                queue = await channel.declare_queue(name, passive=True)
                result = queue.declaration_result
                return int(result.message_count or 0)

            ready = await count(self._topology.queue)
            dead = await count(self._topology.dead)
            delayed = 0
            for bit in range(LEVELS):
                delayed += await count(self._topology.level(bit))
        finally:
            await channel.close()
        in_flight = sum(len(c.held) + c.buffer.qsize() for c in self._consumers.values())
        return BrokerStats({0: ready} if ready else {}, delayed, in_flight, dead)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters (read without removing them)."""
        channel = await self._channel()
        letters: list[DeadLetter] = []
        try:
            queue = await channel.declare_queue(self._topology.dead, passive=True)
            while len(letters) < limit:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                letters.append(_dead_letter(message))
        finally:
            await channel.close()  # hands every message back, in order
        return letters

    async def requeue_dead_letters(self, ids: list[str] | None = None) -> int:
        """Publish dead letters to the work queue again, with their delivery count reset."""
        wanted = None if ids is None else set(ids)
        channel = await self._channel()
        moved = 0
        try:
            queue = await channel.declare_queue(self._topology.dead, passive=True)
            total = int(queue.declaration_result.message_count or 0)
            for _ in range(total):
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                letter = _dead_letter(message)
                if wanted is not None and letter.id not in wanted:
                    continue  # left unacked: the channel close puts it back
                await self._send(letter.id, letter.body, letter.priority, 0, None)
                await message.ack()
                moved += 1
        finally:
            await channel.close()
        return moved


async def _settle(message: DeliveredMessage, *, ack: bool) -> None:
    """Ack, or nack with requeue, on the channel the message came from.

    The frame is queued for the socket without waiting for the write buffer to drain: an ack
    is one-way in AMQP, so draining would tell nothing more, and the wait costs a loop turn."""
    tag = message.delivery_tag
    assert tag is not None, "a consumed message always has a delivery tag"
    if ack:
        await message.channel.basic_ack(tag, wait=False)
    else:
        await message.channel.basic_nack(tag, requeue=True, wait=False)


def _dead_letter(message: AbstractIncomingMessage) -> DeadLetter:
    headers = message.headers or {}
    id = _as_str(headers.get(H_ID)) or message.message_id or "unknown"
    reason = _as_str(headers.get(H_REASON))
    dead_at_ms = _as_int(headers.get(H_DEAD_AT), 0)
    dead_at = dead_at_ms / 1000 if dead_at_ms else None
    if reason is None:
        reason, dead_at = _server_reason(headers)
    return DeadLetter(
        id=id,
        body=message.body,
        reason=reason,
        priority=_as_int(headers.get(H_PRIORITY), 0),
        deliveries=_as_int(headers.get(H_DELIVERIES), 0),
        dead_at=dead_at or 0.0,
    )


def _server_reason(headers: dict[str, Any]) -> tuple[str, float | None]:
    """A reason for a message RabbitMQ dead-lettered itself, from its ``x-death`` header."""
    deaths = headers.get("x-death")
    if not isinstance(deaths, list) or not deaths or not isinstance(deaths[0], dict):
        return "dead-lettered by RabbitMQ (no reason recorded)", None
    death = cast(dict[str, Any], deaths[0])
    why = _as_str(death.get("reason")) or "unknown"
    queue = _as_str(death.get("queue")) or "?"
    when = death.get("time")
    dead_at = when.timestamp() if isinstance(when, datetime) else None
    if why == "delivery_limit":
        return f"delivery limit reached: RabbitMQ's x-delivery-limit on queue {queue!r}", dead_at
    return f"dead-lettered by RabbitMQ: {why} in queue {queue!r}", dead_at
