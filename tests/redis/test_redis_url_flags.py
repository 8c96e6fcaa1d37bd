"""A URL given without a component name, and a URL flag given for a component the app's code
built: neither may leave the worker serving on an in-memory component without a word (review
r15 #1, #2)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qtasks import AsyncQueueTasks, QueueConfig, QueueTasks
from qtasks.cli import cli, resolve_app
from qtasks.config import follow_broker, load_config
from qtasks.errors import ConfigError
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

OBJECT_APP = """
from qtasks import QueueTasks
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

app = QueueTasks(
    "obj",
    broker=RedisBroker(URL, queue="mail", prefix=PREFIX),
    storage=RedisStorage(URL, prefix=PREFIX),
    global_config=RedisGlobalConfig(URL, prefix=PREFIX),
)


@app.task
def hello() -> str:
    return "hi"
"""

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


def test_a_url_flag_for_a_component_built_in_code_is_refused(
    redis_url: str, prefix: str, module: Path
) -> None:
    """``--broker-url`` rebuilt the broker by the configuration's name, still the default
    ``memory``: the worker served an in-memory queue, silently. Now it is refused, naming the
    installed name of the object's class to give on purpose."""
    name = f"objapp_{prefix.replace('-', '_')}"
    source = OBJECT_APP.replace("URL", repr(redis_url)).replace("PREFIX", repr(prefix))
    (module / f"{name}.py").write_text(source)
    other = redis_url.rsplit("/", 1)[0] + "/12"
    for flag, kind, cls in (
        ("--broker-url", "broker", "RedisBroker"),
        ("--storage-url", "storage", "RedisStorage"),
        ("--global-config-url", "global config", "RedisGlobalConfig"),
    ):
        # inspect, not run: without the check, run would serve until stopped.
        result = CliRunner().invoke(cli, ["-A", f"{name}:app", "inspect", flag, other])
        assert result.exit_code == 1, result.output
        assert result.output.startswith(
            f"error: {flag}: the app's {kind} ({cls}) was built in code, and a URL flag cannot "
            f"change the URL of an object: give {flag.removesuffix('-url')} redis too"
        ), result.output
    app = sys.modules[name].app
    assert (type(app.broker), type(app.storage)) == (RedisBroker, RedisStorage)
    # Named on purpose, it is rebuilt from the configuration, by that name, at that URL.
    rebuilt = resolve_app(
        f"{name}:app", None, {"broker": "redis", "broker_url": other}, need_tasks=True
    )
    assert isinstance(rebuilt, QueueTasks)
    assert type(rebuilt.aio.broker) is RedisBroker
    assert rebuilt.aio.broker.target.url == other
    assert type(rebuilt.aio.storage) is RedisStorage  # the objects the code built stay
    assert rebuilt.aio.storage.target.url == redis_url


def test_a_url_flag_for_an_object_no_entry_point_names_says_so(
    redis_url: str, module: Path
) -> None:
    (module / "objapp_sub.py").write_text(
        "from qtasks import QueueTasks\n"
        "from qtasks_redis import RedisBroker\n"
        "class MyBroker(RedisBroker):\n    pass\n"
        f"app = QueueTasks(broker=MyBroker({redis_url!r}))\n"
    )
    with pytest.raises(ConfigError) as caught:
        resolve_app("objapp_sub:app", None, {"broker_url": redis_url}, need_tasks=True)
    assert "no installed broker is a MyBroker" in str(caught.value)
    assert "--broker NAME" in str(caught.value)


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


def _config_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "qtasks.config" and r.levelno >= logging.INFO
    ]


def test_config_lines_print_once_when_the_command_applies_its_flags(
    redis_url: str, module: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``qtasks run --prefetch 3`` on an app built with ``from_config()``: the app module's
    import logged how the components follow the broker, and applying the flags derived them
    again, which logged every line a second time."""
    (module / "urlapp_once.py").write_text(CONFIG_APP)
    (module / "qtasks.toml").write_text(f'broker = "redis"\nbroker_url = "{redis_url}"\n')
    caplog.set_level(logging.INFO, "qtasks.config")
    app = resolve_app("urlapp_once:app", None, {"prefetch": 3}, need_tasks=True)
    assert isinstance(app, QueueTasks) and app.aio.config.prefetch == 3
    lines = _config_lines(caplog)
    assert "storage 'redis' follows the broker" in lines
    assert len(lines) == len(set(lines)) == 4, lines


def test_a_flag_that_changes_what_follows_the_broker_is_logged_once(
    redis_url: str, module: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``--broker-url`` gives the storage and global config another URL than the file's:
    the app module's import logged how they follow the broker (a storage without a URL, a
    warning), then applying the flag derived it again with the flag's URL. The app module's
    from_config() now takes the flags: one derivation, said once, with the URL used."""
    (module / "urlapp_twice.py").write_text(CONFIG_APP)
    (module / "qtasks.toml").write_text('broker = "redis"\n')
    caplog.set_level(logging.INFO, "qtasks.config")
    other = redis_url.rsplit("/", 1)[0] + "/13"
    app = resolve_app("urlapp_twice:app", None, {"broker_url": other}, need_tasks=True)
    assert isinstance(app, QueueTasks) and app.aio.config.storage_url == other
    lines = _config_lines(caplog)
    assert lines.count("storage 'redis' follows the broker") == 1, lines
    assert not any("has no storage_url" in line for line in lines), lines
    assert f"storage_url {other} follows broker_url" in lines
    assert len(lines) == len(set(lines)) == 4, lines


def test_config_lines_name_the_url_of_the_flag_not_the_files(
    redis_url: str, module: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``qtasks run -A app --broker-url URL`` with a broker_url in the file: each line that
    says what follows the broker is logged once, with the flag's URL, its password masked;
    the file's URL is in none of them. The app is built with the flag's URL."""
    host = redis_url.split("://", 1)[1].rsplit("/", 1)[0]
    in_file = f"redis://filer:filepw@{host}/12"
    flag = f"redis://flagger:flagpw@{host}/13"
    (module / "urlapp_flagged.py").write_text(CONFIG_APP)
    (module / "qtasks.toml").write_text(f'broker_url = "{in_file}"\n')
    caplog.set_level(logging.INFO, "qtasks.config")
    app = resolve_app("urlapp_flagged:app", None, {"broker_url": flag}, need_tasks=True)
    assert isinstance(app, QueueTasks)
    assert app.aio.config.broker_url == app.aio.config.storage_url == flag
    assert app.aio.config_sources["broker_url"] == "cli --broker-url"
    lines = _config_lines(caplog)
    masked = f"redis://flagger:***@{host}/13"
    assert lines == [
        f"broker 'redis' follows the scheme of broker_url {masked}",
        "storage 'redis' follows the broker",
        f"storage_url {masked} follows broker_url",
        "global config 'redis' follows the broker",
        f"global_config_url {masked} follows broker_url",
    ], lines
    assert not any("filer" in line or "pw" in line for line in lines)
