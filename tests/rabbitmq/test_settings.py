"""The ``rabbitmq_*`` settings are checked wherever they come in: ``from_config``, the
constructor's keywords, and the app's ``config.extra`` when the broker starts."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import pytest

from qtasks.config import QueueConfig
from qtasks.errors import ConfigError
from qtasks_rabbitmq import RabbitMQBroker, RabbitMQSettings
from qtasks_rabbitmq.settings import OPTIONS

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
