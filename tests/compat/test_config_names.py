"""QTasks 1.7's config names and ``QTASKS_*`` variables, and ``QueueTasks(broker_url=...)``."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from qtasks import MemoryBroker, QueueConfig, QueueTasks
from qtasks.compat.config import BUILT_IN, RENAMED, QTasksCompatWarning
from qtasks.config import load_config
from qtasks.errors import ConfigError


def test_renamed_fields_read_and_write_the_qtasks_field() -> None:
    app = QueueTasks(name="QueueTasks")
    app.config.task_default_priority = 7
    app.config.logs_default_level_server = logging.DEBUG
    app.config.global_config_status_set_periodic = 3
    assert app.config.default_priority == 7
    assert app.config.task_default_priority == 7
    assert app.config.log_level == "DEBUG"
    assert app.config.logs_default_level_client == "DEBUG"
    assert app.config.heartbeat_interval == 3.0


def test_builtin_behaviours_are_accepted_with_a_warning() -> None:
    config = QueueConfig()
    assert config.running_older_tasks is False  # QTasks' default before it is set
    with pytest.warns(QTasksCompatWarning, match="lease"):
        config.running_older_tasks = True
    with pytest.warns(QTasksCompatWarning, match="result_ttl"):
        config.delete_finished_tasks = True
    with pytest.warns(QTasksCompatWarning, match="not polled"):
        config.result_time_interval = 0.1
    assert config.running_older_tasks is True
    assert config.result_time_interval == 0.1
    assert config == QueueConfig()  # nothing qtasks reads has changed


def test_an_unknown_name_is_still_an_error() -> None:
    config = QueueConfig()
    with pytest.raises(AttributeError, match="task_default_prio"):
        config.task_default_prio = 1
    with pytest.raises(AttributeError):
        _ = config.nonsense


def test_qtasks_variables_map_or_warn() -> None:
    env = {
        "QTASKS_TASK_DEFAULT_PRIORITY": "21",
        "QTASKS_LOGS_DEFAULT_LEVEL_SERVER": "10",
        "QTASKS_MAX_TASKS_PROCESS": "4",
    }
    loaded = load_config(env=env, directory=None)
    assert loaded.config.default_priority == 21
    assert loaded.config.log_level == "DEBUG"
    assert loaded.config.max_tasks_process == 4
    assert loaded.sources["default_priority"] == "env QTASKS_TASK_DEFAULT_PRIORITY"
    with pytest.warns(QTasksCompatWarning, match="QTASKS_RUNNING_OLDER_TASKS"):
        loaded = load_config(env={"QTASKS_RUNNING_OLDER_TASKS": "True"})
    with pytest.raises(ConfigError, match="QTASKS_TASK_DEFAULT_PRIORITY"):
        load_config(env={"QTASKS_TASK_DEFAULT_PRIORITY": "high"})


def test_the_documented_table_lists_every_name() -> None:
    from pathlib import Path

    page = (Path(__file__).parents[2] / "docs" / "coming-from-qtasks.md").read_text()
    for name in (*RENAMED, *BUILT_IN):
        assert f"`{name}`" in page, name


def test_broker_url_needs_a_redis_url() -> None:
    with pytest.raises(ConfigError, match="redis://"):
        QueueTasks(broker_url="amqp://guest@localhost/")
    with pytest.raises(ConfigError, match="either broker= or broker_url="):
        QueueTasks(broker_url="redis://localhost", broker=MemoryBroker())


@pytest.mark.redis
def test_broker_url_builds_the_redis_components(redis_url: str, prefix: str) -> None:
    app = QueueTasks(broker_url=redis_url, config=QueueConfig(extra={"redis_prefix": prefix}))
    assert type(app.broker).__name__ == "RedisBroker"
    assert type(app.storage).__name__ == "RedisStorage"
    assert type(app.global_config).__name__ == "RedisGlobalConfig"

    @app.task(name="test")
    def sample_task(id: int) -> str:
        return f"user {id} saved"

    try:
        with app:
            assert app.add_task("test", 5, timeout=10).returning == "user 5 saved"
    finally:
        app.close()


def test_run_forever_accepts_qtasks_options_with_a_warning() -> None:
    app = QueueTasks()
    app.stop()  # kept: the next run_forever starts and stops at once
    try:
        with pytest.warns(QTasksCompatWarning, match="max_tasks_process"):
            app.run_forever(num_workers=10)
        with pytest.raises(TypeError, match="num_wrokers"):
            app.run_forever(num_wrokers=10)
    finally:
        app.close()


def test_broker_url_without_qtasks_redis_names_the_distribution(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from qtasks import discovery

    real = discovery._entry_points

    def without_redis(kind: Any) -> Any:
        return {name: ep for name, ep in real(kind).items() if name != "redis"}

    monkeypatch.setattr(discovery, "_entry_points", without_redis)
    with pytest.raises(ConfigError, match="pip install qtasks-redis"):
        QueueTasks(broker_url="redis://localhost:6379/0")
