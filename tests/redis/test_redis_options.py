"""Options under ``extra`` for the Redis components: a misspelt or ill-typed ``redis_*`` key is
refused with the valid ones listed, never silently ignored (as RabbitMQ's ``rabbitmq_*`` are)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks.errors import ConfigError
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage
from qtasks_redis.connection import OPTIONS

COMPONENTS = [RedisBroker, RedisStorage, RedisGlobalConfig]
# Nothing listens here: every refusal below happens before any connection is tried.
NOWHERE = "redis://127.0.0.1:1/0"


@pytest.mark.parametrize("component", COMPONENTS)
def test_from_config_refuses_a_misspelt_option(component: Any) -> None:
    config = QueueConfig(
        broker_url=NOWHERE,
        storage_url=NOWHERE,
        global_config_url=NOWHERE,
        extra={"redis_socket_timout": 5},
    )
    with pytest.raises(ConfigError) as info:
        component.from_config(config)
    message = str(info.value)
    assert "extra.redis_socket_timout" in message
    for key in OPTIONS:
        assert key in message  # the valid ones are listed


def test_the_app_from_config_refuses_it() -> None:
    with pytest.raises(ConfigError, match="redis_socket_timout"):
        AsyncQueueTasks.from_config(
            broker="redis",
            broker_url=NOWHERE,
            extra={"redis_socket_timout": 5},
        )


@pytest.mark.parametrize("component", COMPONENTS)
def test_constructor_options_are_checked(component: Any) -> None:
    with pytest.raises(ConfigError, match="redis_retrys"):
        component(NOWHERE, options={"redis_retrys": 2})


@pytest.mark.anyio
@pytest.mark.parametrize("component", COMPONENTS)
async def test_start_checks_the_app_config_extra(component: Any) -> None:
    """A component built directly still reads ``config.extra`` at start: checked there."""
    kind = {RedisBroker: "broker", RedisStorage: "storage", RedisGlobalConfig: "global_config"}
    app = AsyncQueueTasks(
        **{kind[component]: component(NOWHERE)},
        config=QueueConfig(extra={"redis_fast_lan": False}),
    )
    with anyio.fail_after(10), pytest.raises(ConfigError, match="redis_fast_lan"):
        await app.start()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("redis_socket_timeout", "5"),
        ("redis_retries", 1.5),
        ("redis_retries", True),
        ("redis_cluster", "yes"),
        ("redis_prefix", 3),
    ],
)
def test_ill_typed_options_are_refused(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"extra\.{key} expects"):
        RedisBroker.from_config(QueueConfig(extra={key: value}))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("redis_socket_timeout", 0),
        ("redis_socket_timeout", -5.0),
        ("redis_socket_timeout", float("inf")),
        ("redis_connect_timeout", 0),
        ("redis_connect_timeout", float("nan")),
    ],
)
@pytest.mark.parametrize("component", COMPONENTS)
def test_a_timeout_that_is_not_a_positive_number_is_refused(
    component: Any, key: str, value: float
) -> None:
    """A socket timeout of 0 made every call hang past its own timeout (add_task(timeout=3)
    included), and a connect timeout of 0 read as "cannot reach Redis", which a worker waits
    on for ever: both are refused when the component is built, as a type error is."""
    with pytest.raises(ConfigError, match=rf"extra\.{key} must be a number of seconds above 0"):
        component(NOWHERE, options={key: value})


def test_an_ill_typed_option_is_quoted_masked() -> None:
    """A URL given to the wrong key (or as bytes) is quoted in the error without its secret."""
    for value in ("redis://default:hunter2@h:6379/0", b"redis://default:hunter2@h:6379/0"):
        with pytest.raises(ConfigError) as info:
            RedisBroker.from_config(QueueConfig(extra={"redis_cluster": value}))
        assert "redis://default:***@h:6379/0" in str(info.value)
        assert "hunter2" not in str(info.value)


def test_valid_and_foreign_options_are_accepted() -> None:
    extra = {
        "redis_queue": "mail",
        "redis_prefix": "app",
        "redis_retries": 2,
        "redis_retry_cap": 2,  # an int is a fine float
        "redis_socket_timeout": 1.5,
        "redis_fast_lane": False,
        "rabbitmq_queue": "other",  # another component's key: not Redis' business
        "audit": {"level": 1},
    }
    broker = RedisBroker.from_config(QueueConfig(broker_url=NOWHERE, extra=extra))
    assert (broker.queue, broker.prefix) == ("mail", "app")


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("redis_retries", -1, "0 or more"),
        ("redis_retry_cap", -0.5, "a number of seconds of 0 or more"),
        ("redis_retry_cap", float("nan"), "a number of seconds of 0 or more"),
        ("redis_health_check_interval", -5, "a number of seconds of 0 or more"),
        ("redis_queue", "", "a non-empty queue name"),
        ("redis_wait_connections", -1, "0 or more"),
    ],
)
@pytest.mark.parametrize("component", COMPONENTS)
def test_an_option_out_of_its_range_is_refused(
    component: Any, key: str, value: Any, allowed: str
) -> None:
    """redis_retries=-1 retried for ever in redis-py's clients and never in the fast lane, a
    negative retry cap retried in a tight loop, a negative health-check interval pinged before
    every command, an empty queue name made keys like ``{qtasks:}:ready``, a negative number of
    wait connections was refused only at start: each is refused when the component is built,
    naming the key and what it allows."""
    with pytest.raises(ConfigError, match=rf"extra\.{key} must be {allowed}, got"):
        component(NOWHERE, options={key: value})
    with pytest.raises(ConfigError, match=rf"extra\.{key} must be {allowed}, got"):
        component.from_config(QueueConfig(extra={key: value}))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("redis_retries", 0),
        ("redis_retry_cap", 0),
        ("redis_health_check_interval", 0),
        ("redis_wait_connections", 0),
    ],
)
def test_zero_is_allowed_where_it_means_none(key: str, value: int) -> None:
    """No retries, no backoff, no health check, every wait on the shared watch: 0 is a
    choice, not a typo."""
    RedisBroker(NOWHERE, options={key: value})


def test_an_empty_queue_name_given_to_the_broker_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"queue \(extra\.redis_queue\) must not be empty"):
        RedisBroker(NOWHERE, queue="")
