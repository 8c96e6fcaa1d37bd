"""The link comes back by itself: server-side connection close, consumer cancel."""

from __future__ import annotations

import asyncio
import struct
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aio_pika
import anyio
import pytest
from yarl import URL as Address

from qtasks.app import AsyncQueueTasks
from qtasks.config import QueueConfig
from qtasks.errors import BrokerConnectionError
from qtasks.messages import Envelope
from qtasks_rabbitmq import RabbitMQBroker
from qtasks_rabbitmq.link import Link

from .conftest import URL, BrokerFactory, close_connections, delete_topology, poll
from .test_broker import take

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq]


def envelope(body: bytes) -> Envelope:
    return Envelope(id=uuid.uuid4().hex, body=body)


class QosGate:
    """Once armed, holds the next consumer reopen just after its channel opened (the first
    ``set_qos`` of a channel) until ``release`` is set: a deterministic window inside it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.armed = False
        self.entered = anyio.Event()
        self.release = anyio.Event()
        seen: weakref.WeakSet[aio_pika.Channel] = weakref.WeakSet()
        original = aio_pika.Channel.set_qos

        async def gated(channel: aio_pika.Channel, *args: Any, **kwargs: Any) -> Any:
            first = channel not in seen
            seen.add(channel)
            if self.armed and first:
                self.armed = False
                self.entered.set()
                with anyio.fail_after(20):
                    await self.release.wait()
            return await original(channel, *args, **kwargs)

        monkeypatch.setattr(aio_pika.Channel, "set_qos", gated)

    def arm(self) -> None:
        self.armed = True


async def consumer_count(queue: str) -> int:
    """How many consumers RabbitMQ has on ``queue``."""
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.consumer_count
        assert count is not None
        return count


async def test_server_closes_connection_consumer_resumes_and_stale_acks_are_fenced(
    make_broker: BrokerFactory, queue_name: str
) -> None:
    broker = await make_broker()
    await broker.publish(envelope(b"held"))
    async with broker.consume(prefetch=5) as deliveries:
        old = await take(deliveries)
        assert old.attempt == 1
        assert await anyio.to_thread.run_sync(close_connections, queue_name) == 1
        # The message held across the drop comes back, counted, with a new token.
        again = await take(deliveries, timeout=20)
        assert again.id == old.id
        assert again.attempt == 2
        assert again.token != old.token
        assert not await old.ack(), "an ack through the dead channel must be refused"
        assert not await old.extend()
        assert await again.ack()
        # Publishing and consuming go on over the new connection.
        await broker.publish(envelope(b"after"))
        assert (await take(deliveries)).body == b"after"
    assert broker.reconnects >= 1


async def test_publish_waits_for_the_link_to_come_back(
    make_broker: BrokerFactory, queue_name: str
) -> None:
    broker = await make_broker()
    async with broker.consume(prefetch=5) as deliveries:
        await anyio.to_thread.run_sync(close_connections, queue_name)
        sent = [envelope(str(i).encode()) for i in range(20)]
        for env in sent:
            await broker.publish(env)  # confirmed, whatever the link was doing
        got: set[str] = set()
        with anyio.fail_after(20):
            while len(got) < len(sent):
                delivery = await anext(deliveries)
                got.add(delivery.id)
                await delivery.ack()
        assert got == {e.id for e in sent}


async def test_deleted_queue_is_declared_again_and_consuming_resumes(
    make_broker: BrokerFactory,
) -> None:
    """A server-side consumer cancel (here: the queue is deleted) must not leave the consumer
    silently idle: the link re-declares the topology and consumes again."""
    broker = await make_broker()
    async with broker.consume(prefetch=5) as deliveries:
        connection = await aio_pika.connect(URL)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(broker.topology.queue)
        with anyio.fail_after(20):
            while True:
                try:
                    await broker.publish(envelope(b"back"))
                    break
                except Exception:
                    await anyio.sleep(0.1)  # unroutable until the queue is declared again
        assert (await take(deliveries, timeout=20)).body == b"back"


async def test_consumer_closed_during_a_reconnect_does_not_come_back(
    make_broker: BrokerFactory, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker leaves consume() while the reconnect re-opens its consumer: the channel that
    reopen opens is closed too, not left consuming (and handing every message back) for
    nobody."""
    broker = await make_broker()
    gate = QosGate(monkeypatch)
    unregister = Link.unregister

    def unregister_then_release(link: Link, key: int) -> None:
        unregister(link, key)
        gate.release.set()  # close() has begun: the reopen may go on from here

    monkeypatch.setattr(Link, "unregister", unregister_then_release)
    async with broker.consume(prefetch=5):
        gate.arm()
        assert await anyio.to_thread.run_sync(close_connections, queue_name) == 1
        with anyio.fail_after(20):
            await gate.entered.wait()  # the reconnect is inside this consumer's reopen
    await broker.stats()  # waits for the link: the reconnect, reopen included, is over

    async def no_consumer() -> bool:
        return await consumer_count(queue_name) == 0

    await poll(no_consumer, timeout=5)


