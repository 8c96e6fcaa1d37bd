"""Each ``qtasks`` command through typer's test runner, against a real in-process worker.

The app module is written to a temporary directory (as a user's ``tasks.py`` would be) and
served by the test through the sync app; the CLI finds the same app object with ``-A`` and
talks to it through its portal.
"""

from __future__ import annotations

import importlib
import json
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from typer.testing import CliRunner

from qtasks import QueueTasks
from qtasks.cli import cli

APP_SOURCE = """
import threading
from qtasks import QueueConfig, QueueTasks

app = QueueTasks("cli-test", config=QueueConfig(plugins_disabled=["timer"], shutdown_grace=1.0))
release = threading.Event()

@app.task(retry=2, tags=["math"], description="Add two numbers.")
def add(a: int, b: int = 0) -> int:
    return a + b

@app.task
def fail() -> None:
    raise ValueError("nope")

@app.task(priority=3)
def block() -> str:
    release.wait(10)
    return "released"
"""

runner = CliRunner()


@pytest.fixture
def app_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    name = f"cliapp_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(APP_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    try:
        yield module
    finally:
        module.release.set()
        module.app.close()
        sys.modules.pop(name, None)


@pytest.fixture
def served(app_module: ModuleType) -> Iterator[str]:
    """Serve the app in the background; yield the ``-A`` target."""
    app: QueueTasks = app_module.app
    with app:
        yield f"{app_module.__name__}:app"


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(cli, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def test_help_everywhere() -> None:
    code, out = invoke("--help")
    assert code == 0
    for command in ("run", "add", "get", "cancel", "inspect", "dlq", "plugins", "config"):
        assert command in out
    for command in (["run"], ["add"], ["inspect"], ["dlq", "list"], ["dlq", "requeue"]):
        code, out = invoke(*command, "--help")
        assert code == 0
        assert "Usage: qtasks" in out


def test_add_wait_get_and_failure_exit_code(served: str) -> None:
    code, out = invoke("add", "add", "2", "3", "--wait", "5", "-A", served)
    assert code == 0, out
    assert "status: success" in out
    assert "returning: 5" in out
    task_uuid = next(line.split(": ")[1] for line in out.splitlines() if line.startswith("uuid"))

    code, out = invoke("get", task_uuid, "-A", served, "--json")
    assert code == 0
    record = json.loads(out)
    assert (record["returning"], record["args"], record["status"]) == (5, [2, 3], "success")
    assert "token" not in record

    code, out = invoke("add", "add", "1", "--kwargs", '{"b": 41}', "--wait", "5", "-A", served)
    assert (code, "returning: 42" in out) == (0, True)

    code, out = invoke("add", "fail", "--wait", "5", "-A", served)
    assert code == 1
    assert "status: error" in out
    assert "ValueError: nope" in out


def test_add_without_wait_prints_the_uuid(served: str, app_module: ModuleType) -> None:
    code, out = invoke("add", "add", "4", "--kwargs", '{"b": 1}', "-A", served)
    assert code == 0
    task_uuid = out.strip()
    final = app_module.app.wait(task_uuid, 5)
    assert final.returning == 5


def test_add_rejects_bad_kwargs(served: str) -> None:
    code, out = invoke("add", "add", "--kwargs", "[1]", "-A", served)
    assert code == 1
    assert "--kwargs: expected a JSON object" in out


def test_get_unknown_uuid_exits_1(served: str) -> None:
    code, out = invoke("get", "0" * 32, "-A", served)
    assert code == 1
    assert "no task record" in out


def test_cancel_a_running_task(served: str, app_module: ModuleType) -> None:
    app: QueueTasks = app_module.app
    task = app.add_task("block")
    started = threading.Event()

    def running() -> bool:
        record = app.get(task.uuid)
        return record is not None and record.status.value == "process"

    for _ in range(500):
        if running():
            started.set()
            break
        threading.Event().wait(0.01)
    assert started.is_set(), "the task never started"
    code, out = invoke("cancel", task.uuid, "--reason", "operator", "-A", served)
    assert code == 0
    assert out.strip() == f"{task.uuid}: cancel"
    final = app.wait(task.uuid, 5)
    assert (final.status.value, final.cancel_reason) == ("cancel", "operator")


def test_inspect_human_and_json(served: str, app_module: ModuleType) -> None:
    app: QueueTasks = app_module.app
    app.add_task("add", 1, 1, timeout=5)
    code, out = invoke("inspect", "-A", served, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["app"] == "cli-test"
    add = report["tasks"]["add"]
    assert (add["retry"], add["tags"], add["description"]) == (2, ["math"], "Add two numbers.")
    assert add["signature"] == "(a: int, b: int = 0) -> int"
    assert report["tasks"]["block"]["priority"] == 3
    assert len(report["workers"]) == 1  # this process' worker, from its heartbeat
    assert report["records_by_status"]["success"] >= 1
    assert set(report["queue"]) == {"ready_by_priority", "delayed", "in_flight", "dead_letters"}
    assert report["audit"]["succeeded"] >= 1  # added by the third-party plugin's hook
    code, out = invoke("inspect", "-A", served)
    assert code == 0
    assert "tasks (3):" in out
    assert "workers alive (1):" in out
    assert "queue: ready" in out
    assert "audit:" in out


def test_dlq_list_and_requeue(served: str, app_module: ModuleType) -> None:
    app: QueueTasks = app_module.app
    rejected = app.add_task("no_such_task")
    final = app.wait(rejected.uuid, 5)
    assert final.status.value == "error"
    code, out = invoke("dlq", "list", "-A", served, "--json")
    assert code == 0
    letters = json.loads(out)
    assert [d["id"] for d in letters] == [rejected.uuid]
    assert "unknown task 'no_such_task'" in letters[0]["reason"]
    code, out = invoke("dlq", "list", "-A", served)
    assert rejected.uuid in out
    code, out = invoke("dlq", "requeue", rejected.uuid, "-A", served)
    assert (code, out.strip()) == (0, "requeued 1")
    # The record was reset, so the worker ran (and rejected) it again.
    again = app.wait(rejected.uuid, 5)
    assert again.status.value == "error"


def test_dlq_list_empty(served: str) -> None:
    code, out = invoke("dlq", "list", "-A", served)
    assert (code, out.strip()) == (0, "no dead letters")


def test_plugins_lists_distributions_and_disabled_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out = invoke("plugins", "--json")
    assert code == 0
    rows = {(r["kind"], r["name"]): r for r in json.loads(out)}
    assert rows[("plugin", "audit")]["distribution"] == "qtasks-audit-example"
    assert rows[("plugin", "audit")]["version"] == "0.3.1"
    assert rows[("plugin", "audit")]["state"] == "enabled"
    assert rows[("broker", "memory")]["distribution"] == "qtasks-core"
    (tmp_path / "qtasks.toml").write_text('plugins_disabled = ["audit"]\n')
    code, out = invoke("plugins")
    line = next(x for x in out.splitlines() if x.startswith("plugin") and " audit " in x)
    assert "qtasks-audit-example" in line
    assert line.rstrip().endswith("disabled")


def test_config_shows_values_and_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "qtasks.toml").write_text("prefetch = 3\nlease = 9\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QTASKS_LEASE", "11")
    code, out = invoke("config", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["prefetch"] == {"value": 3, "source": str(tmp_path / "qtasks.toml")}
    assert data["lease"] == {"value": 11.0, "source": "env QTASKS_LEASE"}
    assert data["retry"] == {"value": 0, "source": "default"}
    code, out = invoke("config")
    assert any(line.split()[:3] == ["lease", "11.0", "env"] for line in out.splitlines())


def test_config_errors_are_one_line_and_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "qtasks.toml").write_text('prefetch = "many"\n')
    monkeypatch.chdir(tmp_path)
    code, out = invoke("config")
    assert code == 1
    assert out.startswith("error: ")
    assert "'prefetch' expects int" in out
    assert "Traceback" not in out


def test_run_needs_an_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out = invoke("run")
    assert code == 1
    assert "no app given" in out


def test_run_with_an_unknown_broker_lists_installed_ones(app_module: ModuleType) -> None:
    code, out = invoke("run", "-A", f"{app_module.__name__}:app", "--broker", "kafka")
    assert code == 1
    assert "no broker named 'kafka' is installed (installed: memory" in out


def test_bad_app_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out = invoke("inspect", "-A", "no_such_module_xyz:app")
    assert code == 1
    assert "cannot import module 'no_such_module_xyz'" in out
    (tmp_path / "notanapp_mod.py").write_text("app = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out = invoke("inspect", "-A", "notanapp_mod")
    assert code == 1
    assert "expected a QueueTasks or AsyncQueueTasks app" in out


def test_flags_rebuild_components_and_factories_are_called(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qtasks.cli import apply_flags, import_app

    (tmp_path / "factory_mod.py").write_text(
        "from qtasks import AsyncQueueTasks, QueueConfig\n"
        "def make():\n"
        "    return AsyncQueueTasks('made', config=QueueConfig(plugins_disabled=['*']))\n"
    )
    monkeypatch.chdir(tmp_path)
    app = import_app("factory_mod:make")
    assert not isinstance(app, QueueTasks)
    assert app.name == "made"
    old_broker = app.broker
    apply_flags(app, {"broker": "memory", "max_tasks_process": 3, "log_level": None})
    assert app.broker is not old_broker
    assert app.config.max_tasks_process == 3
    assert app.thread_limiter.total_tokens == 3
    assert app.config_sources["max_tasks_process"] == "cli --concurrency"
    sys.modules.pop("factory_mod", None)


def test_cli_flag_does_not_override_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qtasks import AsyncQueueTasks
    from qtasks.cli import apply_flags

    monkeypatch.chdir(tmp_path)
    app = AsyncQueueTasks.from_config(max_tasks_process=2, plugins_disabled=["*"])
    apply_flags(app, {"max_tasks_process": 8, "prefetch": 1})
    assert (app.config.max_tasks_process, app.config.prefetch) == (2, 1)


def test_extension_command_from_an_installed_distribution() -> None:
    code, out = invoke("audit", "hello", "qtasks")
    assert (code, out.strip()) == (0, "audit says hello to qtasks")


def test_app_named_in_configuration_is_used(
    app_module: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "qtasks.toml").write_text(f'app = "{app_module.__name__}:app"\n')
    code, out = invoke("inspect", "--json")
    assert code == 0, out
    assert json.loads(out)["app"] == "cli-test"


def test_component_commands_work_without_an_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "qtasks.toml").write_text('plugins_disabled = ["*"]\n')
    code, out = invoke("inspect", "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["tasks"] == {}
    assert "audit" not in report["plugins"]  # disabled by the file the CLI found
    assert {"qtasks.middlewares", "qtasks.retry"} <= set(report["plugins"])
    code, out = invoke("get", "f" * 32)
    assert code == 1
    assert "no task record" in out
    code, out = invoke("add", "anything", "1", "two", "[3]")
    assert code == 0
    assert len(out.strip()) == 32  # the uuid; nothing serves it in this process
