"""What RabbitMQ refuses costs that publish only (review r17 #2): a body over
``rabbitmq_max_message_size`` is refused before it is written, and a publish the server refuses
by closing the publish channel (a body over its ``max_message_size``, a deleted exchange, a bad
property) reopens that channel alone: no reconnect, the consumers and what they hold untouched,
no re-send storm, a :class:`PublishRejectedError`. And no credential reaches a log (r17 #6)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import aio_pika
import anyio
import pytest
from yarl import URL as Url

from qtasks.config import QueueConfig
from qtasks.errors import BrokerConnectionError, MessageTooLargeError
from qtasks.messages import Envelope
from qtasks_rabbitmq import OversizedMessageError, RabbitMQBroker
from qtasks_rabbitmq.consumer import Consumer
from qtasks_rabbitmq.delivery import RabbitMQDelivery
from qtasks_rabbitmq.errors import PublishRejectedError
from qtasks_rabbitmq.settings import LARGEST_MESSAGE_SIZE, SERVER_MAX_MESSAGE_SIZE

from .conftest import URL, BrokerFactory

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq]


@asynccontextmanager
async def holding(
    broker: RabbitMQBroker,
) -> AsyncIterator[tuple[RabbitMQDelivery, AsyncIterator[RabbitMQDelivery], Consumer]]:
    """A worker of ``broker`` holding one task (not settled yet), its deliveries, its consumer."""
    await broker.publish(Envelope(id="held", body=b"work"))
    async with broker.consume(prefetch=1) as deliveries:
        with anyio.fail_after(10):
            held = await anext(deliveries)
        (consumer,) = broker._session().consumers.values()
        yield held, deliveries, consumer


async def after_refusal(
    broker: RabbitMQBroker,
    held: RabbitMQDelivery,
    deliveries: AsyncIterator[RabbitMQDelivery],
    consumer: Consumer,
    channel: object,
) -> None:
    """Nothing but the publish was touched: no reconnect, the consumer on its channel, the held
    task acked once (never delivered again), and the next publish goes through."""
    assert broker.reconnects == 0
    assert consumer.channel is channel and consumer.alive()
    assert await held.ack()
    await broker.publish(Envelope(id="after", body=b"ok"))
    with anyio.fail_after(10):
        after = await anext(deliveries)
    assert (after.id, after.attempt) == ("after", 1)
    assert await after.ack()
    stats = await broker.stats()
    assert (stats.ready_by_priority, stats.in_flight) == ({}, 0)
    assert broker.reconnects == 0


async def test_a_body_over_max_message_size_is_refused_before_it_is_written(
    make_broker: BrokerFactory,
) -> None:
    broker = await make_broker(max_message_size=1024)
    async with holding(broker) as (held, deliveries, consumer):
        channel = consumer.channel
        with anyio.fail_after(5), pytest.raises(OversizedMessageError) as caught:
            await broker.publish(Envelope(id="big", body=bytes(1025)))
        error = caught.value
        assert isinstance(error, PublishRejectedError) and isinstance(error, MessageTooLargeError)
        assert (error.size, error.limit, error.what) == (1025, 1024, "message big")
        assert "rabbitmq_max_message_size" in str(error)
        with pytest.raises(OversizedMessageError):
            await broker.publish_many(
                [Envelope(id="fits", body=b"x"), Envelope(id="no", body=bytes(2000))]
            )
        await after_refusal(broker, held, deliveries, consumer, channel)


async def test_a_body_over_the_servers_limit_costs_the_publish_channel_only(
    make_broker: BrokerFactory,
) -> None:
    """RabbitMQ (its default ``max_message_size``, 128 MiB) closes the publish channel with
    ``PRECONDITION_FAILED`` when the client's limit is set higher: the publish raises at
    once, it is not sent again, and nothing else is reconnected."""
    broker = await make_broker(max_message_size=LARGEST_MESSAGE_SIZE, publish_timeout=20)
    async with holding(broker) as (held, deliveries, consumer):
        channel = consumer.channel
        huge = Envelope(id="huge", body=bytes(SERVER_MAX_MESSAGE_SIZE + 1))
        with anyio.fail_after(15), pytest.raises(OversizedMessageError) as caught:
            await broker.publish(huge)
        del huge
        assert caught.value.limit == SERVER_MAX_MESSAGE_SIZE
        assert "RabbitMQ's max_message_size" in str(caught.value)
        await after_refusal(broker, held, deliveries, consumer, channel)


async def test_a_property_the_server_refuses_is_published_once_more_then_raises(
    make_broker: BrokerFactory,
) -> None:
    """A refusal that does not name the message (here ``PRECONDITION_FAILED - invalid
    expiration``) is tried once more on a new channel, in case it was another publish's on
    the same channel, then raises."""
    broker = await make_broker(publish_timeout=10)
    async with holding(broker) as (held, deliveries, consumer):
        channel = consumer.channel
        publisher = broker._require_publisher()
        bad = publisher.message("bad", b"x", 0, 0, ("", broker.topology.queue))
        bad = bad._replace(expiration="soon")
        started = time.monotonic()
        with anyio.fail_after(10), pytest.raises(PublishRejectedError, match="PRECONDITION"):
            await broker._require_link().publish_many((bad,))
        assert time.monotonic() - started < 5, "not sent again and again until the deadline"
        await after_refusal(broker, held, deliveries, consumer, channel)


async def test_a_deleted_exchange_is_declared_again_without_a_reconnect(
    make_broker: BrokerFactory,
) -> None:
    """``NOT_FOUND`` for the delay chain's entry, deleted under the broker: the new publish
    channel comes with the topology declared again, so the delayed publish is sent again and
    arrives."""
    broker = await make_broker()
    async with holding(broker) as (held, deliveries, consumer):
        channel = consumer.channel
        connection = await aio_pika.connect(URL)
        async with connection:
            admin = await connection.channel()
            await admin.exchange_delete(broker.topology.entry_exchange)
        with anyio.fail_after(10):
            await broker.publish(Envelope(id="later", body=b"x", eta=time.time() + 0.3))
            assert broker.reconnects == 0 and consumer.channel is channel
            assert await held.ack()
            later = await anext(deliveries)
        assert later.id == "later" and await later.ack()
        assert broker.reconnects == 0 and consumer.channel is channel


async def test_a_key_in_the_url_reaches_no_log_even_at_debug(
    caplog: pytest.LogCaptureFixture, queue_name: str
) -> None:
    """aiormq logs the URL at DEBUG with only its password masked: a key given as the user
    (``amqp://<key>@host/``, no password) is masked by the filter the link puts on it."""
    caplog.set_level(logging.DEBUG)
    key = f"k3y-{uuid.uuid4().hex}"
    server = Url(URL)
    url = str(server.with_user(key).with_password(None))
    broker = RabbitMQBroker(url, queue=queue_name, connect_timeout=5)
    config = QueueConfig(broker="rabbitmq", broker_url=url)
    with anyio.fail_after(10), pytest.raises(BrokerConnectionError) as caught:
        await broker.start(AsyncExitStack(), config)
    assert key not in str(caught.value)
    assert any(r.name.startswith("aiormq") for r in caplog.records), "aiormq logged nothing"
    leaked = [f"{r.name}: {r.getMessage()}" for r in caplog.records if key in r.getMessage()]
    assert leaked == []