async def test_a_consumer_reopen_that_gets_no_answer_gives_up_within_the_connect_timeout(
    make_broker: BrokerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer's (re)open that RabbitMQ stops answering (held here just after its channel
    opened) fails within ``connect_timeout``: the link reconnects and the consumer opens on
    the new connection, and leaving consume() does not wait on it (before, the open waited
    without limit, holding the lock close() waits for: a worker could not stop)."""
    broker = await make_broker(connect_timeout=0.5)
    await broker.publish(envelope(b"after"))
    gate = QosGate(monkeypatch)
    gate.arm()  # never released: only the timeout ends the first open
    with anyio.fail_after(10):
        async with broker.consume(prefetch=1) as deliveries:
            delivered = await take(deliveries)
            assert delivered.body == b"after"
            assert await delivered.ack()
    assert gate.entered.is_set() and not gate.release.is_set()
    assert broker.reconnects >= 1


async def test_watchdog_takes_a_consumer_being_opened_for_no_lost_link(
    make_broker: BrokerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watchdog tick while consume() opens a consumer (its channel open, basic.consume not
    sent yet) must not reconnect: that would fence every delivery in flight in the process."""
    defaults = Link.__init__.__kwdefaults__
    assert defaults is not None
    monkeypatch.setitem(defaults, "watchdog_interval", 0.1)  # ticks inside the window
    broker = await make_broker()
    await broker.publish(envelope(b"held"))
    gate = QosGate(monkeypatch)
    verdicts: list[bool] = []
    healthy = Link._healthy

    def watched(link: Link) -> bool:
        verdict = healthy(link)
        if gate.entered.is_set() and not gate.release.is_set():
            verdicts.append(verdict)
            gate.release.set()  # the watchdog looked inside the window: let the consumer open
        return verdict

    monkeypatch.setattr(Link, "_healthy", watched)
    async with broker.consume(prefetch=1) as first:
        held = await take(first)
        gate.arm()
        async with broker.consume(prefetch=1):  # a second worker starting
            assert verdicts == [True]
        assert broker.reconnects == 0
        assert await held.ack(), "the delivery held across must still settle"


