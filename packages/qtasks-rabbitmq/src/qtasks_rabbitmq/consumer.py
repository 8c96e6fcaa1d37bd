"""Consuming: a consumer channel per ``consume()``, what a received message becomes, and the
contract's lease and prefetch kept on top of AMQP's unacked messages.

A received message becomes a :class:`~qtasks_rabbitmq.delivery.RabbitMQDelivery` for the
worker, or is dealt with on arrival (:meth:`Consumer.receive`): still early (a delay longer
than one pass of the chain), cancelled by this process, past ``max_deliveries`` (buried), or a
redelivery on a classic queue (published again with its count in ``x-qtasks-deliveries``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
import uuid as uuid_mod
from collections.abc import Awaitable
from typing import Self, cast

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import DeliveredMessage

from qtasks.components import Buried
from qtasks_rabbitmq.delivery import RabbitMQDelivery
from qtasks_rabbitmq.link import Link
from qtasks_rabbitmq.publisher import Published, Publisher
from qtasks_rabbitmq.wire import H_DELIVERIES, H_ETA, H_ID, H_PRIORITY, as_int, as_str, settle

log = logging.getLogger("qtasks.rabbitmq")


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
        self.channel = channel
        self.underlay = cast(aiormq.Channel, underlay)
        # Straight on aiormq: aio-pika would wrap every message in an IncomingMessage and
        # a second task; the worker needs the raw frame only.
        ok = await underlay.basic_consume(
            self.link.topology.queue, functools.partial(self._on_message, generation)
        )
        self.tag = ok.consumer_tag

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
            delivery = await self.receive(generation, message)
            if delivery is None:
                return
            if self.closing:
                await delivery.hand_back()
                return
            self.buffer.put_nowait(delivery)
        except Exception:
            log.exception("qtasks_rabbitmq: handling a received message failed; requeued")
            with contextlib.suppress(Exception):
                await settle(message, ack=False)
        finally:
            self.pending -= 1
            if not self.pending:
                self.idle.set()

    async def receive(self, generation: int, message: DeliveredMessage) -> RabbitMQDelivery | None:
        """Turn a raw message into a delivery, or deal with it here and return ``None``.

        Normal messages take no ``await`` on the way, so they reach the worker in order."""
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
            await settle(message, ack=True)
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
                await self.buried(id, reason)
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

    async def close(self) -> None:
        self.closing = True
        self.link.unregister(self.key)
        # A reopen under way (the link reconnecting) finishes first: the channel and tasks it
        # starts are the ones to stop, or it would go on consuming for nobody.
        async with self._lock:
            await self._stop_loops()
            await self._shut()

    async def _stop_loops(self) -> None:
        if self._lease_task is not None:
            self._lease_task.cancel()
        if self._qos_task is not None:
            self._qos_wanted.set()
            try:
                await asyncio.wait_for(self._qos_task, 5)
            except (TimeoutError, asyncio.CancelledError):
                pass

    async def _shut(self) -> None:
        """Cancel the consumer, hand back what it received, close its channel."""
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
                await delivery._expire()
            self.held.clear()
        finally:
            with contextlib.suppress(Exception):
                await channel.close()


async def _settle_with(message: DeliveredMessage, publish: Awaitable[None]) -> None:
    await publish
    await settle(message, ack=True)
