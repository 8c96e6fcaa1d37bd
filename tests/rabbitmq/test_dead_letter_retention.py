"""Dead-letter retention on RabbitMQ, past what the contract suite checks: ``Q.dead`` is
declared as every version declares it, so an earlier version's is adopted and an earlier
version is not refused this one's, ``max_dead_letters`` kept by the broker; one with a cap
of its own is kept, with one warning; and a dead letter without an ``expiration`` is still
not listed once expired."""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import AsyncExitStack

import aio_pika
import anyio
import pytest

from qtasks.config import QueueConfig
from qtasks.messages import Envelope
from qtasks_rabbitmq import RabbitMQBroker
from qtasks_rabbitmq.wire import H_DEAD_AT, H_REASON

from .conftest import URL, BrokerFactory, close_connections, delete_topology, poll
from .test_broker import take
from .test_reconnect import QUEUE_DECLARE, Gate

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq]


async def dead_lettered(broker: RabbitMQBroker, count: int) -> list[Envelope]:
    """Publish ``count`` messages and nack each, in order: dead letters now."""
    sent = [Envelope(uuid.uuid4().hex, b"poison", 0) for _ in range(count)]
    for envelope in sent:
        await broker.publish(envelope)
    async with broker.consume(prefetch=count) as deliveries:
        for _ in sent:
            with anyio.fail_after(5):
                assert await (await anext(deliveries)).nack("poison")
    return sent


