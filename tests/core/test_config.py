"""Configuration: files, environment, CLI flags and code, their precedence and their errors."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from qtasks import AsyncQueueTasks, QueueConfig, QueueTasks, TaskStatus
from qtasks.config import find_config_file, load_config
from qtasks.errors import ConfigError

pytestmark = pytest.mark.anyio


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_precedence_file_then_env_then_cli_then_code(tmp_path: Path) -> None:
    file = write(
        tmp_path / "qtasks.toml",
        'prefetch = 3\nlease = 12\nlog_level = "DEBUG"\nbroker_url = "redis://file"\n'
        "max_tasks_process = 2\n",
    )
    env = {"QTASKS_LEASE": "20", "QTASKS_BROKER_URL": "redis://env", "QTASKS_PREFETCH": "4"}
    loaded = load_config(
        file,
        env=env,
        cli={"broker_url": "redis://cli", "prefetch": 5, "log_level": None},
        overrides={"prefetch": 6},
    )
    config = loaded.config
    assert (config.max_tasks_process, config.lease, config.broker_url, config.prefetch) == (
        2,
        20.0,
        "redis://cli",
        6,
    )
    assert config.log_level == "DEBUG"  # a flag that was not given does not count
    assert loaded.sources["max_tasks_process"] == str(file)
    assert loaded.sources["lease"] == "env QTASKS_LEASE"
    assert loaded.sources["broker_url"] == "cli --broker-url"
    assert loaded.sources["prefetch"] == "code"
    assert loaded.sources["retry"] == "default"
    assert loaded.path == file


def test_pyproject_tool_table_and_qtasks_toml_wins(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", '[project]\nname = "x"\n\n[tool.qtasks]\nretry = 2\n')
    found = find_config_file(tmp_path)
    assert found == (tmp_path / "pyproject.toml", True)
    loaded = load_config(directory=tmp_path, env={})
    assert loaded.config.retry == 2
    assert loaded.sources["retry"] == f"{tmp_path / 'pyproject.toml'} [tool.qtasks]"
    write(tmp_path / "qtasks.toml", "retry = 4\n")
    assert load_config(directory=tmp_path, env={}).config.retry == 4


def test_a_tool_qtasks_table_beside_qtasks_toml_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``[tool.qtasks]`` written while a ``qtasks.toml`` sits beside it (left from an earlier
    setup) was ignored without a word: the worker ran with other settings than those read."""
    write(tmp_path / "pyproject.toml", "[tool.qtasks]\nmax_tasks_process = 4\n")
    write(tmp_path / "qtasks.toml", 'broker = "memory"\n')
    with caplog.at_level("WARNING", logger="qtasks.config"):
        assert load_config(directory=tmp_path, env={}).config.max_tasks_process == 10
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'qtasks.toml'} is read and [tool.qtasks] of "
        f"{tmp_path / 'pyproject.toml'} is not (qtasks.toml wins): keep the settings in one "
        "of the two"
    ]
    caplog.clear()
    # A pyproject.toml without the table, or one that is not TOML, is not a conflict.
    for text in ('[project]\nname = "x"\n', "[tool.qtasks\n"):
        write(tmp_path / "pyproject.toml", text)
        with caplog.at_level("WARNING", logger="qtasks.config"):
            assert load_config(directory=tmp_path, env={}).config.broker == "memory"
        assert caplog.records == []


