"""The ``rabbitmq_*`` settings are checked wherever they come in: ``from_config``, the
constructor's keywords, and the app's ``config.extra`` when the broker starts."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest
from pamqp import commands

from qtasks.config import QueueConfig
from qtasks.errors import ConfigError
from qtasks.messages import Envelope
from qtasks_rabbitmq import RabbitMQBroker, RabbitMQSettings, Topology
from qtasks_rabbitmq.settings import MAX_QUEUE_NAME, OPTIONS

from .conftest import BrokerFactory

pytestmark = pytest.mark.rabbitmq


def test_every_option_is_a_settings_field() -> None:
    fields = set(RabbitMQSettings.__dataclass_fields__)
    assert {key.removeprefix("rabbitmq_") for key in OPTIONS} == fields


def test_from_extra_reads_the_prefixed_keys_only() -> None:
    settings = RabbitMQSettings.from_extra(
        {"rabbitmq_queue": "jobs", "rabbitmq_publish_timeout": 5, "redis_queue": "x", "other": 1}
    )
    assert settings == RabbitMQSettings(queue="jobs", publish_timeout=5.0)
    assert isinstance(settings.publish_timeout, float)
    assert RabbitMQSettings.from_extra({}) == RabbitMQSettings()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"rabbitmq_qeue": "x"}, r"unknown option extra\.rabbitmq_qeue \(known: .*rabbitmq_queue,"),
        ({"rabbitmq_heartbeat": "30"}, r"extra\.rabbitmq_heartbeat expects int, got '30'"),
        ({"rabbitmq_heartbeat": 1.5}, r"extra\.rabbitmq_heartbeat expects int"),
        ({"rabbitmq_max_priority": True}, r"extra\.rabbitmq_max_priority expects int"),
        ({"rabbitmq_connect_timeout": "1"}, r"extra\.rabbitmq_connect_timeout expects float"),
        ({"rabbitmq_queue": ""}, "rabbitmq_queue must not be empty"),
        ({"rabbitmq_queue": " \t"}, r"rabbitmq_queue must not be only whitespace, got ' \\t'"),
        (
            {"rabbitmq_queue": "amq.jobs"},
            r"rabbitmq_queue must not start with 'amq\.' \(names the RabbitMQ server reserves\)"
            r", got 'amq\.jobs'",
        ),
        (
            {"rabbitmq_queue": "x" * 118},
            r"rabbitmq_queue must be at most 117 characters \(qtasks declares the exchange "
            r"'<queue>\.delay\.out', and AMQP allows 127 for an exchange name\), got 118: 'xxx",
        ),
        (
            {"rabbitmq_queue": "jobs!é"},
            r"rabbitmq_queue may hold only ASCII letters, digits, spaces and - _ \. : @ # , / \+ "
            r"\(the AMQP client sends no other name\), got 'jobs!é', with '!', 'é'",
        ),
        ({"rabbitmq_queue_type": "stream"}, "rabbitmq_queue_type must be 'classic' or 'quorum'"),
        ({"rabbitmq_max_priority": 256}, "rabbitmq_max_priority must be 0..255"),
        ({"rabbitmq_queue_version": 3}, "rabbitmq_queue_version must be 0, 1 or 2"),
        ({"rabbitmq_heartbeat": -1}, "rabbitmq_heartbeat must be 0 or more"),
        ({"rabbitmq_connect_timeout": 0}, "rabbitmq_connect_timeout must be more than 0"),
        ({"rabbitmq_publish_timeout": -1.0}, "rabbitmq_publish_timeout must be 0 or more"),
    ],
)
def test_bad_extra_is_refused_naming_the_key(extra: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RabbitMQBroker.from_config(QueueConfig(extra=extra))


def test_an_ill_typed_option_is_quoted_masked() -> None:
    """A URL given to the wrong key (or as bytes) is quoted in the error without its secret."""
    for value in ("amqp://guest:hunter2@h:5672/", b"amqp://guest:hunter2@h:5672/"):
        with pytest.raises(ConfigError) as info:
            RabbitMQBroker.from_config(QueueConfig(extra={"rabbitmq_heartbeat": value}))
        assert "amqp://guest:***@h:5672/" in str(info.value)
        assert "hunter2" not in str(info.value)


def test_constructor_keywords_are_checked_too() -> None:
    with pytest.raises(ConfigError, match="rabbitmq_heartbeat expects int"):
        RabbitMQBroker(heartbeat="30")  # type: ignore[arg-type]  # the mistake under test
    with pytest.raises(ConfigError, match="rabbitmq_publish_timeout must be 0 or more"):
        RabbitMQBroker(publish_timeout=-1)
    broker = RabbitMQBroker(queue="jobs", connect_timeout=3)
    assert broker.settings == RabbitMQSettings(queue="jobs", connect_timeout=3)


@pytest.mark.anyio
async def test_start_refuses_a_misspelt_key_in_the_apps_extra() -> None:
    broker = RabbitMQBroker(queue="never-declared")
    async with AsyncExitStack() as stack:
        with pytest.raises(ConfigError, match="rabbitmq_qeue"):
            await broker.start(stack, QueueConfig(extra={"rabbitmq_qeue": "x"}))
    assert broker.reconnects == 0


@pytest.mark.anyio
async def test_start_refuses_an_out_of_range_value_in_the_apps_extra() -> None:
    """docs/rabbitmq.md: a value out of range is refused wherever it comes in, the app's
    ``config.extra`` at start included; the start checked its types only."""
    broker = RabbitMQBroker(queue="never-declared")
    async with AsyncExitStack() as stack:
        with pytest.raises(ConfigError, match=r"rabbitmq_max_priority must be 0\.\.255"):
            await broker.start(stack, QueueConfig(extra={"rabbitmq_max_priority": 300}))
    assert broker.reconnects == 0


def test_the_queue_name_limits_are_the_clients() -> None:
    """pamqp (under aio-pika) refuses to send a longer exchange name or another character,
    whatever the server would take: the broker built with such a queue failed at start."""
    longest = Topology("x" * MAX_QUEUE_NAME)
    for name in longest.all_exchanges():
        commands.Exchange.Declare(exchange=name)
    for name in longest.all_queues():
        commands.Queue.Declare(queue=name)
    with pytest.raises(ValueError, match="Max length exceeded for exchange"):
        commands.Exchange.Declare(exchange=Topology("x" * (MAX_QUEUE_NAME + 1)).delay_out)
    with pytest.raises(ValueError, match="Invalid value for queue"):
        commands.Queue.Declare(queue="jobs-é")


@pytest.mark.anyio
async def test_a_queue_name_of_the_most_characters_declares_all_its_derived_names(
    make_broker: BrokerFactory, queue_name: str
) -> None:
    """The limit is what the server takes: a name of :data:`MAX_QUEUE_NAME` characters, of
    every character allowed, declares its queues and exchanges and carries a delayed task
    through them; one character more is refused when the broker is built (above)."""
    name = f"{queue_name} AZaz09-_.:@#,/+"
    name += "x" * (MAX_QUEUE_NAME - len(name))
    broker = await make_broker(queue=name)
    assert len(broker.topology.queue) == MAX_QUEUE_NAME
    assert max(len(n) for n in broker.topology.all_exchanges()) == 127
    # Through the wait queues and exchanges of the longest names, to the work queue.
    await broker.publish(Envelope(id="late", body=b"{}", priority=0, eta=time.time() + 0.2))
    async with broker.consume(prefetch=1) as deliveries:
        with anyio.fail_after(10):
            delivery = await anext(deliveries)
        assert delivery.body == b"{}"
        await delivery.ack()
