"""Dead-letter retention on RabbitMQ, past what the contract suite checks: a dead-letter queue
declared by an earlier version (no cap) or with another cap is kept, with a warning, not
refused; a dead letter without an ``expiration`` is still not listed once expired; and
expired dead letters that RabbitMQ has not dropped yet (it drops only at the head) are not
counted."""

from __future__ import annotations

import logging
import time
import uuid

import aio_pika
import anyio
import pytest

from qtasks.messages import Envelope
from qtasks_rabbitmq.wire import H_DEAD_AT, H_REASON

from .conftest import URL, BrokerFactory, poll

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq]


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


async def test_an_uncapped_dead_queue_of_an_earlier_version_is_kept(
    make_broker: BrokerFactory, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Upgrading must not break the start: the broker keeps the queue as it is and warns
    that its cap is a policy's to set; dead letters get their TTL all the same, and the old
    one, expired, is neither listed nor requeued."""
    await declare_old_dead_queue(f"{queue_name}.dead")
    with caplog.at_level(logging.WARNING, logger="qtasks_rabbitmq"):
        broker = await make_broker(dead_letter_ttl=1.0)
    assert any(
        "policy" in r.getMessage() and "max-length" in r.getMessage() for r in caplog.records
    )
    sent = Envelope(uuid.uuid4().hex, b"new", 0)
    await broker.publish(sent)
    async with broker.consume(prefetch=1) as deliveries:
        with anyio.fail_after(5):
            delivery = await anext(deliveries)
        assert await delivery.nack("poison")
    assert [d.id for d in await broker.dead_letters()] == [sent.id]  # the old one dropped

    async def expired() -> bool:  # the new one expires by its own expiration
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


async def test_another_cap_keeps_the_queue_declared_first(
    make_broker: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    capped = await make_broker(max_dead_letters=2)
    assert capped.topology.dead_arguments()["x-max-length"] == 2
    with caplog.at_level(logging.WARNING, logger="qtasks_rabbitmq"):
        other = await make_broker(max_dead_letters=5)
    assert any("max_dead_letters=5" in r.getMessage() for r in caplog.records)
    for _ in range(4):  # the queue keeps the cap it was declared with
        await other.publish(Envelope(uuid.uuid4().hex, b"x", 0))
    async with other.consume(prefetch=4) as deliveries:
        for _ in range(4):
            with anyio.fail_after(5):
                await (await anext(deliveries)).nack("poison")
    assert len(await other.dead_letters()) == 2


def letter(id: str, died: float, expiration: float | None = None) -> aio_pika.Message:
    """A dead letter as the broker writes it, dead at ``died`` (``expiration`` in seconds, or
    none)."""
    return aio_pika.Message(
        id.encode(),
        message_id=id,
        headers={H_REASON: "poison", H_DEAD_AT: int(died * 1000)},
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        expiration=expiration,
    )


@pytest.mark.parametrize("count", ["stats", "purge"])
async def test_expired_dead_letters_rabbitmq_still_holds_are_not_counted(
    make_broker: BrokerFactory, queue_name: str, count: str
) -> None:
    """``Q.dead`` holds, in order: a letter of an earlier version (no ``expiration``) past
    ``dead_letter_ttl``, which RabbitMQ never drops; behind it one whose ``expiration``
    passed, which RabbitMQ drops only once it is at the head; and a young one. Only the young
    one counts, in ``stats()`` and in what ``purge_dead_letters()`` reports."""
    broker = await make_broker(dead_letter_ttl=3600.0)
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        now = time.time()
        for message in (
            letter("old", now - 2 * 3600),
            letter("expired", now, expiration=0.001),
            letter("young", now),
        ):
            await channel.default_exchange.publish(message, routing_key=f"{queue_name}.dead")
    if count == "stats":
        assert (await broker.stats()).dead_letters == 1
        assert [d.id for d in await broker.dead_letters()] == ["young"]
    else:
        assert await broker.purge_dead_letters() == 1
        assert await broker.dead_letters() == []
    assert (await broker.stats()).dead_letters == (1 if count == "stats" else 0)