async def declare_old_dead_queue(name: str) -> None:
    """``Q.dead`` as versions without retention declared it, holding one dead letter written
    then (no ``expiration``), ten days old."""
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "classic"})
        old = aio_pika.Message(
            b"old",
            message_id="old-letter",
            headers={H_REASON: "poison", H_DEAD_AT: int((time.time() - 10 * 86400) * 1000)},
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await channel.default_exchange.publish(old, routing_key=name)


async def test_a_dead_queue_of_an_earlier_version_is_adopted_and_capped(
    make_broker: BrokerFactory, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Upgrading must not break the start nor warn: the queue is declared as every version
    declares it. Dead letters get their TTL all the same, the old one, expired, is neither
    listed nor requeued, and ``max_dead_letters`` holds (the broker drops the oldest)."""
    await declare_old_dead_queue(f"{queue_name}.dead")
    with caplog.at_level(logging.WARNING, logger="qtasks.rabbitmq"):
        broker = await make_broker(dead_letter_ttl=3.0, max_dead_letters=2)
    assert not caplog.records
    sent = await dead_lettered(broker, 3)
    # The old one went with the cap (the oldest), or as expired: the newest two are left.
    assert [d.id for d in await broker.dead_letters()] == [e.id for e in sent[1:]]

    async def expired() -> bool:  # the new ones expire by their own expiration
        return not await broker.dead_letters()

    await poll(expired, timeout=5)
    assert (await broker.stats()).dead_letters == 0
    assert await broker.requeue_dead_letters() == 0


async def test_an_expired_letter_without_expiration_is_not_requeued(
    make_broker: BrokerFactory, queue_name: str
) -> None:
    await declare_old_dead_queue(f"{queue_name}.dead")
    broker = await make_broker()
    assert await broker.requeue_dead_letters(["old-letter"]) == 0
    assert await broker.dead_letters() == []


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_an_earlier_version_can_declare_the_dead_queue_this_one_created(
    make_broker: BrokerFactory, queue_name: str, queue_type: str
) -> None:
    """The version before this one declares ``Q.dead`` with its type alone: RabbitMQ must not
    refuse it (``PRECONDITION_FAILED``) the queue this version created, whose cap the broker
    keeps all the same."""
    broker = await make_broker(max_dead_letters=2, queue_type=queue_type)
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(
            f"{queue_name}.dead", durable=True, arguments={"x-queue-type": queue_type}
        )
    sent = await dead_lettered(broker, 3)
    assert [d.id for d in await broker.dead_letters()] == [e.id for e in sent[1:]]


async def declare_capped_dead_queue(name: str, cap: int) -> None:
    """``Q.dead`` as the version that added ``max_dead_letters`` created it."""
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(
            name,
            durable=True,
            arguments={"x-queue-type": "classic", "x-max-length": cap, "x-overflow": "drop-head"},
        )


async def test_a_dead_queue_with_a_cap_is_kept_with_one_warning_per_link(
    make_broker: BrokerFactory, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``Q.dead`` with arguments qtasks does not declare (``x-max-length``) is kept as it
    is: the start does not fail, one warning says so, and reconnecting does not repeat it.
    Both caps hold, the lower one first."""
    await declare_capped_dead_queue(f"{queue_name}.dead", 2)

    def warnings() -> list[str]:
        """Those about the dead-letter queue."""
        return [r.getMessage() for r in caplog.records if f"{queue_name}.dead" in r.getMessage()]

    with caplog.at_level(logging.WARNING, logger="qtasks.rabbitmq"):
        broker = await make_broker(max_dead_letters=5)
        assert len(warnings()) == 1
        assert "x-max-length" in warnings()[0]
        assert "max_dead_letters=5" in warnings()[0]
        caplog.clear()
        assert await anyio.to_thread.run_sync(close_connections, queue_name) == 1

        async def reconnected() -> bool:
            return broker.reconnects >= 1 and (await broker.stats()) is not None

        await poll(reconnected, timeout=20)
        assert not warnings()
    await dead_lettered(broker, 4)
    assert len(await broker.dead_letters()) == 2


async def test_a_trim_that_times_out_leaves_publishing_alone(
    queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The server stops answering while a dead letter is trimmed: the trim gives up after
    ``publish_timeout`` and the letter is safe, and once the server answers again publishing
    goes on over the same connection (a trim on the publish channel had that channel closed
    by its timeout: the next publish paid a reconnect), and so does trimming."""
    try:
        async with Gate.running() as gate, AsyncExitStack() as stack:
            broker = RabbitMQBroker(gate.url, queue=queue_name, heartbeat=0, publish_timeout=1)
            config = QueueConfig(broker="rabbitmq", broker_url=gate.url, max_dead_letters=1)
            await broker.start(stack, config)
            await broker.publish(Envelope(uuid.uuid4().hex, b"poison", 0))
            async with broker.consume(prefetch=1) as deliveries:
                poison = await take(deliveries)
                gate.withhold_after(QUEUE_DECLARE)  # the trim's first call gets no answer
                warned = caplog.at_level(logging.WARNING, logger="qtasks.rabbitmq")
                with warned, anyio.fail_after(10):
                    assert await poison.nack("poison"), "the dead letter itself was confirmed"
                assert any("trimming" in r.getMessage() for r in caplog.records)
                gate.heal()
                after = Envelope(uuid.uuid4().hex, b"after", 0)
                with anyio.fail_after(10):
                    await broker.publish(after)
                    delivery = await take(deliveries)
                    assert delivery.body == b"after"
                assert broker.reconnects == 0
                # The next trim opens a channel of its own again: the cap holds.
                assert await delivery.nack("poison too")
                assert [d.id for d in await broker.dead_letters()] == [after.id]
    finally:
        await delete_topology(queue_name)


async def test_trims_at_once_in_one_process_keep_the_cap_on_one_channel(queue_name: str) -> None:
    """Tasks failing together bury at once, and each burial trims: the trims of one process
    run one after the other, so the cap is kept (each trim had counted the same excess and
    dropped it again: the queue emptied), on one channel (each opened its own)."""
    from qtasks_rabbitmq.retention import Trimmer
    from qtasks_rabbitmq.topology import Topology

    topology = Topology(queue_name, max_dead_letters=2)
    connection = await aio_pika.connect(URL)
    try:
        channel = await connection.channel()
        await channel.declare_queue(
            topology.dead, durable=True, arguments=topology.dead_arguments()
        )
        for i in range(10):
            await channel.default_exchange.publish(
                aio_pika.Message(str(i).encode()), routing_key=topology.dead
            )
        underlay = (await channel.get_underlay_channel()).connection
        before = len(underlay.channels)
        trimmer = Trimmer(topology, 5)
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(trimmer.trim, connection, 2)
        assert len(underlay.channels) == before + 1
        await trimmer.close()
        left = await channel.declare_queue(topology.dead, passive=True)
        assert left.declaration_result.message_count == 2
        kept = [await left.get(no_ack=True) for _ in range(2)]
        assert [m.body for m in kept] == [b"8", b"9"], "the newest are kept"
    finally:
        await connection.close()
        await delete_topology(queue_name)
