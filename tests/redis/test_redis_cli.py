"""``qtasks run --broker redis`` works with no code change once qtasks-redis is installed:
a real ``qtasks run`` process serves what ``qtasks add`` (another process) enqueues."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from redis_keys import DOCS_REDIS_URL

from qtasks import AsyncQueueTasks, QueueTasks
from qtasks.memory import MemoryGlobalConfig
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

TASKS = """
from qtasks import QueueConfig, QueueTasks

# In-memory by default: the command line picks Redis. The prefix keeps this test's keys apart
# from a developer's own (the app is built in code, so it does not read a qtasks.toml).
app = QueueTasks(config=QueueConfig(extra={"redis_prefix": PREFIX}))


@app.task
def add(a: int, b: int) -> int:
    return a + b
"""


def test_qtasks_run_with_redis_flags_serves_qtasks_add(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    (tmp_path / "tasks.py").write_text(TASKS.replace("PREFIX", repr(redis_prefix)))
    flags = [
        "-A", "tasks:app",
        "--broker", "redis", "--broker-url", redis_url,
        "--storage", "redis", "--storage-url", redis_url,
        "--global-config", "redis",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": _path(tmp_path), "QTASKS_GLOBAL_CONFIG_URL": redis_url}
    record, out = serve_and_add(tmp_path, env, ["run", *flags], flags, wait=20)
    client = redis.Redis.from_url(redis_url)
    try:  # under the test's own prefix, not the default one of a developer's Redis
        assert client.exists(f"{{{redis_prefix}:rec}}:r:{record['uuid']}")
    finally:
        client.close()
    assert "redis" in out.lower()


def serve_and_add(
    cwd: Path, env: dict[str, str], run: list[str], add_flags: list[str], *, wait: int
) -> tuple[dict[str, Any], str]:
    """``qtasks <run...>`` in a process of its own, ``qtasks add add 2 3 --wait`` from another:
    the record it printed (a success with 5), and the server's output after SIGTERM (exit 0)."""
    added, out, _ = serve_then_add(
        cwd, env, run, ["add", "2", "3", "--wait", str(wait), *add_flags]
    )
    assert added.returncode == 0, added.stdout + added.stderr
    record: dict[str, Any] = json.loads(added.stdout)
    assert (record["status"], record["returning"]) == ("success", 5)
    return record, out


