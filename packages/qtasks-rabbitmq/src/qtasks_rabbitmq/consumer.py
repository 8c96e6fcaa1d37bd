"""Consuming: a consumer channel per ``consume()``, what a received message becomes, and the
contract's lease and prefetch kept on top of AMQP's unacked messages.

A received message becomes a :class:`~qtasks_rabbitmq.delivery.RabbitMQDelivery` for the
worker, or is dealt with on arrival (:meth:`Consumer.receive`): still early (a delay longer
than one pass of the chain), cancelled by this process, past ``max_deliveries`` (buried), or a
redelivery on a classic queue (published again with its count in ``x-qtasks-deliveries``).
A *suspect* (a delivery from :func:`~qtasks.components.alone_from` on: its earlier deliveries
were lost with their holders) is kept apart (:meth:`Consumer.keep_apart`): the consumer stops
consuming, hands back uncounted what it received and had not handed out, hands the suspect out
alone and consumes again only once it is settled or lost.
A received message is settled once: after its ack (a copy or dead letter published first),
nothing nacks it, whatever follows (the worker's notice of a dead letter, :meth:`Consumer.tell`).

Over ~600 lines: the receive path, the lease and qos loops, keeping a suspect apart and the
close all read and change one channel's state (its generation, tag, held deliveries, buffer,
pause) under one lock, and their orderings are what the tests pin (a reconnect during a
receipt, a close while a suspect is kept apart). Moving keeping-apart into a module of its own,
over an explicit channel-state object, is the next step (session 22's note).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
import uuid as uuid_mod
from collections import deque
from collections.abc import Awaitable
from typing import Any, Self, cast

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import DeliveredMessage

from qtasks import stopping
from qtasks.components import Buried, alone_from
from qtasks_rabbitmq.delivery import RabbitMQDelivery
from qtasks_rabbitmq.link import Link
from qtasks_rabbitmq.publisher import Published, Publisher
from qtasks_rabbitmq.wire import H_DELIVERIES, H_ETA, H_ID, H_PRIORITY, as_int, as_str, settle

log = logging.getLogger("qtasks.rabbitmq")

SHUT_WAIT = 5.0
"""Seconds each step of a consumer's close (its ``basic.cancel``, the hand-back of what it
received, its channel's close) waits on RabbitMQ at most, as the link's own closes do."""

RETELL_CAP = 5.0
"""Longest pause, in seconds, between two tries of a dead letter's notice that failed."""