def test_pyproject_without_tool_qtasks_is_not_a_config(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", '[project]\nname = "x"\n')
    assert find_config_file(tmp_path) is None
    assert load_config(directory=tmp_path, env={}).config == QueueConfig()


def test_a_pyproject_named_without_a_tool_qtasks_table_is_an_error(tmp_path: Path) -> None:
    """``qtasks -c pyproject.toml`` (or ``$QTASKS_CONFIG``) naming a file without the table
    (the monorepo's root one, say) ran with the defaults: a worker serving an in-memory queue,
    without a word."""
    file = write(tmp_path / "pyproject.toml", '[project]\nname = "x"\n\n[tool.ruff]\n')
    for how in ({"path": file, "env": {}}, {"env": {"QTASKS_CONFIG": str(file)}}):
        with pytest.raises(ConfigError) as info:
            load_config(**how)
        assert str(info.value) == f"{file}: no [tool.qtasks] table (the settings live there)"
    write(file, "[tool.qtasks]\n")  # an empty table: the defaults, on purpose
    assert load_config(file, env={}).config == QueueConfig()


def test_qtasks_config_env_names_the_file(tmp_path: Path) -> None:
    file = write(tmp_path / "prod.toml", 'broker = "memory"\nshutdown_grace = 2.5\n')
    loaded = load_config(env={"QTASKS_CONFIG": str(file)}, directory=tmp_path / "nowhere")
    assert loaded.config.shutdown_grace == 2.5


def test_nested_tables_and_lists(tmp_path: Path) -> None:
    file = write(
        tmp_path / "qtasks.toml",
        'plugins_disabled = ["audit"]\n\n[extra.redis]\nsocket_timeout = 5\n\n'
        '[[extra.timers]]\ntask = "report"\ncron = "0 * * * *"\n',
    )
    config = load_config(file, env={}).config
    assert config.plugins_disabled == ["audit"]
    assert config.extra == {
        "redis": {"socket_timeout": 5},
        "timers": [{"task": "report", "cron": "0 * * * *"}],
    }


def test_unknown_key_in_a_file_is_an_error_naming_file_and_key(tmp_path: Path) -> None:
    file = write(tmp_path / "pyproject.toml", "[tool.qtasks]\nconcurency = 4\n")
    with pytest.raises(ConfigError) as info:
        load_config(file, env={})
    message = str(info.value)
    assert str(file) in message
    assert "[tool.qtasks]" in message
    assert "unknown key 'concurency'" in message
    assert "max_tasks_process" in message  # the known keys are listed


def test_an_unknown_key_close_to_a_setting_suggests_it(tmp_path: Path) -> None:
    """The list of every key did not say which one was meant (review r15 #12)."""
    file = write(tmp_path / "qtasks.toml", "brokr = 'redis'\n")
    with pytest.raises(ConfigError) as info:
        load_config(file, env={})
    assert f"{file}: unknown key 'brokr' (did you mean 'broker'?; known keys: app, " in str(
        info.value
    )
    with pytest.raises(ConfigError) as info:
        load_config(env={"QTASKS_MAX_TASK_PROCESS": "2"}, directory=tmp_path / "none")
    assert str(info.value).startswith(
        "env QTASKS_MAX_TASK_PROCESS: unknown key 'max_task_process' (did you mean "
        "'max_tasks_process'?; known keys: "
    )
    with pytest.raises(ConfigError) as info:
        load_config(env={}, cli={"zzz": 1})
    assert "unknown key 'zzz' (known keys: app, " in str(info.value)  # close to none


@pytest.mark.parametrize("header", ["[tool.qtasks]", "[qtasks]"])
def test_a_settings_table_in_qtasks_toml_says_the_settings_are_at_its_top_level(
    tmp_path: Path, header: str
) -> None:
    """``[tool.qtasks]`` copied from a pyproject into qtasks.toml said "unknown key 'tool'"
    (or 'qtasks') and listed every setting, the newcomer's broker = "redis" right there."""
    file = write(tmp_path / "qtasks.toml", f'{header}\nbroker = "redis"\n')
    with pytest.raises(ConfigError) as info:
        load_config(file, env={})
    assert str(info.value) == (
        f"{file}: a {header} table: in qtasks.toml the settings are at the top level, with no "
        'table header (broker = "redis"); [tool.qtasks] is pyproject.toml\'s'
    )


def test_concurrency_names_the_setting_it_means(tmp_path: Path) -> None:
    """``concurrency = 8`` (``qtasks run --concurrency``'s name, Celery's
    ``worker_concurrency``) is close to no key by spelling: nothing said which one it is."""
    for key in ["concurrency", "worker_concurrency"]:
        file = write(tmp_path / "qtasks.toml", f"{key} = 8\n")
        with pytest.raises(
            ConfigError, match=f"unknown key '{key}' \\(did you mean 'max_tasks_process'"
        ):
            load_config(file, env={})
    with pytest.raises(
        ConfigError, match=r"env QTASKS_CONCURRENCY: .*did you mean 'max_tasks_process'"
    ):
        load_config(env={"QTASKS_CONCURRENCY": "8"}, directory=tmp_path / "none")


def test_a_mistyped_extension_table_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``[extra.audti]`` for the installed plugin ``audit``: the plugin reads its own table,
    finds none and runs with its defaults; a table close to no installed name is left alone
    (a plugin added in code may read it) (review r15 #12)."""
    file = write(
        tmp_path / "qtasks.toml",
        '[extra.audti]\nprefix = "p"\n\n[extra.audit]\nprefix = "q"\n\n'
        "[extra.mine]\nx = 1\n\n[[extra.timers]]\ntask = 't'\nevery = 5\n",
    )
    with caplog.at_level("WARNING", logger="qtasks.config"):
        load_config(file, env={})
    assert [r.getMessage() for r in caplog.records] == [
        f"{file}: [extra.audti] is read by nothing installed; a typo of [extra.audit]?"
    ]
    caplog.clear()
    pyproject = write(tmp_path / "pyproject.toml", "[tool.qtasks.extra.tracng]\nservice = 'shop'\n")
    with caplog.at_level("WARNING", logger="qtasks.config"):
        load_config(pyproject, env={})
    assert [r.getMessage() for r in caplog.records] == [
        f"{pyproject}: [tool.qtasks.extra.tracng] is read by nothing installed; a typo of "
        "[tool.qtasks.extra.tracing]?"
    ]


def test_wrong_type_names_file_key_and_expected_type(tmp_path: Path) -> None:
    file = write(tmp_path / "qtasks.toml", 'max_tasks_process = "10"\n')
    with pytest.raises(
        ConfigError, match=r"qtasks\.toml: 'max_tasks_process' expects int, got str"
    ):
        load_config(file, env={})
    write(file, "lease = true\n")
    with pytest.raises(ConfigError, match="'lease' expects float, got bool"):
        load_config(file, env={})
    write(file, "plugins_disabled = [1]\n")
    with pytest.raises(ConfigError, match=r"'plugins_disabled' expects list\[str\]"):
        load_config(file, env={})


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    file = write(tmp_path / "qtasks.toml", "prefetch = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_config(file, env={})
    assert str(file) in str(info.value)
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_config(tmp_path / "absent.toml", env={})


def test_env_values_are_parsed_and_checked(tmp_path: Path) -> None:
    env = {
        "QTASKS_RESULT_TTL": "none",
        "QTASKS_PLUGINS_DISABLED": "audit, timer",
        "QTASKS_EXTRA": '{"a": 1}',
        "QTASKS_MAX_TASKS_PROCESS": "7",
        "OTHER": "ignored",
    }
    config = load_config(env=env, directory=tmp_path).config
    assert config.result_ttl is None
    assert config.plugins_disabled == ["audit", "timer"]
    assert config.extra == {"a": 1}
    assert config.max_tasks_process == 7
    with pytest.raises(ConfigError, match="env QTASKS_PREFETCH: 'prefetch' expects int"):
        load_config(env={"QTASKS_PREFETCH": "many"}, directory=tmp_path)
    with pytest.raises(ConfigError, match="env QTASKS_EXTRA: 'extra' expects JSON"):
        load_config(env={"QTASKS_EXTRA": "{nope"}, directory=tmp_path)


def test_unknown_env_variable_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="env QTASKS_CONCURENCY: unknown key 'concurency'"):
        load_config(env={"QTASKS_CONCURENCY": "4"}, directory=tmp_path)


def test_cli_and_code_values_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cli --concurrency: 'max_tasks_process' expects int"):
        load_config(env={}, directory=tmp_path, cli={"max_tasks_process": "x"})
    with pytest.raises(ConfigError, match="keyword argument: unknown key 'brokr'"):
        load_config(env={}, directory=tmp_path, overrides={"brokr": "redis"})


async def test_async_app_from_config_builds_components_by_name_and_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(
        tmp_path / "qtasks.toml",
        'broker = "memory"\nstorage = "memory"\nprefetch = 2\nlease = 5\n',
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QTASKS_PREFETCH", "3")
    app = AsyncQueueTasks.from_config(name="cfg", max_tasks_process=2)
    assert (app.name, app.config.prefetch, app.config.max_tasks_process) == ("cfg", 3, 2)
    assert app.config_sources["max_tasks_process"] == "code"
    assert type(app.broker).__name__ == "MemoryBroker"
    assert app.hooks.pm.has_plugin("audit")  # installed plugins load with the app

    @app.task
    async def square(x: int) -> int:
        return x * x

    try:
        async with app:
            task = await square.add_task(7, timeout=5)
    finally:
        await app.aclose()
    assert (task.status, task.returning) == (TaskStatus.SUCCESS, 49)


def test_sync_app_from_config_with_a_path(tmp_path: Path) -> None:
    file = write(tmp_path / "pyproject.toml", '[tool.qtasks]\nplugins_disabled = ["audit"]\n')
    app = QueueTasks.from_config(file)
    assert not app.hooks.pm.has_plugin("audit")
    assert app.aio.config_sources["plugins_disabled"].endswith("[tool.qtasks]")

    @app.task
    def inc(x: int) -> int:
        return x + 1

    try:
        with app:
            assert app.add_task("inc", 1, timeout=5).returning == 2
    finally:
        app.close()


def test_from_config_with_a_missing_component_fails_clearly(tmp_path: Path) -> None:
    file = write(tmp_path / "qtasks.toml", 'broker = "kafka"\n')
    with pytest.raises(ConfigError, match="no broker named 'kafka' is installed") as info:
        QueueTasks.from_config(file)
    assert "memory" in str(info.value)
    assert "did you mean" not in str(info.value)  # close to no installed name


def test_a_misspelt_component_name_names_the_installed_one(tmp_path: Path) -> None:
    """``broker = "memroy"`` said only that no such broker is installed and to install one
    (unknown keys and ``QTASKS_*`` variables name the closest already)."""
    file = write(tmp_path / "qtasks.toml", 'broker = "memroy"\n')
    with pytest.raises(ConfigError) as info:
        QueueTasks.from_config(file)
    assert "is installed (installed: memory" in str(info.value)
    assert "; did you mean 'memory'? Else install a distribution that declares" in str(info.value)


def test_prefetch_defaults_to_a_fifth_of_the_concurrency() -> None:
    assert QueueConfig().prefetch is None
    assert QueueConfig().prefetch_for(4) == 10  # at least 10
    assert QueueConfig().prefetch_for(100) == 20
    assert QueueConfig(prefetch=3).prefetch_for(100) == 3  # a set value is kept, even 0
    assert QueueConfig(prefetch=0).prefetch_for(100) == 0


def test_mask_url_hides_credentials_only() -> None:
    from qtasks.masking import mask_url

    assert mask_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert mask_url("amqp://guest:guest@127.0.0.1:5672/") == "amqp://guest:***@127.0.0.1:5672/"
    assert mask_url("redis://@h/0") == "redis://@h/0"  # no user information to hide
    assert mask_url("redis://h:6379/0") == "redis://h:6379/0"
    assert mask_url("redis://h:6379/0?db=2&client_name=w") == "redis://h:6379/0?db=2&client_name=w"
    assert mask_url(None) is None


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # redis-py and urlsplit end the user information at the last "@".
        ("redis://default:hunter2@xx@127.0.0.1:6379/9", "redis://default:***@127.0.0.1:6379/9"),
        ("redis://127.0.0.1:6379/9?password=hunter2", "redis://127.0.0.1:6379/9?password=***"),
        (
            "redis://h/0?db=1&Password=hunter2&token=x#f",
            "redis://h/0?db=1&Password=***&token=***#f",
        ),
        ("redis://h/0?password=hunt@er2", "redis://h/0?password=***"),
        ("unix:///tmp/r.sock?password=hunter2", "unix:///tmp/r.sock?password=***"),
        # An unencoded "/" or "?" in the password: where it ends is unknowable, mask it all.
        ("redis://u:hun/ter2@h:6379/0", "redis://***"),
        ("redis://u:hun?ter2@h:6379/0", "redis://***"),
        ("redis://[::1", "***"),  # does not parse
        # User information without ":" is a key (a user name cannot be told from one).
        ("https://0a1b2c3d@o123.ingest.sentry.io/42", "https://***@o123.ingest.sentry.io/42"),
        ("redis://token@host", "redis://***@host"),
        ("redis://user@h/0?db=1", "redis://***@h/0?db=1"),
        ("redis://key@xx@127.0.0.1:6379/9", "redis://***@127.0.0.1:6379/9"),
    ],
)
def test_mask_url_hides_every_form_of_password(url: str, shown: str) -> None:
    from qtasks.masking import mask_url

    assert mask_url(url) == shown


def test_the_url_a_storage_follows_is_logged_without_its_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from qtasks.config import follow_broker

    for url in (
        "redis://default:hunter2@xx@10.0.0.5:6379/9",
        "redis://10.0.0.5/9?password=hunter2",
    ):
        loaded = load_config(env={}, overrides={"broker": "redis", "broker_url": url})
        with caplog.at_level("INFO", logger="qtasks.config"):
            assert follow_broker(loaded).config.storage_url == url  # the URL itself is kept
        logged = " ".join(r.getMessage() for r in caplog.records)
        assert "follows broker_url" in logged and "10.0.0.5" in logged
        assert "hunter2" not in logged and "xx@" not in logged
        caplog.clear()


def test_a_setting_written_after_an_extra_table_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The TOML pitfall: keys below ``[tool.qtasks.extra.x]`` belong to that table."""
    (tmp_path / "pyproject.toml").write_text(
        "[tool.qtasks]\nbroker = 'memory'\n\n"
        "[tool.qtasks.extra]\nredis_queue = 'q'\nlease = 5\n\n"
        "[tool.qtasks.extra.audit]\nprefix = 'p'\nretry = 2\n"
    )
    with caplog.at_level("WARNING", logger="qtasks.config"):
        loaded = load_config(tmp_path / "pyproject.toml")
    assert (loaded.config.lease, loaded.config.retry) == (30, 0)  # not settings
    warned = [r.getMessage() for r in caplog.records]
    assert any("'lease' is inside [tool.qtasks.extra], not a setting" in m for m in warned)
    assert any("'retry' is inside [tool.qtasks.extra.audit], not a setting" in m for m in warned)
    caplog.clear()
    (tmp_path / "qtasks.toml").write_text("retry = 2\n[extra.audit]\nprefix = 'p'\n")
    with caplog.at_level("WARNING", logger="qtasks.config"):
        assert load_config(tmp_path / "qtasks.toml").config.retry == 2
    assert not caplog.records


def test_types_are_checked_from_the_annotations_not_their_text() -> None:
    from dataclasses import fields

    from qtasks.config import _FIELD_TYPES, check_value, type_name

    # Messages name each type as its annotation is written.
    assert {f.name: type_name(_FIELD_TYPES[f.name]) for f in fields(QueueConfig)} == {
        f.name: f.type for f in fields(QueueConfig)
    }
    assert check_value("prefetch", None, "code") is None  # int | None
    assert check_value("lease", 3, "code") == 3.0 and isinstance(
        check_value("lease", 3, "code"), float
    )
    assert check_value("result_ttl", 5, "code") == 5.0  # float | None widens too
    with pytest.raises(ConfigError, match=r"'prefetch' expects int \| None, got bool True"):
        check_value("prefetch", True, "code")
    with pytest.raises(ConfigError, match=r"'lease' must not be empty \(expected float\)"):
        check_value("lease", None, "code")
    with pytest.raises(ConfigError, match=r"'plugins_disabled' expects list\[str\], got list"):
        check_value("plugins_disabled", ["audit", 3], "code")
    with pytest.raises(ConfigError, match=r"'extra' expects dict\[str, Any\], got dict"):
        check_value("extra", {1: "a"}, "code")  # keys are names
    assert check_value("extra", {"a": [1, None]}, "code") == {"a": [1, None]}


def test_a_bytes_value_of_the_wrong_type_is_masked_in_the_error() -> None:
    """Bytes are quoted in the error as ``b'...'``: masked as the string they hold."""
    from qtasks.config import check_value
    from qtasks.masking import MASK, masked_entry

    url = b"redis://default:hunter2@h:6379/0"
    with pytest.raises(ConfigError) as info:
        check_value("broker_url", url, "code")
    assert "got bytes b'redis://default:***@h:6379/0'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        QueueConfig(storage_url=bytearray(b"redis://0a1b2c3d@h/0"))  # type: ignore[arg-type]  # the mistake under test
    assert "got bytearray bytearray(b'redis://***@h/0')" in str(info.value)
    with pytest.raises(ConfigError) as info:
        check_value("plugins_disabled", [b"amqp://u:hunter2@h/"], "code")
    assert "hunter2" not in str(info.value)
    # The name rule holds for a bytes name too, and a value under a secret name goes whole.
    assert masked_entry(b"api_key", "k-hunter2") == MASK
    assert masked_entry("password", b"hunter2") == MASK
    assert masked_entry("host", b"h\xff") == b"h\xff"  # bytes that are no URL are kept as they are


def test_a_variable_named_in_an_env_reference_is_not_a_setting(tmp_path: Path) -> None:
    """qtasks-web's documented ``token = "env:QTASKS_WEB_TOKEN"``: the variable holds the
    secret, it is no setting, wherever the reference is (file, code, QTASKS_EXTRA)."""
    file = write(
        tmp_path / "qtasks.toml",
        '[extra.dash]\ntoken = "env:QTASKS_DASH_TOKEN"\n'
        'users = { ops = "env:QTASKS_DASH_OPS_PASSWORD" }\n',
    )
    env = {"QTASKS_DASH_TOKEN": "s3cret", "QTASKS_DASH_OPS_PASSWORD": "pw", "QTASKS_RETRY": "2"}
    loaded = load_config(file, env=env)
    assert loaded.config.retry == 2
    assert loaded.config.extra == {
        "dash": {"token": "env:QTASKS_DASH_TOKEN", "users": {"ops": "env:QTASKS_DASH_OPS_PASSWORD"}}
    }
    assert not any("DASH" in source for source in loaded.sources.values())
    code = {"extra": {"dash": {"token": "env:QTASKS_DASH_TOKEN"}}}
    assert load_config(env={"QTASKS_DASH_TOKEN": "s"}, overrides=code, directory=tmp_path / "x")
    as_env = {
        "QTASKS_DASH_TOKEN": "s",
        "QTASKS_EXTRA": '{"dash": {"token": "env:QTASKS_DASH_TOKEN"}}',
    }
    assert load_config(env=as_env, directory=tmp_path / "x").config.extra["dash"]
    # Not referenced, not an extension's: still an error, which says how to make it one.
    with pytest.raises(ConfigError) as caught:
        load_config(env={"QTASKS_DASH_TOKEN": "s"}, directory=tmp_path / "x")
    assert "env QTASKS_DASH_TOKEN: unknown key 'dash_token'" in str(caught.value)
    assert "named in an env: value of the configuration" in str(caught.value)
    assert "s3cret" not in str(caught.value)


@pytest.fixture
def dash_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CLI extension ``dash`` and a plugin ``log`` installed (entry points only)."""
    from importlib.metadata import EntryPoint

    from qtasks import discovery

    real = discovery.entry_points  # type: ignore[attr-defined]  # the name discovery imports
    extensions = {
        "qtasks.cli": [EntryPoint("dash", "dash_cli:cli", "qtasks.cli")],
        # An extension named like a setting's first word does not take that word over.
        "qtasks.plugins": [EntryPoint("log", "log_plugin:Plugin", "qtasks.plugins")],
    }

    def fake(*, group: str) -> Any:
        return extensions.get(group) or real(group=group)

    monkeypatch.setattr(discovery, "entry_points", fake)


@pytest.mark.usefixtures("dash_installed")
def test_variables_of_an_installed_extension_are_left_to_it_and_typos_still_fail(
    tmp_path: Path,
) -> None:
    """A worker sharing the dashboard's environment (a shared .env, a Kubernetes secret) but
    not its configuration: ``QTASKS_<NAME>_*`` of an installed extension is not a setting."""
    nowhere = tmp_path / "nowhere"
    env = {"QTASKS_DASH_TOKEN": "s", "QTASKS_DASH_ADMIN_PASSWORD": "p", "QTASKS_LEASE": "7"}
    assert load_config(env=env, directory=nowhere).config.lease == 7.0
    for typo, key in [
        ("QTASKS_BROKR", "brokr"),
        ("QTASKS_BROKER_URLL", "broker_urll"),
        ("QTASKS_LOG_LEVL", "log_levl"),
        ("QTASKS_DASH", "dash"),
    ]:
        with pytest.raises(ConfigError, match=f"env {typo}: unknown key '{key}'"):
            load_config(env={**env, typo: "x"}, directory=nowhere)


@pytest.mark.usefixtures("dash_installed")
def test_a_typo_of_an_extensions_variable_is_warned_without_its_value(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``QTASKS_DASH_TOKNE`` set while the configuration reads ``env:QTASKS_DASH_TOKEN``,
    which is not: a warning naming both (the extension would fail or run without its token),
    and never the value."""
    file = write(
        tmp_path / "qtasks.toml",
        '[extra.dash]\ntoken = "env:QTASKS_DASH_TOKEN"\n'
        'users = { ops = "env:QTASKS_DASH_OPS_PASSWORD" }\n',
    )
    typo = {"QTASKS_DASH_TOKNE": "s3cret", "QTASKS_DASH_OPS_PASSWORD": "pw"}
    with caplog.at_level("DEBUG", logger="qtasks.config"):
        assert load_config(file, env=typo).config.extra["dash"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1, warned
    assert "env QTASKS_DASH_TOKNE is set but nothing reads it" in warned[0]
    assert "a typo of QTASKS_DASH_TOKEN?" in warned[0]
    assert "s3cret" not in caplog.text
    # Not a typo: the variable it is close to is set too, or it is close to nothing read.
    for env in (
        {**typo, "QTASKS_DASH_TOKEN": "t"},
        {"QTASKS_DASH_TOKEN": "t", "QTASKS_DASH_OPS_PASSWORD": "pw", "QTASKS_DASH_PORT": "1"},
    ):
        caplog.clear()
        with caplog.at_level("DEBUG", logger="qtasks.config"):
            load_config(file, env=env)
        assert not [r for r in caplog.records if r.levelname == "WARNING"]
        assert "left to the extension 'dash'" in caplog.text


def test_dead_letter_retention_defaults_and_sources(tmp_path: Path) -> None:
    """7 days and 100,000 per queue by default; each read from a file, the environment or
    code, ``None`` (``none`` in the environment) turning it off."""
    assert (QueueConfig().dead_letter_ttl, QueueConfig().max_dead_letters) == (604800.0, 100_000)
    file = write(tmp_path / "qtasks.toml", "dead_letter_ttl = 60\nmax_dead_letters = 500\n")
    config = load_config(file, env={}).config
    assert (config.dead_letter_ttl, config.max_dead_letters) == (60.0, 500)
    assert isinstance(config.dead_letter_ttl, float)
    env = {"QTASKS_DEAD_LETTER_TTL": "none", "QTASKS_MAX_DEAD_LETTERS": "none"}
    config = load_config(file, env=env).config
    assert (config.dead_letter_ttl, config.max_dead_letters) == (None, None)
    config = load_config(file, env={}, overrides={"dead_letter_ttl": 1.5}).config
    assert config.dead_letter_ttl == 1.5


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("dead_letter_ttl = -1", "'dead_letter_ttl' must be a positive, finite number"),
        ("dead_letter_ttl = 0", "'dead_letter_ttl' must be a positive, finite number"),
        ("dead_letter_ttl = nan", "'dead_letter_ttl' must be a positive, finite number"),
        ("dead_letter_ttl = inf", "'dead_letter_ttl' must be a positive, finite number"),
        ('dead_letter_ttl = "7d"', "'dead_letter_ttl' expects float | None, got str"),
        ("max_dead_letters = 0", "'max_dead_letters' must be a positive, finite number"),
        ("max_dead_letters = -5", "'max_dead_letters' must be a positive, finite number"),
        ("max_dead_letters = 1.5", "'max_dead_letters' expects int | None, got float"),
        ("max_dead_letters = true", "'max_dead_letters' expects int | None, got bool"),
    ],
)
def test_bad_dead_letter_retention_is_refused(tmp_path: Path, text: str, error: str) -> None:
    file = write(tmp_path / "qtasks.toml", text + "\n")
    with pytest.raises(ConfigError, match=rf"qtasks\.toml: {error}"):
        load_config(file, env={})


def test_bad_dead_letter_retention_from_env_and_code_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="env QTASKS_DEAD_LETTER_TTL: 'dead_letter_ttl' must"):
        load_config(env={"QTASKS_DEAD_LETTER_TTL": "-inf"}, directory=tmp_path)
    with pytest.raises(ConfigError, match="env QTASKS_MAX_DEAD_LETTERS: 'max_dead_letters' exp"):
        load_config(env={"QTASKS_MAX_DEAD_LETTERS": "lots"}, directory=tmp_path)
    with pytest.raises(ConfigError, match=r"keyword argument: 'max_dead_letters' must .* got 0"):
        QueueConfig().merged(max_dead_letters=0)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("lease = 0", "'lease' must be a positive, finite number"),
        ("lease = -30", "'lease' must be a positive, finite number"),
        ("lease = nan", "'lease' must be a positive, finite number"),
        ("result_ttl = inf", "'result_ttl' must be a positive, finite number"),
        ("max_tasks_process = 0", "'max_tasks_process' must be a positive, finite number"),
        ("max_deliveries = -1", "'max_deliveries' must be a positive, finite number"),
        ("heartbeat_interval = 0", "'heartbeat_interval' must be a positive, finite number"),
        ("max_message_size = 0", "'max_message_size' must be a positive, finite number"),
        ("retry_backoff_max = nan", "'retry_backoff_max' must be a positive, finite number"),
        ("loop_stall_warning = -1", "'loop_stall_warning' must be a positive, finite number"),
        ("retry = -1", "'retry' must be a finite number of 0 or more"),
        ("retry_backoff = -0.5", "'retry_backoff' must be a finite number of 0 or more"),
        ("shutdown_grace = inf", "'shutdown_grace' must be a finite number of 0 or more"),
        ("prefetch = -3", "'prefetch' must be a finite number of 0 or more"),
    ],
)
def test_out_of_range_numbers_are_refused_naming_the_setting(
    tmp_path: Path, text: str, error: str
) -> None:
    """A lease of 0, a negative retry, a nan or an inf timing is a clear error where it is
    written, not a worker that redelivers in a loop or never times out."""
    file = write(tmp_path / "qtasks.toml", text + "\n")
    with pytest.raises(ConfigError, match=rf"qtasks\.toml: {error}"):
        load_config(file, env={})
    # Built in code, the same value is refused the same way.
    with pytest.raises(ConfigError, match=rf"QueueConfig: {error}"):
        QueueConfig(**tomllib.loads(text))


def test_a_config_built_in_code_is_checked_as_every_source() -> None:
    """``QueueConfig(...)`` and ``dataclasses.replace`` go through the same check as a file:
    types too, ints widened to floats, the error a :class:`QTasksError`."""
    from dataclasses import replace

    from qtasks.errors import QTasksError

    config = QueueConfig(lease=60, retry=0, prefetch=0, result_ttl=None)
    assert config.lease == 60.0 and isinstance(config.lease, float)
    with pytest.raises(QTasksError, match="QueueConfig: 'lease' expects float, got str '5'"):
        QueueConfig(lease="5")  # type: ignore[arg-type]  # the mistake being refused
    with pytest.raises(ConfigError, match="QueueConfig: 'max_deliveries' must be a positive"):
        replace(config, max_deliveries=0)
    with pytest.raises(ConfigError, match=r"QueueConfig: 'prefetch' expects int \| None, got bool"):
        QueueConfig(prefetch=True)


def test_a_setting_changed_after_the_config_is_built_is_checked_too() -> None:
    """An attribute written later (``config.lease = 0``, or through a QTasks 1.7 name) is
    checked as the constructor's arguments are; what Python allows in code for a setting (a
    tuple for a list, a whole float for an int) is taken as that setting's type."""
    config = QueueConfig(plugins_disabled=("a", "b"), max_message_size=2e6)  # type: ignore[arg-type]
    assert config.plugins_disabled == ["a", "b"]
    assert config.max_message_size == 2_000_000 and type(config.max_message_size) is int
    with pytest.raises(ConfigError, match="QueueConfig: 'lease' must be a positive"):
        config.lease = 0
    with pytest.raises(ConfigError, match="QueueConfig: 'heartbeat_interval' must be a positive"):
        config.global_config_status_set_periodic = 0  # QTasks 1.7's name of heartbeat_interval
    with pytest.raises(ConfigError, match=r"'max_message_size' expects int, got float 1\.5"):
        config.max_message_size = 1.5  # type: ignore[assignment]  # the mistake being refused
    config.lease = 90
    assert config.lease == 90.0 and config.heartbeat_interval > 0


def test_zero_is_a_valid_retry_backoff_grace_and_prefetch(tmp_path: Path) -> None:
    text = "retry = 0\nretry_backoff = 0\nshutdown_grace = 0\nprefetch = 0\nresult_ttl = 0.5\n"
    config = load_config(write(tmp_path / "qtasks.toml", text), env={}).config
    assert (config.retry, config.retry_backoff, config.shutdown_grace, config.prefetch) == (
        0,
        0.0,
        0.0,
        0,
    )
    assert config.result_ttl == 0.5


def test_a_config_given_to_the_constructor_builds_the_components_it_names() -> None:
    """What ``from_config`` would build, the constructor builds too: an unknown name is a
    ConfigError there, not in-memory components without a word; ``memory`` (the default)
    builds nothing by name."""
    with pytest.raises(ConfigError, match="nosuch"):
        AsyncQueueTasks(config=QueueConfig(broker="nosuch"))
    with pytest.raises(ConfigError, match="nosuch"):
        QueueTasks(config=QueueConfig(storage="nosuch"))
    app = AsyncQueueTasks(config=QueueConfig(max_tasks_process=3))
    assert type(app.broker).__name__ == "MemoryBroker" and app.config_sources == {}


@pytest.mark.parametrize("app_class", [AsyncQueueTasks, QueueTasks])
@pytest.mark.parametrize("kind", ["broker", "storage", "global_config"])
def test_a_component_name_given_for_the_object_is_refused_saying_how_to_name_one(
    app_class: type[AsyncQueueTasks] | type[QueueTasks], kind: str
) -> None:
    """``QueueTasks(broker="rabbitmq")`` was kept as the broker and failed at start with
    ``'str' object has no attribute 'start'``: now refused at once, naming the value, what the
    option takes and the two ways to choose a component by name."""
    name = "rabbitmq" if kind == "broker" else "redis"
    with pytest.raises(ConfigError) as info:
        app_class(**{kind: name})  # type: ignore[arg-type]  # the mistake under test
    text = str(info.value)
    cls = app_class.__name__
    label = kind.replace("_", " ")
    assert text.startswith(f"{cls}({kind}={name!r}): {kind}= takes a {label} object (")
    assert f"not a name; to choose the {label} by name, pass config=QueueConfig({kind}=" in text
    assert f"{cls}.from_config({kind}={name!r}) (see docs/configuration.md" in text
    assert f"installed {label}s: memory, " in text


@pytest.mark.parametrize("app_class", [AsyncQueueTasks, QueueTasks])
def test_a_component_class_given_for_the_object_is_refused(
    app_class: type[AsyncQueueTasks] | type[QueueTasks],
) -> None:
    """``broker=MemoryBroker`` (the class, not called) failed only when the app started."""
    from qtasks.memory import MemoryBroker, MemoryStorage

    with pytest.raises(ConfigError) as info:
        app_class(broker=MemoryBroker)  # type: ignore[arg-type]  # the mistake under test
    assert str(info.value) == (
        f"{app_class.__name__}(broker=MemoryBroker): broker= takes a broker object, not its "
        "class; call it: broker=MemoryBroker(...)"
    )
    with pytest.raises(ConfigError, match=r"storage=MemoryStorage\(\.\.\.\)"):
        app_class(storage=MemoryStorage)  # type: ignore[arg-type]


@pytest.mark.parametrize("app_class", [AsyncQueueTasks, QueueTasks])
def test_a_worker_name_or_class_is_refused_by_the_constructor(
    app_class: type[AsyncQueueTasks] | type[QueueTasks],
) -> None:
    """``worker="redis"`` was kept as the worker and failed when the app served
    (``'str' object has no attribute ...``); the class, not called, likewise."""
    from qtasks.worker import QueueWorker

    with pytest.raises(ConfigError) as info:
        app_class(worker="redis")  # type: ignore[arg-type]  # the mistake under test
    text = str(info.value)
    assert text.startswith(
        f"{app_class.__name__}(worker='redis'): worker= takes a worker object "
        "(qtasks.QueueWorker(...)), not a name or URL"
    )
    assert "config=QueueConfig(broker=...)" in text
    with pytest.raises(ConfigError, match=r"worker='redis://user:\*\*\*@host:6379/0'"):
        app_class(worker="redis://user:secret@host:6379/0")  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as info:
        app_class(worker=QueueWorker)  # type: ignore[arg-type]
    assert str(info.value) == (
        f"{app_class.__name__}(worker=QueueWorker): worker= takes a worker object, not its "
        "class; call it: worker=QueueWorker(...)"
    )


def test_a_url_given_for_the_broker_is_refused_pointing_to_broker_url_masked() -> None:
    """QTasks 1.7 took a Redis URL as ``broker_url=``: a URL passed as ``broker=`` says so,
    its password masked; another scheme is pointed to ``QueueConfig(broker_url=...)``."""
    with pytest.raises(ConfigError) as info:
        QueueTasks(broker="redis://:s3cret@localhost:6379/0")  # type: ignore[arg-type]
    text = str(info.value)
    assert "s3cret" not in text
    assert "broker= takes a broker object, not a URL; pass broker_url='redis://:***@" in text
    with pytest.raises(ConfigError, match=r"pass config=QueueConfig\(storage_url='amqp://"):
        AsyncQueueTasks(storage="amqp://guest@localhost/")  # type: ignore[arg-type]
