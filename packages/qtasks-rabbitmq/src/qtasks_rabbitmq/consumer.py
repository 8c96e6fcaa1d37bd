"""Consuming: a consumer channel per ``consume()``, what a received message becomes, and the
contract's lease and prefetch kept on top of AMQP's unacked messages.

A received message becomes a :class:`~qtasks_rabbitmq.delivery.RabbitMQDelivery` for the
worker, or is dealt with on arrival (:meth:`Consumer.receive`): still early (a delay longer
than one pass of the chain), cancelled by this process, past ``max_deliveries`` (buried), or a
redelivery on a classic queue (published again with its count in ``x-qtasks-deliveries``).
A *suspect* (a delivery from :func:`~qtasks.components.alone_from` on: its earlier deliveries
were lost with their holders) is kept apart (:mod:`qtasks_rabbitmq.apart`): the consumer stops
consuming, hands back uncounted what it received and had not handed out, hands the suspect out
alone and consumes again only once it is settled or lost.
A received message is settled once: after its ack (a copy or dead letter published first),
nothing nacks it, whatever follows (the worker's notice of a dead letter, :meth:`Consumer.tell`).
The channel's state (:class:`~qtasks_rabbitmq.apart.ChannelState`) is shared with keeping a
suspect apart.

Over ~500 lines: one consumer whose receive path, lease and qos loops and reopen share its
channel state; the suspect's keeping apart is already in :mod:`qtasks_rabbitmq.apart`.
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
from collections.abc import Awaitable, Callable
from typing import Self, cast

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import DeliveredMessage

from qtasks import stopping
from qtasks.components import Buried, alone_from
from qtasks_rabbitmq.apart import Apart, ChannelState, cancel, read_outcome
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
        wanted: Callable[[], int] | None = None,
    ) -> None:
        self.link = link
        self.buried = buried
        self.publisher = publisher
        self.published = published
        self.topology = publisher.topology
        self.prefetch = max(prefetch, 1)
        self.wanted = wanted
        """How many messages the worker would take now (see
        :meth:`qtasks.components.Broker.consume`): fewer at hand than ``prefetch`` when it
        wants fewer (:meth:`ahead`)."""
        self.lease = lease
        self.max_running = max_running
        self.max_deliveries = max_deliveries
        self.alone = alone_from(max_deliveries)
        """The first delivery of a message that is a suspect, kept apart."""
        self.key = next(self._keys)
        self.state = ChannelState(self.topology.queue, uuid_mod.uuid4().hex[:12])
        self.keeper = Apart(
            self.state,
            self._on_message,
            lambda generation, exc: self._closed(generation, "keeping a suspect apart failed", exc),
        )
        self.qos = 0
        self.dynamic = self.topology.queue_type == "classic"
        self._qos_wanted = asyncio.Event()
        self._qos_task: asyncio.Task[None] | None = None
        self._lease_task: asyncio.Task[None] | None = None
        self.down_since: float | None = time.monotonic()
        """Since when (monotonic) this consumer is not consuming against its will: not opened
        yet, or its channel closed (a lost connection, a cancel by the server) and not open
        again; ``None`` while it consumes (:meth:`stalled`)."""
        self.untold: deque[tuple[str, str]] = deque()
        """Id and reason of each message this consumer dead-lettered whose notice
        (``buried``) was not given yet, or failed (:meth:`tell`)."""
        self._retell_task: asyncio.Task[None] | None = None

    # Read-only views of the channel's state and the suspect kept apart.

    @property
    def channel(self) -> AbstractChannel | None:
        return self.state.channel

    @property
    def underlay(self) -> aiormq.Channel | None:
        return self.state.underlay

    @property
    def tag(self) -> str | None:
        return self.state.tag

    @property
    def paused(self) -> bool:
        return self.state.paused

    @property
    def buffer(self) -> asyncio.Queue[RabbitMQDelivery]:
        return self.state.buffer

    @property
    def held(self) -> dict[str, RabbitMQDelivery]:
        return self.state.held

    @property
    def apart(self) -> RabbitMQDelivery | None:
        return self.keeper.suspect

    def alive(self) -> bool:
        return self.state.alive()

    def stalled(self, now: float) -> float:
        """Seconds this consumer has not been consuming against its will (``0.0`` while it
        consumes or keeps a suspect apart); see :meth:`RabbitMQBroker.consume_stalled`."""
        if self.down_since is None and not self.state.closing and not self.state.alive():
            self.down_since = now  # closed without a callback telling (a safety net)
        return 0.0 if self.down_since is None else now - self.down_since

    # basic.qos counts every unacked message, but ``prefetch`` bounds only those not yet handed
    # to the worker. Classic queues: a channel-wide (global) qos of ``prefetch`` plus what the
    # worker holds, at most (the bound), and at least that less ``slack`` (about half of
    # ``prefetch``: the consumer keeps at least about half of it at hand). It is sent in the
    # background only when what the worker holds moved it out of that band, and then to the
    # band's middle, so a worker taking and settling one at a time, whose holding goes up and
    # down by one, sends none: kept exact, it cost a round trip every few tasks (issue 21).
    # ``prefetch`` there is :meth:`ahead`: fewer when the worker wants fewer (its runs are
    # long, qtasks.hold), the band then narrower (none at 1 or 2).
    # RabbitMQ applies a changed global limit at once; a lowered one goes out after the
    # settle that called for it, so RabbitMQ may first fill the window the old one left
    # (sent before, it would make the settle wait for the server's answer). Quorum queues
    # refuse global qos and per-consumer qos is fixed at basic.consume, so there it is
    # ``prefetch`` plus ``max_tasks_process`` (what a worker may hold running).

    def ahead(self) -> int:
        """How many messages to keep at hand beyond those handed out: ``prefetch`` (at least
        1), or what the worker wants when that is fewer (none when it wants none)."""
        wanted = self.wanted
        if wanted is None:
            return self.prefetch
        want = wanted()
        if want >= self.prefetch:
            return self.prefetch
        return want if want > 0 else 0

    def take(self, delivery: RabbitMQDelivery) -> None:
        delivery.lease_until = time.monotonic() + self.lease
        self.state.held[delivery.token] = delivery
        if self.dynamic:
            ahead = self.ahead()
            if self.qos < len(self.state.held) + ahead - _slack(ahead):
                self._qos_wanted.set()

    async def _lease_loop(self) -> None:
        """RabbitMQ holds an unacked message until its channel closes; the contract's lease is
        kept here: a delivery not settled or extended within ``config.lease`` is handed back
        (``basic.nack`` with requeue, so it counts as a delivery) and its holder is fenced."""
        lease = self.lease
        while not self.state.closing:
            await asyncio.sleep(min(lease / 4, 1.0))
            now = time.monotonic()
            for delivery in [d for d in self.state.held.values() if d.lease_until <= now]:
                await delivery._expire()

    def release(self, token: str) -> None:
        self.keeper.released(token)
        held = self.state.held
        if held.pop(token, None) is None or not self.dynamic:
            return
        if self.qos > len(held) + self.ahead():
            self._qos_wanted.set()

    async def _qos_loop(self) -> None:
        while True:
            await self._qos_wanted.wait()
            self._qos_wanted.clear()
            if self.state.closing:
                return
            ahead = self.ahead()
            most = len(self.state.held) + ahead
            channel = self.state.channel
            if channel is None or channel.is_closed or not self.dynamic:
                continue
            slack = _slack(ahead)
            if most - slack <= self.qos <= most:
                continue
            target = max(most - slack // 2, 1)  # 0 would be no limit at all
            if target == self.qos:
                continue
            # Shielded: aiormq closes a channel whose RPC is cancelled mid-flight. Its outcome
            # is read even when this loop is cancelled first (the consumer's close).
            rpc = asyncio.ensure_future(channel.set_qos(prefetch_count=target, global_=True))
            rpc.add_done_callback(read_outcome)
            try:
                await asyncio.shield(rpc)
                self.qos = target
            except Exception:
                continue  # the channel is dying; reopen sets qos again

    def healthy(self) -> bool:
        """For the link's watchdog: consuming, or being (re)opened right now (not consuming
        yet, but not dead either)."""
        return self.state.lock.locked() or self.state.alive()

    async def reopen(self, connection: AbstractConnection, generation: int) -> None:
        """Open this consumer on ``connection`` (after a reconnect), within the link's
        connect timeout: a server that stops answering fails the reopen (the link then
        reconnects) rather than holding the lock that :meth:`close` waits for."""
        async with self.state.lock, asyncio.timeout(self.link.connect_timeout):
            await self._reopen(connection, generation)

    async def _reopen(self, connection: AbstractConnection, generation: int) -> None:
        if self.state.closing or (self.state.generation == generation and self.state.alive()):
            return
        channel = await connection.channel(publisher_confirms=False)
        self.state.held.clear()  # deliveries of the old channel are stale now
        if self.dynamic:
            self.qos = max(self.ahead(), 1)
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
        self.state.generation = generation
        self.state.retired = []  # of the old channel
        # A suspect kept apart on the old channel: RabbitMQ delivers it again. Forgotten once
        # the generation moved, so that a message of the old channel still being received
        # meanwhile cannot keep itself apart on the new one (keep_apart checks it is live).
        self.keeper.end()
        self.state.channel = channel
        self.state.underlay = cast(aiormq.Channel, underlay)
        # Straight on aiormq: aio-pika would wrap every message in an IncomingMessage and
        # a second task; the worker needs the raw frame only. The tag is known before the
        # first message comes: a suspect among the first cancels the consumer by it.
        self.state.tag = self.state.new_tag()
        await underlay.basic_consume(
            self.link.topology.queue,
            functools.partial(self._on_message, generation),
            consumer_tag=self.state.tag,
        )
        self.down_since = None
        if self.state.closing:  # a close that gave up waiting for this reopen (its stop's deadline)
            await _quietly(channel.close())

    def _closed(self, generation: int, what: str, exc: BaseException | None) -> None:
        # A closed link ignores this (``Link.lost`` checks), as it does once the broker stopped.
        if generation == self.state.generation and not self.state.closing:
            if self.down_since is None:
                self.down_since = time.monotonic()
            self.link.lost(what if exc is None else f"{what}: {type(exc).__name__}")

    async def _on_message(self, generation: int, message: DeliveredMessage) -> None:
        if generation != self.state.generation:
            return  # from a channel already replaced; RabbitMQ redelivers it
        self.state.pending += 1
        self.state.idle.clear()
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
            if self.state.closing:
                await delivery.hand_back()
                return
            if delivery.attempt >= self.alone or self.keeper.suspect is not None:
                await self.keep_apart(delivery)
                return
            self.state.buffer.put_nowait(delivery)
        finally:
            self.state.pending -= 1
            if not self.state.pending:
                self.state.idle.set()

    async def keep_apart(self, delivery: RabbitMQDelivery) -> None:
        """Keep a suspect apart (:meth:`qtasks_rabbitmq.apart.Apart.keep`)."""
        await self.keeper.keep(delivery)

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
            delivery = await self.state.buffer.get()
            if delivery._live():
                self.take(delivery)
                return delivery
            # Its channel died: RabbitMQ delivers the message again.

    async def tell(self) -> None:
        """Give the worker the notices of :attr:`untold`, oldest first. One that fails (its
        ``buried`` returned False: the record could not be written, a storage outage; or it
        raised, which the contract says it must not) is kept and given again later, backing
        off up to :data:`RETELL_CAP` seconds, in a task of its own, until it is given or the
        consumer closes (which gives it once more): its message is settled already
        (dead-lettered), so nothing else is redone, and the record ends as with the other
        brokers. While that task retries, the notices of later dead letters are left to it,
        so that received messages do not wait on a storage that is down."""
        if self._retelling() or await self._give() or self.state.closing:
            return
        self._retell_task = asyncio.create_task(self._retell(), name="qtasks-rabbitmq-retell")

    def _retelling(self) -> bool:
        return self._retell_task is not None and not self._retell_task.done()

    async def _give(self) -> bool:
        """Give the notices of :attr:`untold`; ``False`` once one fails (it is kept, first).
        One cut short (a cancel) is kept too: the core's notice ends a record only if it is
        not final yet, so giving it again does not redo it."""
        notice = self.buried
        while notice is not None and self.untold:
            id, reason = self.untold.popleft()
            try:
                done = await notice(id, reason)
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
            if done is False:  # its record was not written (None, from older callables: done)
                self.untold.appendleft((id, reason))
                log.warning(
                    "qtasks_rabbitmq: the record of dead-lettered message %s could not be "
                    "ended; its notice is given again later",
                    id,
                )
                return False
        return True

    async def _retell(self) -> None:
        failures = 0
        while not self.state.closing:
            failures += 1
            await asyncio.sleep(min(RETELL_CAP, 0.1 * 2**failures))
            if self.state.closing or await self._give():
                return

    async def close(self) -> None:
        """Stop consuming: cancel the consumer, hand back what it received, close its
        channel, give the notices not given yet. Each wait on RabbitMQ ends within
        :data:`SHUT_WAIT` seconds and, in a stopping worker, by the stop's deadline
        (:mod:`qtasks.stopping`), so a server that does not answer (a network partition)
        cannot hold the stop. Nothing is lost by what is cut short: RabbitMQ requeues every
        message unacked on a channel when the channel or its connection closes (the
        broker's stop closes the connection)."""
        self.state.closing = True
        self.link.unregister(self.key)
        if self._retell_task is not None:  # what it gives is kept, and given below
            self._retell_task.cancel()
            await asyncio.wait([self._retell_task])
        # A reopen under way (the link reconnecting, bounded by connect_timeout) finishes
        # first: the channel and tasks it starts are the ones to stop, or it would go on
        # consuming for nobody.
        locked = False
        with stopping.shield("the consumer's reopen under way", self.link.connect_timeout):
            await self.state.lock.acquire()
            locked = True
        self._stop_loops()
        if locked:
            try:
                await self._shut()
            finally:
                self.state.lock.release()
        # The notices still untold are given once more, bounded, and then dropped with an
        # error logged: they live in this consumer only, and their messages are settled (in
        # Q.dead, with their reasons), so no other consumer would tell them. Their records
        # stay new/process until their TTL (requeue_dead_letters() puts their messages back).
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
        for task in (self._lease_task, self._qos_task):
            if task is not None:
                task.cancel()
        self.keeper.stop()

    async def _shut(self) -> None:
        """Cancel the consumer, hand back what it received, close its channel."""
        channel = self.state.channel
        if channel is None:
            return
        if not channel.is_closed:
            answered = False
            if self.state.paused:  # cancelled already, a suspect kept apart: that cancel answered
                pausing = self.keeper.pausing
                answered = True
                if pausing is not None:
                    with stopping.shield("the consumer's cancel", SHUT_WAIT):
                        answered = await _quietly(asyncio.shield(pausing))
            elif self.state.tag is not None and self.state.underlay is not None:
                with stopping.shield("the consumer's cancel", SHUT_WAIT):
                    answered = await _quietly(
                        cancel(self.state.underlay, self.state.tag, self.topology.queue)
                    )
            # Handed to the worker and not settled: back to the queue at once (counted).
            for delivery in list(self.state.held.values()):
                await delivery._expire()
            self.state.held.clear()
            if answered:  # unanswered: RabbitMQ requeues the rest when the channel closes
                with stopping.shield("the hand-back of received messages", SHUT_WAIT):
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(2):
                            await self.state.idle.wait()
                    # Received but never handed to the worker: not a delivery attempt.
                    staged, self.keeper.staged = self.keeper.staged, None
                    if staged is not None and staged._live():  # a suspect not handed out yet
                        await staged.hand_back()
                    while not self.state.buffer.empty():
                        delivery = self.state.buffer.get_nowait()
                        if delivery._live():
                            await delivery.hand_back()
        # Closed already (server, lost connection, the loop's end): still closed through
        # aio-pika, which waits for its close callbacks' tasks.
        with stopping.shield("the consumer channel's close", SHUT_WAIT):
            await _quietly(channel.close())


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


def _slack(ahead: int) -> int:
    """How far below ``held + ahead`` the qos may stay before it is raised (about half of
    ``ahead``, none for 2 or fewer)."""
    return (ahead - 1) // 2 if ahead > 1 else 0