def serve_then_add(
    cwd: Path, env: dict[str, str], run: list[str], add: list[str]
) -> tuple[subprocess.CompletedProcess[str], str, int]:
    """``qtasks <run...>`` in a process of its own, ``qtasks add <add...> --json`` from
    another, then SIGTERM to the first: the add's process, and the server's output and pid
    once it stopped (it must exit 0)."""
    qtasks = [sys.executable, "-m", "qtasks"]
    server = subprocess.Popen(
        [*qtasks, *run],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        added = subprocess.run(
            [*qtasks, "add", *add, "--json"],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=30)
        assert server.returncode == 0, out
        return added, out, server.pid
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _path(first: Path) -> str:
    """``first``, then the caller's PYTHONPATH (a worktree's packages, when one is tested)."""
    return os.pathsep.join(filter(None, [str(first), os.environ.get("PYTHONPATH")]))


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
    return {**env, **extra}


@pytest.mark.timeout(90)
def test_broker_flags_alone_keep_results_where_other_processes_see_them(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    # `qtasks run --broker redis --broker-url X` used to keep results in the worker's memory,
    # so `qtasks add --wait` from another shell timed out although the task ran.
    # from_config(): the app reads qtasks.toml, so both processes use this test's prefix.
    app_line = 'QueueTasks(config=QueueConfig(extra={"redis_prefix": PREFIX}))'
    (tmp_path / "tasks.py").write_text(TASKS.replace(app_line, "QueueTasks.from_config()"))
    (tmp_path / "qtasks.toml").write_text(f'[extra]\nredis_prefix = "{prefix}"\n')
    flags = ["--broker", "redis", "--broker-url", redis_url]
    env = _clean_env(PYTHONPATH=_path(tmp_path))
    _, out = serve_and_add(tmp_path, env, ["-A", "tasks:app", "run", *flags], flags, wait=30)
    assert "storage 'redis' follows the broker" in out
    assert f"global_config_url {redis_url} follows broker_url" in out
    assert f"storage RedisStorage at {redis_url}, global config RedisGlobalConfig at" in out


@pytest.mark.timeout(60)
def test_run_logs_serving_only_once_the_components_started(tmp_path: Path) -> None:
    (tmp_path / "tasks.py").write_text(TASKS.replace("PREFIX", "'unused'"))
    url = f"redis://127.0.0.1:{_free_port()}/0"  # nothing listens there
    command = ["run", "-A", "tasks:app", "--broker", "redis", "--broker-url", url]
    command += ["--start-timeout", "0"]  # fail at once rather than wait for the server
    done = subprocess.run(
        [sys.executable, "-m", "qtasks", *command],
        cwd=tmp_path,
        env=_clean_env(PYTHONPATH=_path(tmp_path)),
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 1, done.stderr
    assert "error: cannot reach Redis" in done.stderr
    assert "serving" not in done.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["toml", "flag"])
def test_run_waits_for_an_unreachable_redis_up_to_start_timeout(tmp_path: Path, where: str) -> None:
    """start_timeout from qtasks.toml or --start-timeout: the worker tries again (a warning
    per attempt) for that long, then exits with the error (code 1)."""
    (tmp_path / "tasks.py").write_text(TASKS.replace("PREFIX", "'unused'"))
    url = f"redis://u:pw-s3cret@127.0.0.1:{_free_port()}/0"  # nothing listens there
    command = ["run", "-A", "tasks:app", "--broker", "redis", "--broker-url", url]
    if where == "toml":  # an app built by from_config(), which reads qtasks.toml
        app_line = 'QueueTasks(config=QueueConfig(extra={"redis_prefix": PREFIX}))'
        tasks = TASKS.replace(app_line, "QueueTasks.from_config()")
        (tmp_path / "tasks.py").write_text(tasks.replace("PREFIX", "'unused'"))
        (tmp_path / "qtasks.toml").write_text("start_timeout = 1.5\n")
    else:
        command += ["--start-timeout", "1.5"]
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "qtasks", *command],
        cwd=tmp_path,
        env=_clean_env(PYTHONPATH=_path(tmp_path)),
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - began >= 1.5
    attempts = done.stderr.count("storage RedisStorage cannot start: cannot reach Redis")
    assert 3 <= attempts <= 10, done.stderr
    assert "gave up waiting for the servers after" in done.stderr
    assert "error: cannot reach Redis" in done.stderr
    assert "pw-s3cret" not in done.stderr
    assert "serving" not in done.stderr


@pytest.mark.parametrize("command", ["inspect", "run"])
def test_a_url_option_redis_cannot_read_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    from typer.testing import CliRunner

    from qtasks.cli import cli

    monkeypatch.chdir(tmp_path)
    name = f"urlapp_{tmp_path.name.replace('-', '_')}"  # a module of this test's own
    (tmp_path / f"{name}.py").write_text(TASKS.replace("PREFIX", "'unused'"))
    url = "redis://alice:s3cret-pw@127.0.0.1:6379/0?socket_timeout=abc"
    flags = ["-A", f"{name}:app", "--broker", "redis", "--broker-url", url]
    try:
        result = CliRunner().invoke(cli, [command, *flags])
    finally:
        sys.modules.pop(name, None)
    # It was redis-py's ValueError, uncaught: a traceback of some 90 lines.
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    assert "bad Redis URL redis://alice:***@127.0.0.1:6379/0?socket_timeout=abc" in errors[0]
    assert "s3cret" not in result.output


# --- which storage and global config a configuration gets ----------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_storage_and_global_config_follow_a_redis_broker_from_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("QTASKS_STORAGE", raising=False)
    monkeypatch.delenv("QTASKS_GLOBAL_CONFIG", raising=False)
    url = "redis://:s3cret@127.0.0.1:6379/3"
    file = _write(
        tmp_path / "qtasks.toml",
        f'broker = "redis"\nbroker_url = "{url}"\nplugins_disabled = ["*"]\n',
    )
    with caplog.at_level(logging.INFO, logger="qtasks.config"):
        app = AsyncQueueTasks.from_config(file)
        sync_app = QueueTasks.from_config(file)  # the README's form
    assert (type(app.storage), type(app.global_config)) == (RedisStorage, RedisGlobalConfig)
    assert (type(sync_app.storage), sync_app.config.storage_url) == (RedisStorage, url)
    assert (app.config.storage_url, app.config.global_config_url) == (url, url)
    assert app.config_sources["storage"] == "follows broker"
    assert app.config_sources["global_config_url"] == "follows broker_url"
    logged = caplog.text
    assert "storage_url redis://:***@127.0.0.1:6379/3 follows broker_url" in logged
    assert "s3cret" not in logged


def test_explicit_components_are_kept_and_a_storage_without_url_follows_the_broker_url(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = "redis://127.0.0.1:6379/5"
    file = _write(
        tmp_path / "qtasks.toml",
        f'broker = "redis"\nbroker_url = "{url}"\nstorage = "redis"\n'
        'global_config = "memory"\nplugins_disabled = ["*"]\n',
    )
    app = AsyncQueueTasks.from_config(file)
    assert type(app.storage) is RedisStorage
    assert app.config.storage_url == url  # `storage = "redis"` alone takes the broker's URL
    assert app.config_sources["storage_url"] == "follows broker_url"
    assert type(app.global_config) is MemoryGlobalConfig  # named explicitly: kept


def test_a_redis_storage_with_no_url_anywhere_says_which_address_it_uses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file = _write(tmp_path / "qtasks.toml", 'storage = "redis"\nplugins_disabled = ["*"]\n')
    with caplog.at_level(logging.INFO, logger="qtasks.config"):
        app = AsyncQueueTasks.from_config(file)
    assert type(app.storage) is RedisStorage
    assert type(app.global_config) is MemoryGlobalConfig  # the broker is local: nothing follows
    assert "storage 'redis' has no storage_url: it connects to redis://127.0.0.1:6379/0" in (
        caplog.text
    )


def test_cli_flags_on_an_app_built_in_code_follow_the_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qtasks.cli import resolve_app

    (tmp_path / "follow_tasks.py").write_text(
        "from qtasks import QueueConfig, QueueTasks\n"
        "from qtasks_redis import RedisGlobalConfig\n"
        "app = QueueTasks(config=QueueConfig(plugins_disabled=['*']),\n"
        "                 global_config=RedisGlobalConfig('redis://127.0.0.1:6379/9'))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    url = "redis://127.0.0.1:6379/4"
    app = resolve_app(
        "follow_tasks:app", None, {"broker": "redis", "broker_url": url}, need_tasks=True
    )
    assert isinstance(app, QueueTasks)
    assert (type(app.aio.broker), type(app.aio.storage)) == (RedisBroker, RedisStorage)
    assert app.aio.config.storage_url == url
    kept = app.aio.global_config  # the object the code built stays
    assert isinstance(kept, RedisGlobalConfig) and kept.target.url.endswith("/9")
    sys.modules.pop("follow_tasks", None)


def test_a_broker_url_flag_carries_over_to_what_followed_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qtasks.cli import resolve_app

    (tmp_path / "refollow_tasks.py").write_text(
        "from qtasks import QueueTasks\napp = QueueTasks.from_config()\n"
    )
    _write(
        tmp_path / "qtasks.toml",
        'broker = "redis"\nbroker_url = "redis://127.0.0.1:6379/1"\nplugins_disabled = ["*"]\n',
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    url = "redis://127.0.0.1:6379/6"
    app = resolve_app("refollow_tasks:app", None, {"broker_url": url}, need_tasks=True)
    assert isinstance(app, QueueTasks)
    config = app.aio.config
    assert (config.broker_url, config.storage_url, config.global_config_url) == (url, url, url)
    assert isinstance(app.aio.storage, RedisStorage) and app.aio.storage.target.url == url
    assert app.aio.config_sources["storage_url"] == "follows broker_url"
    sys.modules.pop("refollow_tasks", None)


def test_config_command_shows_what_follows_the_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from qtasks.cli import cli

    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "qtasks.toml", 'broker = "redis"\n')
    result = CliRunner().invoke(cli, ["config", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{") :])
    assert data["storage"] == {"value": "redis", "source": "follows broker"}
    assert data["global_config"] == {"value": "redis", "source": "follows broker"}


def test_cli_docs_redis_examples_run(redis_url: str, prefix: str, tmp_path: Path) -> None:
    """The console blocks of docs/cli.md marked ``# with Redis``, as real processes, under
    this test's key prefix (the page's tasks.py reads it from ``QTASKS_EXTRA``)."""
    page = (Path(__file__).parents[2] / "docs" / "cli.md").read_text()
    blocks = re.findall(r"^```(\w+)\n(.*?)^```", page, flags=re.MULTILINE | re.DOTALL)
    env = _clean_env(QTASKS_EXTRA=json.dumps({"redis_prefix": prefix}))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    ran = 0
    for _lang, code in blocks:
        first = code.splitlines()[0]
        if first.startswith("# file: "):
            (tmp_path / first.removeprefix("# file: ").strip()).write_text(code)
        if not first.startswith("# with Redis"):
            continue
        commands: list[tuple[str, list[str]]] = []
        for line in code.splitlines()[1:]:
            if line.startswith("$ "):
                commands.append((line[2:], []))
            elif commands and line.strip():
                commands[-1][1].append(line.strip())
        for command, expected in commands:
            argv = shlex.split(command.replace(DOCS_REDIS_URL, redis_url))
            proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
            output = proc.stdout + proc.stderr
            assert proc.returncode == 0, f"$ {command}\n{output}"
            assert all(text in output for text in expected), f"$ {command}\n{output}"
            ran += 1
    assert ran >= 2


WORKFLOW_APP = """
from qtasks import QueueTasks
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

app = QueueTasks(
    "wf-cli",
    broker=RedisBroker(URL, prefix=PREFIX),
    storage=RedisStorage(URL, prefix=PREFIX),
    global_config=RedisGlobalConfig(URL, prefix=PREFIX),
)


@app.task
def add(a: int, b: int) -> int:
    return a + b
"""


def test_inspect_lists_the_workflows_kept_in_redis(
    redis_url: str, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from qtasks import chain, group
    from qtasks.cli import cli

    name = f"wfcli_{prefix.replace('-', '_')}"
    source = WORKFLOW_APP.replace("URL", repr(redis_url)).replace("PREFIX", repr(prefix))
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    producer = QueueTasks(
        "producer",
        broker=RedisBroker(redis_url, prefix=prefix),
        storage=RedisStorage(redis_url, prefix=prefix),
        global_config=RedisGlobalConfig(redis_url, prefix=prefix),
    )
    add = producer.task(name="add")(lambda a, b: a + b)
    try:  # no worker: the first stays running, the second is cancelled
        running = producer.run_workflow(chain(group(add.s(1, 2), add.s(3, 4)), add.s(0)))
        stopped = producer.run_workflow(chain(add.s(1, 1), add.s(2)))
        assert producer.cancel_workflow(stopped.id, "operator") is not None
    finally:
        producer.close()
    runner = CliRunner()
    result = runner.invoke(cli, ["inspect", "-A", f"{name}:app", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)["workflows"]
    assert [(w["id"], w["status"], w["size"]) for w in listed] == [
        (stopped.id, "cancel", 2),
        (running.id, "running", 3),
    ]
    result = runner.invoke(cli, ["inspect", "-A", f"{name}:app"])
    assert result.exit_code == 0, result.output
    assert "workflows (newest 2): cancel=1, running=1" in result.output
    result = runner.invoke(cli, ["workflow", running.id, "-A", f"{name}:app", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["status"] == "running"
    # Without an id, the list: its app is started (and closed) by the command, as with one
    # (it said "RedisStorage used before start()").
    result = runner.invoke(cli, ["workflow", "-A", f"{name}:app", "--json", "--limit", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == listed[:1]
    result = runner.invoke(cli, ["workflow", "-A", f"{name}:app"])
    assert result.exit_code == 0, result.output
    assert stopped.id in result.output and running.id in result.output


HUNG = """
import atexit, os, pathlib, time
from qtasks import QueueConfig, QueueTasks

atexit.register(pathlib.Path(f"cleaned-up-{os.getpid()}").touch)  # a user's cleanup

app = QueueTasks(config=QueueConfig(extra={"redis_prefix": PREFIX}))


@app.task(max_time=0.3)
def hang() -> None:
    pathlib.Path("started").touch()
    time.sleep(300)  # a call that hangs: no thread can be stopped
"""


def test_run_exits_at_its_stop_without_waiting_for_a_hung_sync_thread(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """A sync task given up on at ``max_time`` runs on in its thread; ``qtasks run`` stops at
    SIGTERM without waiting for it (Python would, 300 s here), and says so; the ``atexit``
    handlers still run."""
    (tmp_path / "tasks.py").write_text(HUNG.replace("PREFIX", repr(redis_prefix)))
    flags = ["--broker", "redis", "--broker-url", redis_url, "--global-config", "memory"]
    env = _clean_env(PYTHONPATH=_path(tmp_path))
    app = ["-A", "tasks:app", *flags]
    added, out, pid = serve_then_add(tmp_path, env, ["run", *app], ["hang", "--wait", "30", *app])
    record = json.loads(added.stdout)
    assert record["status"] == "error" and "max_time" in record["error"], added.stdout
    assert (tmp_path / "started").exists()  # its thread ran on past the stop
    assert "exiting without waiting for 1 thread(s) of sync task code" in out
    assert f"hang ({record['uuid']})" in out
    assert (tmp_path / f"cleaned-up-{pid}").exists()  # its atexit handlers ran


@pytest.mark.timeout(60)
@pytest.mark.parametrize("app_class", ["QueueTasks", "AsyncQueueTasks"])
def test_ctrl_c_on_add_wait_prints_the_uuid_of_the_enqueued_task_and_exits_at_once(
    app_class: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """No worker serves: ``qtasks add --wait`` waits; a Ctrl-C then prints the uuid of the task
    it enqueued (which runs anyway), as a timeout does, and the process ends at once: the sync
    app's close left the wait running in its portal, whose thread it joined for 10 s."""
    source = TASKS.replace("QueueTasks(config", f"{app_class}(config").replace(
        "from qtasks import QueueConfig, QueueTasks",
        "from qtasks import AsyncQueueTasks, QueueConfig, QueueTasks",
    )
    (tmp_path / "tasks.py").write_text(source.replace("PREFIX", repr(redis_prefix)))
    flags = ["-A", "tasks:app", "--broker", "redis", "--broker-url", redis_url]
    # The tree under test, not whichever one is installed.
    env = _clean_env(PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    adding = subprocess.Popen(
        [sys.executable, "-m", "qtasks", "add", "add", "2", "3", "--wait", "60", *flags],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 30
        keys: list[bytes] = []
        while not keys:  # its record is stored: it waits now (nothing to wait on but Redis)
            assert time.monotonic() < deadline, "no record stored within 30 s"
            assert adding.poll() is None, adding.communicate()
            keys = list(client.scan_iter(match=f"{{{redis_prefix}:rec}}:r:*"))
            time.sleep(0.02)
        adding.send_signal(signal.SIGINT)
        try:
            out, err = adding.communicate(timeout=5)  # not the 10 s of a join given up on
        except subprocess.TimeoutExpired:
            pytest.fail("qtasks add still running 5 s after its Ctrl-C")
    finally:
        client.close()
        if adding.poll() is None:
            adding.kill()
            adding.communicate()
    uuid = keys[0].decode().rsplit(":", 1)[1]
    assert adding.returncode != 0
    assert out == f"{uuid}\n"
    assert f"interrupted: task {uuid} is enqueued and runs anyway (qtasks get {uuid})" in err
