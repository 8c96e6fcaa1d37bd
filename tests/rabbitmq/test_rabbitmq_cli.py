"""Which storage and global config a RabbitMQ broker gets from configuration: RabbitMQ has
neither, so an unset one is an error naming the options, never a silent in-memory one."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks.cli import cli
from qtasks.errors import ConfigError
from qtasks.memory import MemoryGlobalConfig, MemoryStorage


def test_a_rabbitmq_broker_alone_is_refused_naming_the_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rabbitmq_url: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "qtasks.toml").write_text(
        f'broker = "rabbitmq"\nbroker_url = "{rabbitmq_url}"\nplugins_disabled = ["*"]\n'
    )
    with pytest.raises(ConfigError) as info:
        AsyncQueueTasks.from_config()
    message = str(info.value)
    assert "broker 'rabbitmq' provides no storage and none is set" in message
    assert "--storage NAME and --storage-url URL" in message
    assert "storage and storage_url in the configuration" in message
    assert "guest:guest" not in message
    # The command line says the same, as one line.
    result = CliRunner().invoke(cli, ["add", "anything"])
    assert result.exit_code == 1
    assert result.output.startswith("error: broker 'rabbitmq' provides no storage")


def test_rabbitmq_with_a_redis_storage_gives_the_global_config_to_redis_too(
    tmp_path: Path, rabbitmq_url: str
) -> None:
    file = tmp_path / "qtasks.toml"
    file.write_text(
        f'broker = "rabbitmq"\nbroker_url = "{rabbitmq_url}"\nstorage = "redis"\n'
        'storage_url = "redis://127.0.0.1:6379/2"\nplugins_disabled = ["*"]\n'
    )
    app = AsyncQueueTasks.from_config(file)
    assert type(app.global_config).__name__ == "RedisGlobalConfig"
    assert app.config.global_config_url == "redis://127.0.0.1:6379/2"
    assert app.config_sources["global_config"] == "follows storage"
    # In memory on purpose is allowed when named.
    file.write_text(
        f'broker = "rabbitmq"\nbroker_url = "{rabbitmq_url}"\nstorage = "memory"\n'
        'global_config = "memory"\nplugins_disabled = ["*"]\n'
    )
    app = AsyncQueueTasks.from_config(file)
    assert type(app.storage).__name__ == "MemoryStorage"


def test_a_url_yarl_cannot_read_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    url = "amqp://guest:s3cret-pw@127.0.0.1:notaport/"
    memory = ["--storage", "memory", "--global-config", "memory"]
    # dlq list needs the broker alone. The URL is refused when the broker is built, before
    # the app starts (it was at the link's start, as a connection error).
    result = CliRunner().invoke(
        cli, ["dlq", "list", "--broker", "rabbitmq", "--broker-url", url, *memory]
    )
    # It was yarl's ValueError, uncaught: a traceback of some 90 lines.
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    assert errors[0].startswith("error: broker 'rabbitmq' (qtasks_rabbitmq:RabbitMQBroker, ")
    assert errors[0].endswith(
        "could not be built: ConfigError: bad RabbitMQ URL amqp://guest:***@127.0.0.1:notaport/: "
        "ValueError: Invalid URL: port can't be converted to integer"
    )
    assert "s3cret" not in result.output


def test_the_constructor_and_from_config_keep_memory_chosen_on_purpose(rabbitmq_url: str) -> None:
    """``from_config(storage="memory")`` is a choice (its source is the code), kept. The
    constructor refused the same choice made with objects (``storage=MemoryStorage()``), and
    for ``QueueConfig(storage="memory")``, which a QueueConfig cannot tell from the default
    (``QueueConfig(broker="rabbitmq")`` alone must stay refused), its error offered a flag:
    it now offers the two ways code has."""
    config = QueueConfig(
        broker="rabbitmq", broker_url=rabbitmq_url, storage="memory", plugins_disabled=["*"]
    )
    built = AsyncQueueTasks.from_config(
        broker="rabbitmq",
        broker_url=rabbitmq_url,
        storage="memory",
        global_config="memory",
        plugins_disabled=["*"],
    )
    storage, global_config = MemoryStorage(), MemoryGlobalConfig()
    constructed = AsyncQueueTasks(config=config, storage=storage, global_config=global_config)
    for app in (built, constructed):
        assert type(app.broker).__name__ == "RabbitMQBroker"
        assert (type(app.storage), type(app.global_config)) == (MemoryStorage, MemoryGlobalConfig)
    assert (constructed.storage, constructed.global_config) == (storage, global_config)
    left_unset = QueueConfig(broker="rabbitmq", broker_url=rabbitmq_url, plugins_disabled=["*"])
    assert left_unset == config  # the same value: one answer for both
    for given in (config, left_unset):
        with pytest.raises(ConfigError) as info:
            AsyncQueueTasks(config=given)
        message = str(info.value)
        assert "cannot tell storage='memory' from one left unset" in message, message
        assert "pass storage=MemoryStorage() (qtasks.memory) to the constructor" in message
        assert "from_config(storage='memory')" in message and "guest:guest" not in message
