"""``qtasks web``: contributed through the ``qtasks.cli`` entry point, refuses a public bind
without authentication, serves the app's dashboard with ``[extra.web]`` from the
configuration, and stops at once on SIGTERM with a browser's event stream open."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from qtasks.cli import cli

APP = """
from qtasks import AsyncQueueTasks

app = AsyncQueueTasks.from_config(name="cli-shop")


@app.task
async def add(a: int, b: int) -> int:
    return a + b
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def shop_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The working directory, holding ``shopapp.py``, for a CLI run in this process. The
    ``shopapp`` module ``-A shopapp:app`` imports and the directory it puts on ``sys.path`` (for
    good, as a command does) are gone afterwards: a later test imports its own."""
    (tmp_path / "shopapp.py").write_text(APP)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # restored when the test ends
    sys.modules.pop("shopapp", None)  # an earlier one, not this directory's
    try:
        yield tmp_path
    finally:
        sys.modules.pop("shopapp", None)


@pytest.mark.usefixtures("shop_dir")
def test_the_command_is_listed_and_refuses_a_public_bind_without_auth() -> None:
    runner = CliRunner()
    listed = runner.invoke(cli, ["--help"])
    assert listed.exit_code == 0 and "web" in listed.output
    refused = runner.invoke(cli, ["-A", "shopapp:app", "web", "--host", "0.0.0.0"])
    assert refused.exit_code == 1
    assert "not a loopback address, needs authentication" in refused.output


def test_no_app_module_is_left_imported_for_a_later_test() -> None:
    """Runs after the test above (file order): the ``shopapp`` module ``-A`` imported there,
    and the directory it put on ``sys.path``, are gone; else a later test's own
    ``shopapp.py`` (another directory, another app) would get that one."""
    assert "shopapp" not in sys.modules
    assert [p for p in sys.path if Path(p, "shopapp.py").exists()] == []


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_it_serves_with_the_configured_token_and_stops_on_sigterm(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    (tmp_path / "shopapp.py").write_text(APP)
    port = free_port()
    (tmp_path / "qtasks.toml").write_text(
        f'app = "shopapp:app"\nbroker_url = "{redis_url}"\n\n[extra]\n'
        f'redis_prefix = "{redis_prefix}"\n\n[extra.web]\nport = {port}\n'
        'token = "env:CLI_WEB_TOKEN"\n'
    )
    env = {**os.environ, "CLI_WEB_TOKEN": "cli-token-5150"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "qtasks", "web"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("qtasks web did not listen in 20 s")
                time.sleep(0.05)
        status, _ = get(url + "/api/overview", {"accept": "application/json"})
        assert status == 401
        auth = {"authorization": "Bearer cli-token-5150"}
        status, body = get(url + "/", auth)
        assert status == 200 and "cli-shop" in body
        # An open event stream does not hold the server when it is told to stop.
        stream = socket.create_connection(("127.0.0.1", port))
        stream.sendall(
            b"GET /events/overview HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer cli-token-5150\r\n\r\n"
        )
        stream.settimeout(5)
        received = b""
        while b"event: overview" not in received:
            chunk = stream.recv(65536)
            assert chunk, received
            received += chunk
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=15)[0]
        stream.close()
        assert time.monotonic() - stopped < 1.9  # before uvicorn's 2 s graceful timeout
        assert proc.returncode == 0, output
        assert "serving 'cli-shop'" in output
        assert f"broker RedisBroker at {redis_url}, storage RedisStorage" in output
        assert "cli-token-5150" not in output
        assert "Traceback" not in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_it_takes_the_component_flags_and_refuses_in_memory_components(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """``qtasks web`` with no app and no configuration served the dashboard of a private
    in-memory app, empty for good, and took no --broker flag (review r15 #3)."""
    import qtasks_web.cli

    served: list[Any] = []
    monkeypatch.setattr(qtasks_web.cli, "serve", lambda app, settings: served.append(app))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    refused = runner.invoke(cli, ["web", "--port", "9000", "--read-only"])
    assert refused.exit_code == 1, refused.output
    assert refused.output.startswith(
        "error: qtasks web cannot work with the broker (MemoryBroker), storage (MemoryStorage) "
        "and global config (MemoryGlobalConfig): in-memory components live only"
    )
    assert served == []
    flags = ["--broker", "redis", "--broker-url", redis_url, "--global-config", "memory"]
    result = runner.invoke(cli, ["web", *flags])
    assert result.exit_code == 1, result.output
    assert "qtasks web cannot work with the global config (MemoryGlobalConfig)" in result.output
    result = runner.invoke(cli, ["web", "--broker", "redis", "--broker-url", redis_url])
    assert result.exit_code == 0, result.output
    [app] = served
    assert [type(c).__name__ for c in (app.broker, app.storage, app.global_config)] == [
        "RedisBroker",
        "RedisStorage",
        "RedisGlobalConfig",
    ]


CONSTRUCTED = """
from qtasks import AsyncQueueTasks

app = AsyncQueueTasks("cli-shop")
"""


@pytest.mark.parametrize("app", [None, "configured", "constructed"])
def test_a_mistyped_variable_is_warned_of_once(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    app: str | None,
) -> None:
    """``qtasks web`` reads the configuration three times (for the ``app`` key, to build the
    app, for ``[extra.web]``) and said each of its warnings each time. Once now, whichever
    app: none named, one built from the configuration, one built with its constructor (whose
    reading by the check of unread settings is silent)."""
    module = f"webonce_{uuid.uuid4().hex[:8]}"  # imported afresh, gone after
    if app is not None:
        (tmp_path / f"{module}.py").write_text(APP if app == "configured" else CONSTRUCTED)
    target = [] if app is None else ["-A", f"{module}:app"]
    monkeypatch.delitem(sys.modules, module, raising=False)
    (tmp_path / "qtasks.toml").write_text('[extra.web]\ntoken = "env:QTASKS_WEB_TOKEN"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("QTASKS_WEB_TOKEN", raising=False)
    monkeypatch.setenv("QTASKS_WEB_TOKNE", "t")
    with caplog.at_level(logging.WARNING, logger="qtasks.config"):
        result = CliRunner().invoke(cli, [*target, "web"])
    # The dashboard then refuses the unset token: the command ends before serving.
    assert result.exit_code == 1, result.output
    assert "'QTASKS_WEB_TOKEN' is not set" in result.output
    said = [
        r for r in caplog.records if "QTASKS_WEB_TOKNE is set but nothing reads it" in r.message
    ]
    assert len(said) == 1, caplog.text