@asynccontextmanager
async def relay() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A TCP relay to the test server: its URL, and an event that, once set, makes it drop
    what the server sends (a silent network partition, as the client sees it)."""
    target = Address(URL)
    mute = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, muted: bool) -> None:
        while data := await reader.read(65536):
            if not (muted and mute.is_set()):
                writer.write(data)
                await writer.drain()

    async def serve(client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        server, to_server = await asyncio.open_connection(target.host, target.port)
        writers.extend((to_client, to_server))
        await asyncio.gather(
            pipe(client, to_server, False), pipe(server, to_client, True), return_exceptions=True
        )

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield str(target.with_port(port)), mute
    finally:
        listener.close()
        for writer in writers:
            writer.close()


async def test_publish_whose_confirm_never_comes_fails_after_publish_timeout(
    queue_name: str,
) -> None:
    """With heartbeats off, a silent partition (or a broker blocking publishers) leaves a
    publish without its confirm: it raises after ``publish_timeout`` instead of hanging."""
    try:
        async with AsyncExitStack() as stack, relay() as (url, mute):
            broker = RabbitMQBroker(url, queue=queue_name, heartbeat=0, publish_timeout=1)
            await broker.start(stack, QueueConfig(broker="rabbitmq", broker_url=url))
            await broker.publish(envelope(b"confirmed"))
            mute.set()
            # Written, then no confirm: the error must say that it may have arrived.
            written = "no publisher confirm.*written.*may have been delivered"
            with anyio.fail_after(10), pytest.raises(BrokerConnectionError, match=written):
                await broker.publish(envelope(b"never confirmed"))
            # The relay is gone: the broker closes on a dead connection, without waiting.
    finally:
        await delete_topology(queue_name)


async def test_a_publish_with_less_time_left_than_a_confirm_takes_is_not_written(
    make_broker: BrokerFactory,
) -> None:
    """A publish whose deadline is (almost) spent before its frames can be written is
    refused unwritten, and its error says so: written, it would time out at once though
    RabbitMQ takes it, and the caller's retry would duplicate it. Here another publish holds
    the channel past the point where a confirm could still come in time."""
    broker = await make_broker(publish_timeout=0.5)
    link = broker._require_link()
    assert link._publisher is not None
    async with link._publisher.lock:  # a publish in progress, for longer than the deadline
        with anyio.fail_after(5), pytest.raises(BrokerConnectionError, match="not written"):
            await broker.publish(envelope(b"too late"))
    stats = await broker.stats()
    assert stats.ready_by_priority == {}, "the refused publish reached the queue"
    assert broker.reconnects == 0


BASIC_PUBLISH = struct.pack(">HH", 60, 40)
"""The class and method ids that open the payload of a ``basic.publish`` method frame."""
QUEUE_DECLARE = struct.pack(">HH", 50, 10)
"""The same of a ``queue.declare``."""


class Gate:
    """A TCP relay to the test server whose faults a test switches: hold new connections
    before they reach the server (:meth:`close`, :meth:`open`), cut the current ones
    (:meth:`cut`), and, once :meth:`withhold_confirms` is called, hold everything the server
    sends on a connection after its client's first ``basic.publish`` (a broker that stops
    answering between a publish and its confirm; :meth:`withhold_after` for another method).
    Held bytes are delivered by :meth:`heal`, never dropped, so the AMQP streams stay whole."""

    def __init__(self) -> None:
        self.url = ""
        self.entry = asyncio.Event()
        self.entry.set()
        self.waiting = 0
        """Connections accepted and held at the entry."""
        self.withholding = False
        self.trigger = BASIC_PUBLISH
        self._downs: list[asyncio.Event] = []
        self._writers: list[asyncio.StreamWriter] = []

    def close(self) -> None:
        self.entry.clear()

    def open(self) -> None:
        self.entry.set()

    def withhold_confirms(self) -> None:
        self.withhold_after(BASIC_PUBLISH)

    def withhold_after(self, method: bytes) -> None:
        """Hold what the server sends after the client's next ``method`` (class and method
        ids, as :data:`BASIC_PUBLISH`)."""
        self.trigger = method
        self.withholding = True

    def heal(self) -> None:
        self.withholding = False
        self.entry.set()
        for down in self._downs:
            down.set()

    def cut(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    async def _up(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, down: asyncio.Event
    ) -> None:
        """Client to server, reading the frames to see the first trigger method."""
        seen = b""
        frames = 8  # after the protocol header, the frames: type, channel, size, payload, end
        while data := await reader.read(65536):
            seen += data
            while len(seen) >= frames + 7:
                size = int.from_bytes(seen[frames + 3 : frames + 7])
                if len(seen) < frames + 8 + size:
                    break
                method = seen[frames] == 1 and seen[frames + 7 : frames + 11] == self.trigger
                if method and self.withholding:
                    down.clear()
                seen, frames = seen[frames + 8 + size :], 0
            writer.write(data)
            await writer.drain()

    async def _down(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, down: asyncio.Event
    ) -> None:
        while data := await reader.read(65536):
            await down.wait()
            writer.write(data)
            await writer.drain()

    async def _serve(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        self._writers.append(to_client)
        self.waiting += 1
        await self.entry.wait()
        self.waiting -= 1
        target = Address(URL)
        server, to_server = await asyncio.open_connection(target.host, target.port)
        self._writers.append(to_server)
        down = asyncio.Event()
        down.set()
        self._downs.append(down)
        await asyncio.gather(
            self._up(client, to_server, down),
            self._down(server, to_client, down),
            return_exceptions=True,
        )
        to_client.close()
        to_server.close()

    @classmethod
    @asynccontextmanager
    async def running(cls) -> AsyncIterator[Gate]:
        gate = cls()
        listener = await asyncio.start_server(gate._serve, "127.0.0.1", 0)
        gate.url = str(Address(URL).with_port(listener.sockets[0].getsockname()[1]))
        try:
            yield gate
        finally:
            gate.heal()
            listener.close()
            gate.cut()


async def test_add_task_fails_within_one_publish_timeout_across_reconnect_and_confirm(
    queue_name: str,
) -> None:
    """One deadline for a whole publish: the connection is lost, comes back after a good part
    of ``publish_timeout`` has passed, then the confirm never comes. ``add_task`` must raise
    ``publish_timeout`` after it was called, not that plus the time spent reconnecting."""
    limit = 4.0
    outage = 0.4 * limit  # how long the network stays down: a fault schedule, not a wait
    try:
        async with Gate.running() as gate:
            broker = RabbitMQBroker(gate.url, queue=queue_name, heartbeat=0, publish_timeout=limit)
            app = AsyncQueueTasks(broker=broker)
            await app.start()
            try:
                await app.add_task("noop")  # confirmed: the way through the gate works
                gate.close()
                gate.withhold_confirms()
                gate.cut()

                async def reconnecting() -> bool:
                    return gate.waiting > 0

                await poll(reconnecting, timeout=10)
                started = time.monotonic()
                asyncio.get_running_loop().call_later(outage, gate.open)
                with (
                    anyio.fail_after(3 * limit),
                    pytest.raises(BrokerConnectionError, match="no publisher confirm"),
                ):
                    await app.add_task("noop")
                waited = time.monotonic() - started
                # Without one shared deadline it is the outage plus a whole publish_timeout.
                assert waited < limit + 0.75 * outage, f"failed after {waited:.2f} s"
                gate.heal()
            finally:
                await app.aclose()
    finally:
        await delete_topology(queue_name)


def test_the_confirm_floor_never_takes_more_than_half_the_timeout() -> None:
    """A short ``publish_timeout`` still writes a publish at once: the floor (the time a
    confirm takes, at least 5 ms) is capped at half the timeout."""
    from qtasks_rabbitmq.confirms import CONFIRM_FLOOR, ConfirmPace

    pace = ConfirmPace(cap=0.002 / 2)
    assert pace.floor() == 0.001
    slow = ConfirmPace(cap=30 / 2)
    assert slow.floor() == CONFIRM_FLOOR
    slow.recent = 3.0  # confirms from a distant server
    assert slow.floor() == 3.0
    slow.recent = 60.0
    assert slow.floor() == 15.0


async def test_a_batch_with_less_deadline_left_than_its_floor_is_not_written(
    make_broker: BrokerFactory,
) -> None:
    """:func:`~qtasks_rabbitmq.confirms.publish_batch` given a deadline closer than the time
    a confirm takes writes nothing (no delivery tag taken, nothing queued) and says so."""
    from qtasks_rabbitmq.confirms import ConfirmPace, ConfirmTimeout, Outgoing, publish_batch

    broker = await make_broker(publish_timeout=5)
    link = broker._require_link()
    assert link._publisher is not None
    channel = link._publisher
    message = Outgoing(
        body=b"late",
        id="late",
        message_id="late",
        headers=None,
        priority=0,
        exchange="",
        routing_key=broker.topology.queue,
    )
    tag = channel.delivery_tag
    pace = ConfirmPace()  # the floor: CONFIRM_FLOOR, 5 ms
    attempt = await publish_batch(channel, [message], "task", time.monotonic() + 0.002, pace)
    assert attempt.written is False
    assert isinstance(attempt.trouble, ConfirmTimeout)
    assert list(attempt.rest) == [message]
    assert channel.delivery_tag == tag
    assert (await broker.stats()).ready_by_priority == {}