class Consumer:
    """A consumer channel on the current connection, re-opened after every reconnect."""

    _keys = itertools.count()

    def __init__(
        self,
        link: Link,
        publisher: Publisher,
        published: Published,
        *,
        prefetch: int,
        lease: float,
        max_running: int,
        max_deliveries: int,
        buried: Buried | None = None,
    ) -> None:
        self.link = link
        self.buried = buried
        self.publisher = publisher
        self.published = published
        self.topology = publisher.topology
        self.prefetch = max(prefetch, 1)
        self.lease = lease
        self.max_running = max_running
        self.max_deliveries = max_deliveries
        self.alone = alone_from(max_deliveries)
        """The first delivery of a message that is a suspect, kept apart."""
        self.apart: RabbitMQDelivery | None = None
        """The suspect kept apart, from its receipt until it is settled or lost (or its
        channel is gone): the consumer consumes nothing meanwhile."""
        self.staged: RabbitMQDelivery | None = None
        """The suspect kept apart while what was received beside it is handed back, before
        it goes to :attr:`buffer` (handed back by :meth:`close` if it is still here)."""
        self.paused = False
        """Not consuming on purpose (a suspect kept apart): the watchdog sees it alive."""
        self._apart_over = asyncio.Event()
        self._pausing: asyncio.Future[Any] | None = None
        self._apart_task: asyncio.Task[None] | None = None
        self.retired: list[str] = []
        """Consumer tags cancelled to keep a suspect apart whose callbacks aiormq still holds
        (late deliveries for them are received); dropped once the consumer consumes again."""
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
        self.dynamic = self.topology.queue_type == "classic"
        self.slack = (self.prefetch - 1) // 2
        self._qos_wanted = asyncio.Event()
        self._qos_task: asyncio.Task[None] | None = None
        self._lease_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.untold: deque[tuple[str, str]] = deque()
        """Id and reason of each message this consumer dead-lettered whose notice
        (``buried``) was not given yet, or failed (:meth:`tell`)."""
        self._retell_task: asyncio.Task[None] | None = None

    # basic.qos counts every unacked message, but ``prefetch`` bounds only those not yet handed
    # to the worker. Classic queues: a channel-wide (global) qos of ``prefetch`` plus what the
    # worker holds, at most (the bound), and at least that less ``slack`` (about half of
    # ``prefetch``: the consumer keeps at least about half of it at hand). It is sent in the
    # background only when what the worker holds moved it out of that band, and then to the
    # band's middle, so a worker taking and settling one at a time, whose holding goes up and
    # down by one, sends none: kept exact, it cost a round trip every few tasks (issue 21).
    # RabbitMQ applies a changed global limit at once; a lowered one goes out after the
    # settle that called for it, so RabbitMQ may first fill the window the old one left
    # (sent before, it would make the settle wait for the server's answer). Quorum queues
    # refuse global qos and per-consumer qos is fixed at basic.consume, so there it is
    # ``prefetch`` plus ``max_tasks_process`` (what a worker may hold running).

    def take(self, delivery: RabbitMQDelivery) -> None:
        delivery.lease_until = time.monotonic() + self.lease
        self.held[delivery.token] = delivery
        if self.dynamic and self.qos < len(self.held) + self.prefetch - self.slack:
            self._qos_wanted.set()

    async def _lease_loop(self) -> None:
        """RabbitMQ holds an unacked message until its channel closes; the contract's lease is
        kept here: a delivery not settled or extended within ``config.lease`` is handed back
        (``basic.nack`` with requeue, so it counts as a delivery) and its holder is fenced."""
        lease = self.lease
        while not self.closing:
            await asyncio.sleep(min(lease / 4, 1.0))
            now = time.monotonic()
            for delivery in [d for d in self.held.values() if d.lease_until <= now]:
                await delivery._expire()

    def release(self, token: str) -> None:
        apart = self.apart
        if apart is not None and apart.token == token:
            self.apart = None
            self._apart_over.set()
        held = self.held
        if held.pop(token, None) is None or not self.dynamic:
            return
        if self.qos > len(held) + self.prefetch:
            self._qos_wanted.set()

    async def _qos_loop(self) -> None:
        while True:
            await self._qos_wanted.wait()
            self._qos_wanted.clear()
            if self.closing:
                return
            most = len(self.held) + self.prefetch
            channel = self.channel
            if channel is None or channel.is_closed or not self.dynamic:
                continue
            if most - self.slack <= self.qos <= most:
                continue
            target = most - self.slack // 2
            # Shielded: aiormq closes a channel whose RPC is cancelled mid-flight. Its outcome
            # is read even when this loop is cancelled first (the consumer's close).
            rpc = asyncio.ensure_future(channel.set_qos(prefetch_count=target, global_=True))
            rpc.add_done_callback(_read_outcome)
            try:
                await asyncio.shield(rpc)
                self.qos = target
            except Exception:
                continue  # the channel is dying; reopen sets qos again

    def holds(self, generation: int) -> bool:
        channel = self.channel
        return generation == self.generation and channel is not None and not channel.is_closed

    def alive(self) -> bool:
        channel = self.channel
        if channel is None or channel.is_closed:
            return False
        if self.paused:
            return True  # not consuming on purpose, while a suspect is kept apart
        if self.tag is None:
            return False
        return self.underlay is not None and self.tag in self.underlay.consumers

    def healthy(self) -> bool:
        """For the link's watchdog: consuming, or being (re)opened right now (not consuming
        yet, but not dead either)."""
        return self._lock.locked() or self.alive()

    async def reopen(self, connection: AbstractConnection, generation: int) -> None:
        """Open this consumer on ``connection`` (after a reconnect), within the link's
        connect timeout: a server that stops answering fails the reopen (the link then
        reconnects) rather than holding the lock that :meth:`close` waits for."""
        async with self._lock, asyncio.timeout(self.link.connect_timeout):
            await self._reopen(connection, generation)

    async def _reopen(self, connection: AbstractConnection, generation: int) -> None:
        if self.closing or (self.generation == generation and self.alive()):
            return
        channel = await connection.channel(publisher_confirms=False)
        self.held.clear()  # deliveries of the old channel are stale now
        if self.dynamic:
            self.qos = self.prefetch
            await channel.set_qos(prefetch_count=self.qos, global_=True)
        else:
            self.qos = self.prefetch + self.max_running
            await channel.set_qos(prefetch_count=self.qos)
        if self._qos_task is None:
            self._qos_task = asyncio.create_task(self._qos_loop(), name="qtasks-rabbitmq-qos")
            self._lease_task = asyncio.create_task(self._lease_loop(), name="qtasks-rabbitmq-lease")
        channel.close_callbacks.add(
            lambda _s, exc: self._closed(generation, "consumer channel closed", exc)
        )
        underlay = await channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(
            lambda _frame: self._closed(generation, "consumer cancelled by the server", None)
        )
        self.generation = generation
        self.retired = []  # of the old channel
        # A suspect kept apart on the old channel: RabbitMQ delivers it again. Forgotten once
        # the generation moved, so that a message of the old channel still being received
        # meanwhile cannot keep itself apart on the new one (keep_apart checks it is live).
        self._end_apart()
        self.channel = channel
        self.underlay = cast(aiormq.Channel, underlay)
        # Straight on aiormq: aio-pika would wrap every message in an IncomingMessage and
        # a second task; the worker needs the raw frame only. The tag is known before the
        # first message comes: a suspect among the first cancels the consumer by it.
        self.tag = self._new_tag()
        await underlay.basic_consume(
            self.link.topology.queue,
            functools.partial(self._on_message, generation),
            consumer_tag=self.tag,
        )
        if self.closing:  # a close that gave up waiting for this reopen (its stop's deadline)
            await _quietly(channel.close())

    def _closed(self, generation: int, what: str, exc: BaseException | None) -> None:
        # A closed link ignores this (``Link.lost`` checks), as it does once the broker stopped.
        if generation == self.generation and not self.closing:
            self.link.lost(what if exc is None else f"{what}: {type(exc).__name__}")

    async def _on_message(self, generation: int, message: DeliveredMessage) -> None:
        if generation != self.generation:
            return  # from a channel already replaced; RabbitMQ redelivers it
        self.pending += 1
        self.idle.clear()
        try:
            try:
                delivery = await self.receive(generation, message)
            except Exception:
                # ``receive`` raises only before it settled the message (a publish failed).
                log.exception(
                    "qtasks_rabbitmq: handling a received message failed; handed back to the queue"
                )
                with contextlib.suppress(Exception):
                    await settle(message, ack=False)
                return
            if self.untold:
                await self.tell()
            if delivery is None:
                return
            if self.closing:
                await delivery.hand_back()
                return
            if delivery.attempt >= self.alone or self.apart is not None:
                await self.keep_apart(delivery)
                return
            self.buffer.put_nowait(delivery)
        finally:
            self.pending -= 1
            if not self.pending:
                self.idle.set()

    async def keep_apart(self, delivery: RabbitMQDelivery) -> None:
        """A suspect (a delivery from :attr:`alone` on), or a message received while one is
        kept apart. A suspect kills its worker again, maybe: what the process holds then,
        received and not handed out, comes back counted too (RabbitMQ pushes up to the
        prefetch to the channel), and innocent messages follow it to the dead-letter queue.
        So the first suspect is kept apart: the consumer is cancelled (RabbitMQ pushes
        nothing more), what it received and had not handed out is handed back uncounted
        (published again with its count, the original acked), and only then is the suspect
        handed out, alone; once it is settled or lost (its lease run out) the consumer
        consumes again (:meth:`_keep_apart`). A message received meanwhile (pushed before the
        cancel took effect, another suspect among them) is handed back uncounted."""
        if self.apart is not None:
            await delivery.hand_back()
            return
        if not delivery._live():
            # Of a channel replaced meanwhile (a reconnect during its receipt's awaits):
            # RabbitMQ delivers it again; keeping it apart would cancel the new consumer.
            return
        self.apart = self.staged = delivery
        self.paused = True
        self._apart_over = asyncio.Event()
        beside: list[RabbitMQDelivery] = []
        buffer = self.buffer
        while not buffer.empty():
            beside.append(buffer.get_nowait())
        tag, underlay = self.tag, self.underlay
        self.tag = self._pausing = None
        if tag is not None and underlay is not None:
            self.retired.append(tag)
            # Shielded (aiormq closes a channel whose RPC is cancelled mid-flight); its
            # outcome is read even if nobody awaits it (the consumer's close cut in).
            self._pausing = asyncio.ensure_future(self._cancel(underlay, tag))
            self._pausing.add_done_callback(_read_outcome)
        self._apart_task = asyncio.create_task(
            self._keep_apart(delivery, self._apart_over), name="qtasks-rabbitmq-apart"
        )
        for other in beside:
            await other.hand_back()

    async def _keep_apart(self, suspect: RabbitMQDelivery, over: asyncio.Event) -> None:
        """Hand out ``suspect`` once the consumer's cancel is answered and what it received
        beside it is handed back; consume again once it is settled or lost. Woken by the
        settle (or the suspect's channel gone, or the consumer's close), never polling."""
        generation = suspect.generation
        try:
            pausing = self._pausing
            if pausing is not None:
                await asyncio.shield(pausing)
            # The messages pushed before the cancel's answer are being handed back: once
            # they are (the consumer idle), the suspect goes out alone.
            await self.idle.wait()
            if self.staged is suspect:
                self.staged = None
                if suspect._live():
                    self.buffer.put_nowait(suspect)
                elif self.apart is suspect:  # its channel is gone: nothing to wait for
                    self.apart = None
                    over.set()
            await over.wait()
            async with self._lock:
                if self.closing or not self.holds(generation) or self.apart is not None:
                    return
                underlay = self.underlay
                assert underlay is not None
                # Known before the first message comes (a suspect cancels the consumer by it).
                self.tag = tag = self._new_tag()
                self.paused = False
                retired, self.retired = self.retired, []
                rpc = asyncio.ensure_future(
                    underlay.basic_consume(
                        self.topology.queue,
                        functools.partial(self._on_message, generation),
                        consumer_tag=tag,
                    )
                )
                rpc.add_done_callback(_read_outcome)
                await asyncio.shield(rpc)
                # Dropped only now, or aiormq's dict grew by one per suspect for the channel's
                # life. Nothing more comes for those tags: their barriers were answered before
                # this consume was sent (what a quorum queue pushed across the cancel may
                # trail its barrier's answer: this second round trip is later still).
                for old in retired:
                    underlay.consumers.pop(old, None)
        except Exception as exc:
            self.paused = False
            self._closed(generation, "keeping a suspect apart failed", exc)

    async def _cancel(self, underlay: aiormq.Channel, tag: str) -> None:
        """Cancel the consumer ``tag``; return once RabbitMQ sent what it pushed for it
        before. A quorum queue may still push for it a moment after the cancel is answered
        (RabbitMQ 3.10 does), and aiormq drops a message for a tag it forgot: left unacked on
        the channel, it would come back counted. So the tag is cancelled without waiting
        for the answer (aiormq forgets it at once) and its callback kept: what still comes is
        received (handed back, while a suspect is kept apart or the consumer closes). The
        answer to a passive declare sent after the cancel comes after what RabbitMQ pushed
        before it (a classic queue pushes nothing later). A suspect's cancelled tag is
        dropped from aiormq once the consumer consumes again (:attr:`retired`); a close's,
        with the channel."""
        callback = underlay.consumers.get(tag)
        await underlay.basic_cancel(tag, nowait=True)
        if callback is not None:
            underlay.consumers.setdefault(tag, callback)
        await underlay.queue_declare(self.topology.queue, passive=True)

    def _new_tag(self) -> str:
        return f"qtasks.{self.uid}.{uuid_mod.uuid4().hex[:12]}"

    def _end_apart(self) -> None:
        """Forget the suspect kept apart (its channel is gone, or the consumer closes)."""
        self.apart = self.staged = None
        self.paused = False
        self._pausing = None
        self._apart_over.set()
        if self._apart_task is not None:
            self._apart_task.cancel()
            self._apart_task = None

    async def receive(self, generation: int, message: DeliveredMessage) -> RabbitMQDelivery | None:
        """Turn a raw message into a delivery, or deal with it here and return ``None``.

        Normal messages take no ``await`` on the way, so they reach the worker in order. It
        raises only before it settled the message; a message it dead-letters is added to
        :attr:`untold` (the caller tells it)."""
        properties = message.header.properties
        headers = properties.headers or {}
        id = as_str(headers.get(H_ID)) or properties.message_id or f"unknown-{uuid_mod.uuid4().hex}"
        priority = as_int(headers.get(H_PRIORITY), 0)
        deliveries = max(as_int(headers.get(H_DELIVERIES), 0), 0)
        eta_ms = as_int(headers.get(H_ETA), 0)
        eta = eta_ms / 1000 if eta_ms else None
        body = message.body
        publisher = self.publisher
        if eta is not None and eta - time.time() > 0.001:
            # Longer than one pass through the delay chain (or a clock ahead): wait again.
            await _settle_with(message, publisher.send(id, body, priority, deliveries, eta))
            return None
        if self.published.skip(id):
            await _ack(message)
            return None
        redelivered = bool(message.redelivered)
        if self.topology.queue_type == "quorum":
            done = deliveries + max(as_int(headers.get("x-delivery-count"), 0), 0)
        else:
            done = deliveries + (1 if redelivered else 0)
        if done >= self.max_deliveries:
            reason = (
                f"delivery limit reached: delivered {done} times without being settled "
                f"(max_deliveries={self.max_deliveries})"
            )
            await _settle_with(message, publisher.bury(id, body, priority, done, reason))
            if self.buried is not None:
                self.untold.append((id, reason))
            return None
        if redelivered and self.topology.queue_type == "classic":
            # A classic queue does not count deliveries: count this one in the header.
            await _settle_with(message, publisher.send(id, body, priority, done, None))
            return None
        return RabbitMQDelivery(self, generation, message, id, priority, done + 1)

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

    async def tell(self) -> None:
        """Give the worker the notices of :attr:`untold`, oldest first. One that raises (the
        contract says ``buried`` must not; a storage unreachable for a moment) is kept and
        given again later, backing off, until it is given or the consumer closes (which gives
        it once more): its message is settled already (dead-lettered), so nothing else is
        redone, and the record ends as with the other brokers."""
        if await self._give() or self.closing:
            return
        if self._retell_task is None or self._retell_task.done():
            self._retell_task = asyncio.create_task(self._retell(), name="qtasks-rabbitmq-retell")

    async def _give(self) -> bool:
        """Give the notices of :attr:`untold`; ``False`` once one fails (it is kept, first).
        One cut short (a cancel) is kept too: the core's notice ends a record only if it is
        not final yet, so giving it again does not redo it."""
        notice = self.buried
        while notice is not None and self.untold:
            id, reason = self.untold.popleft()
            try:
                await notice(id, reason)
            except BaseException as exc:
                self.untold.appendleft((id, reason))
                if not isinstance(exc, Exception):
                    raise
                log.exception(
                    "qtasks_rabbitmq: the notice that message %s was dead-lettered failed; "
                    "given again later",
                    id,
                )
                return False
        return True

    async def _retell(self) -> None:
        failures = 0
        while not self.closing:
            failures += 1
            await asyncio.sleep(min(RETELL_CAP, 0.1 * 2**failures))
            if self.closing or await self._give():
                return

    async def close(self) -> None:
        """Stop consuming: cancel the consumer, hand back what it received, close its
        channel, give the notices not given yet. Each wait on RabbitMQ ends within
        :data:`SHUT_WAIT` seconds and, in a stopping worker, by the stop's deadline
        (:mod:`qtasks.stopping`), so a server that does not answer (a network partition)
        cannot hold the stop. Nothing is lost by what is cut short: RabbitMQ requeues every
        message unacked on a channel when the channel or its connection closes (the
        broker's stop closes the connection)."""
        self.closing = True
        self.link.unregister(self.key)
        if self._retell_task is not None:  # what it gives is kept, and given below
            self._retell_task.cancel()
            await asyncio.wait([self._retell_task])
        # A reopen under way (the link reconnecting, bounded by connect_timeout) finishes
        # first: the channel and tasks it starts are the ones to stop, or it would go on
        # consuming for nobody.
        locked = False
        with stopping.shield("the consumer's reopen under way", self.link.connect_timeout):
            await self._lock.acquire()
            locked = True
        self._stop_loops()
        if locked:
            try:
                await self._shut()
            finally:
                self._lock.release()
        if self.untold:
            with stopping.shield("the dead letters' records", SHUT_WAIT):
                await self._give()
            for id, _ in self.untold:
                log.error(
                    "qtasks_rabbitmq: message %s was dead-lettered but its record could not "
                    "be ended (the notice kept failing until the consumer closed)",
                    id,
                )

    def _stop_loops(self) -> None:
        # Not waited for: a qos update under way goes on (shielded) and holds the channel's
        # next RPC, the consumer's cancel, which the bound of that one covers.
        for task in (self._lease_task, self._qos_task, self._apart_task):
            if task is not None:
                task.cancel()

    async def _shut(self) -> None:
        """Cancel the consumer, hand back what it received, close its channel."""
        channel = self.channel
        if channel is None:
            return
        if not channel.is_closed:
            answered = False
            if self.paused:  # cancelled already, a suspect kept apart: that cancel answered
                pausing = self._pausing
                answered = True
                if pausing is not None:
                    with stopping.shield("the consumer's cancel", SHUT_WAIT):
                        answered = await _quietly(asyncio.shield(pausing))
            elif self.tag is not None and self.underlay is not None:
                with stopping.shield("the consumer's cancel", SHUT_WAIT):
                    answered = await _quietly(self._cancel(self.underlay, self.tag))
            # Handed to the worker and not settled: back to the queue at once (counted).
            for delivery in list(self.held.values()):
                await delivery._expire()
            self.held.clear()
            if answered:  # unanswered: RabbitMQ requeues the rest when the channel closes
                with stopping.shield("the hand-back of received messages", SHUT_WAIT):
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(2):
                            await self.idle.wait()
                    # Received but never handed to the worker: not a delivery attempt.
                    staged, self.staged = self.staged, None
                    if staged is not None and staged._live():  # a suspect not handed out yet
                        await staged.hand_back()
                    while not self.buffer.empty():
                        delivery = self.buffer.get_nowait()
                        if delivery._live():
                            await delivery.hand_back()
        # Closed already (server, lost connection, the loop's end): still closed through
        # aio-pika, which waits for its close callbacks' tasks.
        with stopping.shield("the consumer channel's close", SHUT_WAIT):
            await _quietly(channel.close())


def _read_outcome(rpc: asyncio.Future[Any]) -> None:
    if not rpc.cancelled():
        rpc.exception()  # read, so that asyncio does not log it as never retrieved


async def _quietly(call: Awaitable[object]) -> bool:
    """Await an AMQP call of a consumer's close; whether it succeeded. A failure is
    swallowed, and so is the ``CancelledError`` aiormq raises into its pending calls when it
    gives up on a connection (its heartbeat): it must not reach a task nobody cancelled."""
    try:
        await call
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # a cancel of ours (the bound, the caller)
        return False
    except Exception:
        return False
    return True


async def _ack(message: DeliveredMessage) -> None:
    """Ack a received message; an ack that fails (its channel is gone) is left at that:
    RabbitMQ delivers the message again, and it is never nacked after its ack."""
    with contextlib.suppress(Exception):
        await settle(message, ack=True)


async def _settle_with(message: DeliveredMessage, publish: Awaitable[None]) -> None:
    """Publish (a copy, a dead letter), then ack the original; raises only if the publish
    fails (nothing is settled then)."""
    await publish
    await _ack(message)
