"""A URL given without a component name, and a URL flag given for a component the app's code
built: neither may leave the worker serving on an in-memory component without a word (review
r15 #1, #2)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qtasks import AsyncQueueTasks, QueueConfig, QueueTasks
from qtasks.cli import resolve_app
from qtasks.config import follow_broker, load_config
from qtasks.errors import ConfigError
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

CONFIG_APP = """
from qtasks import QueueTasks

app = QueueTasks.from_config(name="shop")


@app.task
def add(a: int, b: int) -> int:
    return a + b
"""


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory for an app module, importable and the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith(("objapp_", "urlapp_")):
            sys.modules.pop(name, None)


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/11", "rediss://h:6380/0", "unix:///run/redis.sock"]
)
def test_a_broker_url_alone_names_its_backend_as_the_constructor_does(url: str) -> None:
    """``broker_url`` without ``broker`` was dropped: the worker served in memory while a
    producer given the same URL in code (``QueueTasks(broker_url=...)``) used Redis."""
    for loaded in (
        load_config(env={"QTASKS_BROKER_URL": url}),
        load_config(env={}, cli={"broker_url": url}),
    ):
        followed = follow_broker(loaded)
        config = followed.config
        assert (config.broker, config.storage, config.global_config) == ("redis",) * 3
        assert (config.storage_url, config.global_config_url) == (url, url)
        assert followed.sources["broker"] == "follows the scheme of broker_url"
    producer = QueueTasks(broker_url=url)
    assert type(producer.broker) is RedisBroker
    producer.close()


def test_a_url_with_a_scheme_no_backend_serves_is_an_error_naming_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        follow_broker(load_config(env={"QTASKS_BROKER_URL": "kafka://u:hunter2@h:9092"}))
    message = str(caught.value)
    assert message.startswith("env QTASKS_BROKER_URL: broker_url 'kafka://u:***@h:9092' is set")
    assert "set broker to the name of the component (--broker NAME)" in message
    assert "hunter2" not in message
    # An amqp:// URL names RabbitMQ, which keeps no records: the usual error, not memory.
    with pytest.raises(ConfigError, match="broker 'rabbitmq' provides no storage"):
        follow_broker(load_config(env={"QTASKS_BROKER_URL": "amqp://guest@h/"}))


def test_a_storage_url_alone_names_its_backend() -> None:
    followed = follow_broker(load_config(env={}, cli={"storage_url": "redis://h:6379/2"}))
    assert (followed.config.broker, followed.config.storage) == ("memory", "redis")
    assert followed.sources["storage"] == "follows the scheme of storage_url"


def test_a_config_with_a_broker_url_given_to_the_constructor_builds_redis(
    redis_url: str,
) -> None:
    app = AsyncQueueTasks(config=QueueConfig(broker_url=redis_url, plugins_disabled=["*"]))
    assert (type(app.broker), type(app.storage), type(app.global_config)) == (
        RedisBroker,
        RedisStorage,
        RedisGlobalConfig,
    )


def test_a_worker_given_only_a_broker_url_serves_a_producer_built_from_it(
    redis_url: str, prefix: str, module: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review's scenario end to end: the worker's app is ``from_config`` with only
    ``broker_url`` in qtasks.toml, the producer ``QueueTasks(broker_url=...)``."""
    name = f"urlapp_{prefix.replace('-', '_')}"
    (module / f"{name}.py").write_text(CONFIG_APP)
    (module / "qtasks.toml").write_text(
        f'broker_url = "{redis_url}"\nplugins_disabled = ["*"]\n'
        f'[extra]\nredis_prefix = "{prefix}"\n'
    )
    worker = resolve_app(f"{name}:app", None, {}, need_tasks=True)
    assert isinstance(worker, QueueTasks)
    assert type(worker.aio.broker) is RedisBroker
    producer = QueueTasks(
        broker_url=redis_url,
        config=QueueConfig(plugins_disabled=["*"], extra={"redis_prefix": prefix}),
    )
    try:
        with worker:
            assert producer.add_task("add", 2, 3, timeout=10).returning == 5
    finally:
        producer.close()
        worker.close()


def test_a_broker_url_flag_alone_gives_the_redis_components(redis_url: str, module: Path) -> None:
    """``qtasks run --broker-url redis://...`` on an app that leaves its components to the
    configuration: a Redis worker, not a MemoryBroker that ignores the flag."""
    (module / "urlapp_flag.py").write_text(
        "from qtasks import QueueConfig, QueueTasks\n"
        "app = QueueTasks(config=QueueConfig(plugins_disabled=['*']))\n"
    )
    app = resolve_app("urlapp_flag:app", None, {"broker_url": redis_url}, need_tasks=True)
    assert isinstance(app, QueueTasks)
    assert (type(app.aio.broker), type(app.aio.storage)) == (RedisBroker, RedisStorage)
    assert app.aio.config.storage_url == redis_url
    assert app.aio.config_sources["broker"] == "follows the scheme of broker_url"
