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
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from typer.testing import CliRunner

from qtasks import AsyncQueueTasks, QueueConfig, QueueTasks, TaskStatus, chain
from qtasks.cli import cli
from qtasks.record import TaskRecord

APP_SOURCE = """
import threading
from qtasks import QueueConfig, QueueTasks

# A long heartbeat interval: what inspect shows must not wait for the next periodic beat.
app = QueueTasks(
    "cli-test",
    config=QueueConfig(plugins_disabled=["timer"], shutdown_grace=1.0, heartbeat_interval=60.0),
)
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
    for argv in (["run"], ["add"], ["inspect"], ["dlq", "list"], ["dlq", "requeue"]):
        code, out = invoke(*argv, "--help")
        assert code == 0
        assert "Usage: qtasks" in out


def test_help_shows_flags_without_a_value_type() -> None:
    # Typer printed `--help <bool>` / `--json <bool>`: a flag takes no value.
    screens = [[], ["run"], ["add"], ["get"], ["cancel"], ["inspect"], ["plugins"], ["config"]]
    screens += [["dlq"], ["dlq", "list"], ["dlq", "requeue"], ["audit"], ["audit", "hello"]]
    for screen in screens:
        code, out = invoke(*screen, "--help")
        assert code == 0, (screen, out)
        assert "--help" in out
        assert "<bool>" not in out, (screen, out)


def test_version_prints_the_distribution_and_its_version() -> None:
    from importlib.metadata import version

    code, out = invoke("--version")
    assert (code, out.strip()) == (0, f"qtasks-core {version('qtasks-core')}")


def test_app_and_config_go_before_the_command_too(served: str, tmp_path: Path) -> None:
    code, out = invoke("--help")
    assert "--app" in out and "-A" in out and "--config" in out and "-c" in out
    code, out = invoke("-A", served, "add", "add", "2", "3", "--wait", "5")
    assert code == 0, out
    assert "returning: 5" in out
    code, out = invoke("--app", served, "inspect", "--json")
    assert (code, json.loads(out)["app"]) == (0, "cli-test")
    (tmp_path / "other.toml").write_text("prefetch = 4\n")
    code, out = invoke("-c", str(tmp_path / "other.toml"), "config", "--json")
    assert (code, json.loads(out)["prefetch"]["value"]) == (0, 4)
    code, out = invoke("--config", str(tmp_path / "other.toml"), "plugins", "--json")
    assert code == 0, out
    # The same value in both places is fine; two different ones are an error, not a pick.
    code, out = invoke("-A", served, "inspect", "-A", served, "--json")
    assert code == 0, out
    code, out = invoke("-A", served, "inspect", "-A", "elsewhere:app")
    assert code == 1
    assert "-A/--app given twice with different values" in out


def test_negative_numbers_are_arguments_without_a_double_dash(
    served: str, app_module: ModuleType
) -> None:
    # click took `-5` for an unknown option: `qtasks add add -5 3` failed with "No such option".
    code, out = invoke("-A", served, "add", "add", "-5", "-2", "--wait", "5")
    assert code == 0, out
    assert "returning: -7" in out
    # An option's own negative value, options before and after, and the explicit `--` form.
    code, out = invoke("-A", served, "add", "--priority", "-1", "add", "-5", "3", "--wait", "5")
    assert (code, "returning: -2" in out) == (0, True), out
    # Negative floats too (to a task the app lacks: `add` takes ints, as its annotations say).
    code, out = invoke("-A", served, "add", "elsewhere", "-5", "-2.5", "--force")
    assert (code, app_module.app.get(out.strip()).args) == (0, [-5, -2.5]), out
    code, out = invoke("-A", served, "add", "elsewhere", "--force", "--", "-1e1", "4")
    assert (code, app_module.app.get(out.strip()).args) == (0, [-10.0, 4]), out
    # Anything else that looks like an option is still refused.
    # (click's usage error, exit code 2; the box's wording differs between typer versions)
    code, out = invoke("-A", served, "add", "add", "-x", "3")
    assert code == 2 and "No such option" in out and "-x" in out, out
    code, out = invoke("-A", served, "add", "add", "3", "--wiat", "5")
    assert code == 2 and "No such option" in out and "--wiat" in out, out


def test_a_module_shadowed_by_the_standard_library_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `queue.py` in the working directory: `-A queue:app` imports the standard library's
    # queue (imported already), which "has no 'app'" said without telling why.
    # -A puts the working directory on sys.path for good: restored after the test, or a
    # later child process given this sys.path would import that queue.py as the stdlib's.
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "queue.py").write_text(APP_SOURCE)
    monkeypatch.chdir(tmp_path)
    code, out = invoke("-A", "queue:app", "inspect")
    assert code == 1
    assert "module 'queue' has no 'app': the standard library's module 'queue'" in out
    assert str(tmp_path / "queue.py") in out and "rename your module" in out
    # A module of the user's own that lacks the attribute gets the plain message.
    (tmp_path / "mine_no_app.py").write_text("x = 1\n")  # importable: -A put the cwd on the path
    code, out = invoke("-A", "mine_no_app:app", "inspect")
    assert code == 1
    assert "module 'mine_no_app' has no 'app'" in out and "rename" not in out
    sys.modules.pop("mine_no_app", None)


def test_record_times_are_iso_8601_local_and_numbers_in_json(
    served: str, app_module: ModuleType
) -> None:
    from datetime import datetime

    app: QueueTasks = app_module.app
    done = app.add_task("add", 1, 2, timeout=5)
    later = app.get(app.add_task("add", 3, delay=3600).uuid)
    assert later is not None
    # Every time of a record; eta was printed as unix seconds.
    for task, keys in ((done, ("created_at", "updated_at", "started_at")), (later, ("eta",))):
        code, out = invoke("get", task.uuid, "-A", served)
        assert code == 0, out
        lines = dict(line.split(": ", 1) for line in out.splitlines())
        for key in keys:
            shown = datetime.fromisoformat(lines[key])
            assert shown.utcoffset() is not None  # local time, with its offset
            assert abs(shown.timestamp() - getattr(task, key)) < 0.001
    app.cancel(later.uuid)
    code, out = invoke("get", done.uuid, "-A", served, "--json")
    assert json.loads(out)["created_at"] == done.created_at


def test_get_lists_how_the_earlier_attempts_ended(served: str, app_module: ModuleType) -> None:
    # The record holds its last attempt only: the storage keeps the earlier ones (AttemptLog),
    # which the dashboard showed and qtasks get did not.
    app: QueueTasks = app_module.app
    failed = app.add_task("add", 1, "x", timeout=30)  # TypeError, retried twice
    assert failed.status is TaskStatus.ERROR and failed.attempt == 3
    code, out = invoke("get", failed.uuid, "-A", served)
    assert code == 0, out
    lines = [line for line in out.splitlines() if line.startswith("earlier attempt")]
    assert len(lines) == 2, out
    for n, line in enumerate(lines, 1):
        assert line.startswith(f"earlier attempt {n}: retry on {failed.worker}, began "), line
        assert line.endswith(": TypeError: unsupported operand type(s) for +: 'int' and 'str'")
    code, out = invoke("get", failed.uuid, "-A", served, "--json")
    kept = json.loads(out)["earlier_attempts"]
    assert [(a["attempt"], a["status"]) for a in kept] == [(1, "retry"), (2, "retry")]
    done = app.add_task("add", 1, 2, timeout=5)
    code, out = invoke("get", done.uuid, "-A", served)
    assert "earlier attempt" not in out
    assert json.loads(invoke("get", done.uuid, "-A", served, "--json")[1])["earlier_attempts"] == []


def test_inspect_shows_what_the_worker_just_did(served: str, app_module: ModuleType) -> None:
    import time

    app: QueueTasks = app_module.app
    for n in range(3):
        app.add_task("add", n, timeout=5)
    deadline = time.monotonic() + 10  # far below the app's 60 s heartbeat interval
    processed = None
    while time.monotonic() < deadline:
        _, out = invoke("inspect", "-A", served, "--json")
        (worker,) = json.loads(out)["workers"].values()
        processed = worker["processed"]
        if processed == 3:
            break
        threading.Event().wait(0.05)
    assert processed == 3


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


def test_add_rejects_a_priority_or_delay_no_broker_can_keep(
    served: str, app_module: ModuleType
) -> None:
    for option, value, says in [
        (
            "--priority",
            str(2**63),
            f"priority expects an int from -2**63 to 2**63 - 1, got {2**63}",
        ),
        ("--delay", "inf", "delay expects finite seconds >= 0, got inf"),
    ]:
        code, out = invoke("add", "add", "1", option, value, "-A", served)
        assert (code, out.strip()) == (1, f"error: add_task: {says}")
    assert app_module.app.portal.call(app_module.app.aio.storage.stats) == {}


def test_workflow_and_get_link_members_to_their_workflow(
    served: str, app_module: ModuleType
) -> None:
    app: QueueTasks = app_module.app
    add = app.tasks["add"]
    state = app.run_workflow(chain(add.s(1, 2), add.s(10)))
    assert state.wait_result(5).result == 13
    code, out = invoke("workflow", state.id, "-A", served)
    assert code == 0
    assert f"workflow {state.id}: success" in out and "result: 13" in out
    lines = out.splitlines()
    for member in state.members:
        assert any(line.split() == [member, "add", "success"] for line in lines), out
    code, out = invoke("get", state.members[1], "-A", served)
    assert code == 0 and f"workflow: {state.id}" in out
    code, out = invoke("workflow", "0" * 32, "-A", served)
    assert code == 1 and "no workflow" in out


def test_workflow_lists_a_big_workflow_s_members_counted_and_cut(
    served: str, app_module: ModuleType
) -> None:
    # A chord of 100,000 printed 100,000 lines: the members are counted by status, the first
    # --members listed, those that did not succeed first.
    app: QueueTasks = app_module.app
    add = app.tasks["add"]
    state = app.run_workflow(chain(add.s(1, 2), add.s(10), add.s("x")))
    assert state.wait_result(5).status == "error"
    code, out = invoke("workflow", state.id, "-A", served, "--members", "1")
    assert code == 0, out
    assert "members: 3 (error=1, success=2)" in out
    listed = [line.split() for line in out.splitlines() if line.startswith(tuple(state.members))]
    assert listed == [[state.members[2], "add", "error"]]
    assert "... 2 more (--members 0 shows all)" in out
    code, out = invoke("workflow", state.id, "-A", served, "--members", "0")
    assert code == 0 and all(member in out for member in state.members)
    code, out = invoke("workflow", state.id, "-A", served, "--members", "1", "--json")
    assert len(json.loads(out)["members"]) == 3


def test_inspect_and_workflow_list_the_newest_workflows(
    served: str, app_module: ModuleType
) -> None:
    app: QueueTasks = app_module.app
    add, block = app.tasks["add"], app.tasks["block"]
    done = app.run_workflow(chain(add.s(1, 2), add.s(10)))
    assert done.wait_result(5).status == "success"
    stopped = app.run_workflow(chain(block.s(), add.s(1)), on_error=add.s(0))
    assert app.cancel_workflow(stopped.id, "operator") is not None
    code, out = invoke("inspect", "-A", served, "--json")
    assert code == 0
    listed = json.loads(out)["workflows"]
    assert [(w["id"], w["status"], w["size"], w["error"]) for w in listed] == [
        (stopped.id, "cancel", 3, "operator"),
        (done.id, "success", 2, None),
    ]
    code, out = invoke("inspect", "-A", served)
    assert code == 0
    assert "workflows (newest 2): cancel=1, success=1" in out
    lines = out.splitlines()
    assert any(line.split()[:3] == [stopped.id, "cancel", "3"] for line in lines), out
    assert any(line.split()[:3] == [done.id, "success", "2"] for line in lines), out
    # qtasks workflow without an id lists the same; with one, its members.
    code, out = invoke("workflow", "-A", served, "--json", "--limit", "1")
    assert code == 0 and json.loads(out) == listed[:1]
    code, out = invoke("workflow", "-A", served)
    assert code == 0 and "cancel=1, success=1" in out and stopped.id in out


def test_workflow_and_inspect_mask_a_workflow_s_result_and_error(
    app_module: ModuleType,
) -> None:
    """A workflow's result and error are shown masked, as ``qtasks get`` shows a record's;
    ``--show-secrets`` shows them as they are."""
    app: QueueTasks = app_module.app

    @app.task
    def dsn() -> str:
        return "redis://u:hunter2@h/0"

    @app.task
    def unreachable() -> None:
        raise ConnectionError("cannot reach redis://u:hunter2@h/0")

    target = f"{app_module.__name__}:app"
    with app:
        done = app.run_workflow(chain(dsn.s()))
        assert done.wait_result(5).result == "redis://u:hunter2@h/0"
        failed = app.run_workflow(chain(unreachable.s()))
        assert failed.wait_result(5).status == "error"
        for args in (
            ("workflow", done.id),
            ("workflow", done.id, "--json"),
            ("workflow", failed.id),
            ("workflow", failed.id, "--json"),
            ("workflow",),
            ("workflow", "--json"),
            ("inspect", "--json"),
        ):
            code, out = invoke(*args, "-A", target)
            assert code == 0, out
            assert "hunter2" not in out and "redis://u:***@h/0" in out, (args, out)
        result = runner.invoke(
            cli, ["workflow", failed.id, "--json", "--show-secrets", "-A", target]
        )
        assert result.exit_code == 0
        assert "redis://u:hunter2@h/0" in json.loads(result.stdout)["error"]
        assert "--show-secrets: passwords and secrets are shown" in result.stderr
        code, out = invoke("workflow", done.id, "--show-secrets", "-A", target)
        assert code == 0 and 'result: "redis://u:hunter2@h/0"' in out
        code, out = invoke("workflow", failed.id, "-A", target)
        assert code == 0 and f"failed member: {failed.members[0]}" in out
        assert (
            json.loads(invoke("workflow", failed.id, "--json", "-A", target)[1])["failed_member"]
            == (failed.members[0])
        )


def test_get_shows_a_time_past_the_year_9999(served: str, app_module: ModuleType) -> None:
    """An ``eta`` given in milliseconds (``time.time() * 1000``): ``qtasks get`` printed the
    record's first lines, then a traceback (``year 58903 is out of range``). ``add_task``
    refuses one now; a record stored by another client (an older qtasks) still holds it."""
    app: QueueTasks = app_module.app
    eta = time.time() * 1000
    record = TaskRecord(uuid=uuid.uuid4().hex, task_name="add", args=[1, 2], eta=eta)
    app.portal.call(app.aio.storage.add, record)
    code, out = invoke("get", record.uuid, "-A", served)
    assert code == 0, out
    assert f"eta: {eta} (unix seconds, past the year 9999)" in out.splitlines()


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
    header, _, row = out.split("workers alive (1):\n", 1)[1].splitlines()[:3]
    assert header.split()[-1] == "consuming" and row.split()[-1] == "yes"  # qtasks.health
    (beat,) = report["workers"].values()
    assert (beat["consume_stalled"], beat["stall_limit"]) == (0.0, 60.0)
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


def test_dlq_list_json_masks_the_bodies(served: str, app_module: ModuleType) -> None:
    """``dlq list --json`` printed each body as it is: a password argument, a URL's password
    (the dashboard's dead-letter page and ``qtasks get`` mask them); ``--show-secrets``
    shows them."""
    app: QueueTasks = app_module.app
    rejected = app.add_task("no_such_task", "redis://u:hunter2@h/0", password="hunter2")
    assert app.wait(rejected.uuid, 5).status.value == "error"
    code, out = invoke("dlq", "list", "-A", served, "--json")
    assert code == 0 and "hunter2" not in out
    [letter] = json.loads(out)
    body = json.loads(letter["body"])
    assert (body["task"], body["args"], body["kwargs"]) == (
        "no_such_task",
        ["redis://u:***@h/0"],
        {"password": "***"},
    )
    result = runner.invoke(cli, ["dlq", "list", "-A", served, "--json", "--show-secrets"])
    assert result.exit_code == 0
    assert json.loads(json.loads(result.stdout)[0]["body"])["kwargs"] == {"password": "hunter2"}
    assert "--show-secrets: passwords and secrets are shown" in result.stderr


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


def test_plugins_warns_about_a_disabled_name_no_installed_plugin_has(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QTASKS_PLUGINS_DISABLED", "metircs")
    for args in [("plugins",), ("plugins", "--json")]:
        code, out = invoke(*args)
        assert code == 0  # a warning: the name may be a plugin of another environment
        assert (
            "warning: plugins_disabled names 'metircs', which is not an installed plugin "
            "(did you mean 'metrics'? installed: audit, metrics, "
        ) in out


def test_plugins_warns_when_the_unrelated_qtasks_distribution_is_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out = invoke("plugins")
    assert code == 0
    assert "unrelated QTasks project" not in out
    # What `pip install qtasks` leaves next to qtasks-core: a dist-info named qtasks.
    site = tmp_path / "site"
    info = site / "qtasks-1.7.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qtasks\nVersion: 1.7.0\n")
    monkeypatch.syspath_prepend(str(site))
    code, out = invoke("plugins")
    assert code == 0  # a warning, not a failure
    assert "warning: the distribution 'qtasks' 1.7.0 (the unrelated QTasks project)" in out
    assert "pip uninstall -y qtasks qtasks-core && pip install qtasks-core" in out
    code, out = invoke("--version")
    assert out.strip().startswith("qtasks-core ")  # names the distribution that provides it


def test_plugins_shows_a_broken_plugin_as_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from importlib.metadata import EntryPoint

    from qtasks import discovery

    (tmp_path / "typo_cli_plugin.py").write_text(
        "from qtasks import hookimpl\n"
        "class TypoPlugin:\n"
        "    @hookimpl\n"
        "    def qtasks_worker_started(self): ...\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    typo = EntryPoint("typo", "typo_cli_plugin:TypoPlugin", "qtasks.plugins")
    ghost = EntryPoint("ghost", "no_such_module_here:Plugin", "qtasks.plugins")
    real = discovery.entry_points  # type: ignore[attr-defined]  # the name discovery imports

    def fake(*, group: str) -> Any:
        return [typo, ghost] if group == "qtasks.plugins" else real(group=group)

    monkeypatch.setattr(discovery, "entry_points", fake)
    # Every other command fails on it...
    code, out = invoke("add", "x", "--broker", "memory", "--storage", "memory")
    assert (code, "unknown hook 'qtasks_worker_started'" in out) == (1, True)
    # ...so plugins must not call it enabled.
    code, out = invoke("plugins")
    assert code == 1
    line = next(x for x in out.splitlines() if x.startswith("plugin") and " typo " in x)
    assert line.rstrip().endswith("failed")
    assert "error: plugin 'typo': " in out and "unknown hook 'qtasks_worker_started'" in out
    assert "add 'typo' to plugins_disabled" in out
    code, out = invoke("plugins", "--json")
    rows = {r["name"]: r for r in json.loads(out) if r["kind"] == "plugin"}
    assert (rows["typo"]["state"], rows["ghost"]["state"]) == ("failed", "failed")
    assert "No module named 'no_such_module_here'" in rows["ghost"]["error"]
    (tmp_path / "qtasks.toml").write_text('plugins_disabled = ["typo", "ghost"]\n')
    code, out = invoke("plugins", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out) if r["kind"] == "plugin"}
    assert rows["typo"]["state"] == "disabled"
    sys.modules.pop("typo_cli_plugin", None)


def test_plugins_shows_a_broken_component_or_cli_extension_as_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only plugins: a component or CLI extension that does not import was listed as
    healthy with exit code 0, and failed only once used (``--broker NAME``, ``qtasks NAME``)."""
    from importlib.metadata import EntryPoint

    from qtasks import discovery

    (tmp_path / "raising_cli_ext.py").write_text(
        "raise RuntimeError('cannot reach redis://user:secret@host')\n"
    )
    (tmp_path / "not_a_command_ext.py").write_text("app = 'a string'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    added = {
        "qtasks.cli": [
            EntryPoint("brokencli", "raising_cli_ext:app", "qtasks.cli"),
            EntryPoint("strcli", "not_a_command_ext:app", "qtasks.cli"),
        ],
        "qtasks.brokers": [EntryPoint("badbroker", "no_such_driver_here:Broker", "qtasks.brokers")],
    }
    real = discovery.entry_points  # type: ignore[attr-defined]  # the name discovery imports

    def fake(*, group: str) -> Any:
        return [*real(group=group), *added.get(group, [])]

    monkeypatch.setattr(discovery, "entry_points", fake)
    try:
        code, out = invoke("plugins")
        assert code == 1
        lines = {tuple(x.split()[:2]): x.rstrip() for x in out.splitlines() if x.strip()}
        assert lines["cli", "brokencli"].endswith("failed")
        assert lines["cli", "strcli"].endswith("failed")
        assert lines["broker", "badbroker"].endswith("failed")
        assert lines["broker", "memory"].endswith("ok")
        assert (
            "error: cli 'brokencli' (raising_cli_ext:app, from raising_cli_ext:app) failed to "
            "import: RuntimeError: cannot reach redis://user:***@host; fix or uninstall it"
        ) in out
        assert "secret" not in out
        assert (
            "error: broker 'badbroker' (no_such_driver_here:Broker, from "
            "no_such_driver_here:Broker) failed to import: ModuleNotFoundError: No module named "
            "'no_such_driver_here'; fix or uninstall it"
        ) in out
        assert (
            "error: CLI extension 'strcli' (not_a_command_ext:app) is a str, neither a "
            "typer.Typer nor a function: no command is added for it"
        ) in out
        code, out = invoke("plugins", "--json")
        assert code == 1
        rows = {(r["kind"], r["name"]): r for r in json.loads(out)}
        assert rows["broker", "badbroker"]["state"] == "failed"
        assert "No module named 'no_such_driver_here'" in rows["broker", "badbroker"]["error"]
        assert rows["cli", "brokencli"]["state"] == "failed"
        assert (rows["storage", "memory"]["state"], "error" in rows["storage", "memory"]) == (
            "ok",
            False,
        )
    finally:
        for module in ("raising_cli_ext", "not_a_command_ext"):
            sys.modules.pop(module, None)


def test_plugins_masks_a_dsn_in_a_broken_plugins_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A plugin that cannot import or be built often quotes the DSN it could not reach: its
    error is shown through the masking rule, in ``qtasks plugins``, the app's log and the
    error an app raises."""
    from importlib.metadata import EntryPoint

    from qtasks import discovery
    from qtasks.errors import PluginError

    dsn = "redis://user:secret@host"
    (tmp_path / "dsn_import_plugin.py").write_text(
        f"raise RuntimeError('cannot connect to {dsn}')\n"
    )
    (tmp_path / "dsn_build_plugin.py").write_text(
        "class Plugin:\n"
        "    def __init__(self):\n"
        f"        raise ConnectionError('no answer from {dsn}/0, password=secret')\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    broken = [
        EntryPoint("dsn_import", "dsn_import_plugin:Plugin", "qtasks.plugins"),
        EntryPoint("dsn_build", "dsn_build_plugin:Plugin", "qtasks.plugins"),
    ]
    real = discovery.entry_points  # type: ignore[attr-defined]  # the name discovery imports

    def fake(*, group: str) -> Any:
        return broken if group == "qtasks.plugins" else real(group=group)

    monkeypatch.setattr(discovery, "entry_points", fake)
    try:
        code, out = invoke("plugins")
        assert code == 1
        assert "secret" not in out
        assert "cannot connect to redis://user:***@host" in out
        assert "no answer from redis://user:***@host/0, password=***" in out
        code, out = invoke("plugins", "--json")
        rows = {r["name"]: r for r in json.loads(out) if r["kind"] == "plugin"}
        assert "secret" not in out and "redis://user:***@host" in rows["dsn_import"]["error"]
        assert "redis://user:***@host/0" in rows["dsn_build"]["error"]
        with pytest.raises(PluginError) as e:
            AsyncQueueTasks()
        assert "secret" not in str(e.value) and "redis://user:***@host/0" in str(e.value)
        with caplog.at_level("ERROR", logger="qtasks.discovery"):
            AsyncQueueTasks(config=QueueConfig(plugins_disabled=["dsn_build"]))
        logged = " ".join(r.getMessage() for r in caplog.records)
        assert "secret" not in logged and "redis://user:***@host" in logged
    finally:
        for module in ("dsn_import_plugin", "dsn_build_plugin"):
            sys.modules.pop(module, None)


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


SECRET_CONFIG = """
broker = "redis"
broker_url = "redis://default:hunter2@127.0.0.1:6379/0?password=hunter2"
[extra]
redis_prefix = "jobs"
[extra.web]
token = "tok-hunter2"
users = { ops = "ops-hunter2", admin = "env:QTASKS_WEB_ADMIN_PASSWORD" }
[extra.audit]
api_key = "key-hunter2"
sink = "https://audit:hunter2@audit.example/in"
"""


def test_config_masks_passwords_and_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "qtasks.toml").write_text(SECRET_CONFIG)
    monkeypatch.chdir(tmp_path)
    code, out = invoke("config", "--json")
    assert code == 0
    assert "hunter2" not in out
    data = json.loads(out)
    masked_url = "redis://default:***@127.0.0.1:6379/0?password=***"
    assert data["broker_url"]["value"] == masked_url
    assert data["storage_url"] == {"value": masked_url, "source": "follows broker_url"}
    assert data["extra"]["value"] == {
        "redis_prefix": "jobs",
        "web": {
            "token": "***",
            # The names stay, and so does a reference to a variable: it holds no secret.
            "users": {"ops": "***", "admin": "env:QTASKS_WEB_ADMIN_PASSWORD"},
        },
        "audit": {"api_key": "***", "sink": "https://audit:***@audit.example/in"},
    }
    code, out = invoke("config")
    assert code == 0
    assert "hunter2" not in out
    assert any(line.split()[:2] == ["broker_url", f'"{masked_url}"'] for line in out.splitlines())
    # A value of the wrong type is quoted in the error, masked too.
    (tmp_path / "qtasks.toml").write_text('broker_url = ["redis://u:hunter2@h:6379/0"]\n')
    code, out = invoke("config")
    assert code == 1
    assert "got list ['redis://u:***@h:6379/0']" in out and "hunter2" not in out


def test_config_shows_secrets_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--show-secrets`` is the explicit opt-in; without it everything stays masked."""
    (tmp_path / "qtasks.toml").write_text(SECRET_CONFIG)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["config", "--json", "--show-secrets"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    url = "redis://default:hunter2@127.0.0.1:6379/0?password=hunter2"
    assert data["broker_url"]["value"] == url
    assert data["extra"]["value"]["web"]["token"] == "tok-hunter2"
    assert data["extra"]["value"]["web"]["users"]["ops"] == "ops-hunter2"
    assert data["extra"]["value"]["audit"]["api_key"] == "key-hunter2"
    assert "passwords and secrets are shown" in result.stderr
    code, out = invoke("config", "--show-secrets")
    assert code == 0 and f'"{url}"' in out
    code, out = invoke("config")
    assert code == 0 and "hunter2" not in out


def test_the_web_docs_secret_variables_do_not_break_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/web.md keeps the dashboard's secrets in QTASKS_WEB_* variables: every command
    sharing that environment still works, and a typo of a setting still fails."""
    (tmp_path / "qtasks.toml").write_text(
        '[extra.web]\ntoken = "env:QTASKS_WEB_TOKEN"\n'
        'users = { ops = "env:QTASKS_WEB_OPS_PASSWORD" }\n'
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QTASKS_WEB_TOKEN", "s3cret-token")
    monkeypatch.setenv("QTASKS_WEB_OPS_PASSWORD", "s3cret-pw")
    code, out = invoke("config", "--json")
    assert code == 0, out
    assert json.loads(out)["extra"]["value"]["web"]["token"] == "env:QTASKS_WEB_TOKEN"
    assert "s3cret" not in out
    code, out = invoke("plugins")
    assert code == 0, out
    monkeypatch.setenv("QTASKS_BROKR", "redis")
    code, out = invoke("config")
    assert (code, out.startswith("error: env QTASKS_BROKR: unknown key 'brokr'")) == (1, True)


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


def test_a_file_given_as_the_app_names_the_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``-A tasks.py`` or ``-A ./tasks.py`` (a file, as ``python`` takes it): the error said
    ``'tasks' is not a package`` or, for ``./``, a ``TypeError`` about relative imports."""
    monkeypatch.chdir(tmp_path)
    cases = {
        "file_target_mod.py": "error: --app file_target_mod.py: cannot import module "
        "'file_target_mod.py': No module named 'file_target_mod.py'; 'file_target_mod' is not "
        "a package; -A takes a module's dotted name, not a file: -A file_target_mod:app",
        "./shop/file_target_mod.py:make": "error: --app ./shop/file_target_mod.py:make: "
        "'./shop/file_target_mod.py' is a path; -A takes a module's dotted name, not a file: "
        "-A shop.file_target_mod:make",
        "../file_target_mod.py": "error: --app ../file_target_mod.py: "
        "'../file_target_mod.py' is a path; -A takes a module's dotted name, not a file, "
        "importable from here",
    }
    (tmp_path / "file_target_mod.py").write_text(
        "from qtasks import QueueTasks\napp = QueueTasks()\n"
    )
    try:
        for target, line in cases.items():
            assert invoke("inspect", "-A", target) == (1, line + "\n")
    finally:
        sys.modules.pop("file_target_mod", None)


def test_a_misspelt_app_target_names_the_module_or_app_meant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``-A taks:app`` said only "No module named 'taks'" with tasks.py right there, and
    ``-A tasks:ap`` "module 'tasks' has no 'ap'" (walk-through of docs/cli.md): each now
    names the module of the working directory, or the module's app, that is close."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "typo_target_mod.py").write_text(
        "from qtasks import QueueTasks\nshop = QueueTasks('shop')\n"
    )
    try:
        assert invoke("inspect", "-A", "typo_targt_mod:shop") == (
            1,
            "error: --app typo_targt_mod:shop: cannot import module 'typo_targt_mod': No "
            "module named 'typo_targt_mod' (did you mean -A typo_target_mod:shop?)\n",
        )
        assert invoke("inspect", "-A", "typo_target_mod") == (
            1,
            "error: --app typo_target_mod: module 'typo_target_mod' has no 'app' (its apps: "
            "-A typo_target_mod:shop)\n",
        )
    finally:
        sys.modules.pop("typo_target_mod", None)


def test_a_task_given_as_the_app_is_refused_without_running_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``-A tasks:purge`` (a task's name where the app's was meant): a task is callable, and
    was called as a factory, so its code ran in the command's process (here: it would have
    written a file) before the error said it returned no app."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "task_target_mod.py").write_text(
        "from pathlib import Path\n"
        "from qtasks import QueueTasks\n"
        "app = QueueTasks('shop')\n"
        "@app.task\n"
        "def purge() -> None:\n"
        "    Path('purged').write_text('everything')\n"
    )
    try:
        code, out = invoke("inspect", "-A", "task_target_mod:purge")
    finally:
        sys.modules.pop("task_target_mod", None)
    assert (code, out) == (
        1,
        "error: --app task_target_mod:purge: 'purge' is a task, not an app: name the app it "
        "belongs to (-A task_target_mod:app)\n",
    )
    assert not (tmp_path / "purged").exists()


def test_an_app_module_that_raises_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/cli.md: an app that cannot be imported is one line starting with ``error:``; a
    module raising anything but ImportError printed a raw traceback (review r15 #12). The
    line names where it was raised, its text masked."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "boom_mod.py").write_text(
        "import os\nraise RuntimeError('cannot reach redis://u:hunter2@db:6379/0')\n"
    )
    (tmp_path / "syntax_mod.py").write_text("def broken(:\n    pass\n")
    (tmp_path / "factory_boom_mod.py").write_text("def make():\n    return {}['missing']\n")
    cases = [
        (
            "boom_mod:app",
            "error: --app boom_mod:app: importing 'boom_mod' raised RuntimeError: cannot reach "
            f"redis://u:***@db:6379/0 at {tmp_path / 'boom_mod.py'}:2",
        ),
        (
            "syntax_mod",
            "error: --app syntax_mod: importing 'syntax_mod' raised SyntaxError: invalid syntax "
            "(syntax_mod.py, line 1)",
        ),
        (
            "factory_boom_mod:make",
            "error: --app factory_boom_mod:make: calling 'make' raised KeyError: 'missing' at "
            f"{tmp_path / 'factory_boom_mod.py'}:2",
        ),
    ]
    try:
        for target, line in cases:
            code, out = invoke("inspect", "-A", target)
            assert (code, out) == (1, line + "\n")
    finally:
        for name in ("boom_mod", "syntax_mod", "factory_boom_mod"):
            sys.modules.pop(name, None)


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


def test_app_named_in_configuration_is_used(served: str, tmp_path: Path) -> None:
    (tmp_path / "qtasks.toml").write_text(f'app = "{served}"\n')
    code, out = invoke("inspect", "--json")
    assert code == 0, out
    assert json.loads(out)["app"] == "cli-test"


def test_component_commands_build_an_app_from_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "qtasks.toml").write_text('plugins_disabled = ["*"]\nlease = 7\n')
    from qtasks.cli import resolve_app

    app = resolve_app(None, None, {"storage": "memory"}, need_tasks=False)
    assert isinstance(app, AsyncQueueTasks)
    assert app.tasks == {}
    assert app.config.lease == 7.0  # read from the file the CLI found
    assert app.config_sources["storage"] == "cli --storage"
    assert "audit" not in [name for name, _ in app.hooks.pm.list_name_plugin()]


@pytest.mark.parametrize(
    ("command", "names"),
    [
        (["add", "anything", "1", "two", "[3]"], "broker (MemoryBroker) and storage"),
        (["get", "f" * 32], "storage (MemoryStorage)"),
        (["cancel", "f" * 32], "broker (MemoryBroker) and storage"),
        (["inspect"], "broker (MemoryBroker), storage (MemoryStorage) and global config"),
        (["stats", "inspect"], "broker (MemoryBroker), storage (MemoryStorage) and global"),
        # The component flags are taken (they were "No such option"), memory still refused.
        (["stats", "inspect", "--broker", "memory"], "broker (MemoryBroker), storage"),
        (["dlq", "list"], "broker (MemoryBroker)"),
        (["dlq", "requeue"], "broker (MemoryBroker) and storage"),
    ],
)
def test_component_commands_refuse_in_memory_components(
    command: list[str], names: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A uuid printed with exit code 0 for a task that dies with the process was the bug.
    monkeypatch.chdir(tmp_path)
    code, out = invoke(*command)
    assert code == 1, out
    named = {"dlq": " ".join(command[:2]), "stats": "inspect"}.get(command[0], command[0])
    assert out.startswith(f"error: qtasks {named} cannot work"), out  # stats inspect: an alias
    assert f"cannot work with the {names}" in out
    assert "--broker redis --broker-url" in out
    assert "Traceback" not in out


def test_component_commands_refuse_memory_for_an_app_that_is_not_served(
    app_module: ModuleType,
) -> None:
    code, out = invoke("add", "add", "1", "2", "-A", f"{app_module.__name__}:app")
    assert code == 1
    assert "in-memory components live only in this command's process" in out


def test_config_of_an_app_reads_the_file_given_with_c(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`qtasks config -A mod:app -c file`: the app's from_config() reads that file while its
    module is imported, as for every other command, and the sources say so."""
    (tmp_path / "fromconfig_mod.py").write_text(
        "from qtasks import AsyncQueueTasks\napp = AsyncQueueTasks.from_config()\n"
    )
    (tmp_path / "elsewhere.toml").write_text("prefetch = 7\n")
    (tmp_path / "qtasks.toml").write_text("prefetch = 2\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out = invoke("config", "-A", "fromconfig_mod:app", "-c", "elsewhere.toml", "--json")
    assert code == 0, out
    assert json.loads(out)["prefetch"] == {"value": 7, "source": "elsewhere.toml"}
    sys.modules.pop("fromconfig_mod", None)


def test_config_shows_the_app_the_configuration_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`app = "mod:app"` in the configuration and no -A: `qtasks config` showed the file's
    values (max_tasks_process 10, "default") instead of that app's, unlike every other
    command."""
    (tmp_path / "configured_mod.py").write_text(
        "from qtasks import QueueConfig, QueueTasks\n"
        "app = QueueTasks(config=QueueConfig(max_tasks_process=7))\n"
    )
    (tmp_path / "qtasks.toml").write_text('app = "configured_mod:app"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        code, out = invoke("config", "--json")
        assert code == 0, out
        assert json.loads(out)["max_tasks_process"] == {"value": 7, "source": "app (constructor)"}
    finally:
        sys.modules.pop("configured_mod", None)


def test_add_reads_what_is_not_json_as_text(served: str, app_module: ModuleType) -> None:
    """``NaN``, ``Infinity`` and ``1e999`` are not JSON (Python's reader takes them as floats
    no message can carry): they are text, as docs/cli.md says (which ``add``'s int parameters
    refuse: sent to a task the app lacks); in --kwargs they are an error."""
    code, out = invoke("add", "-A", served, "elsewhere", "--force", "--", "NaN", "-Infinity")
    assert code == 0, out
    assert app_module.app.get(out.strip()).args == ["NaN", "-Infinity"]
    code, out = invoke("add", "elsewhere", "1e999", "1.5", "--force", "-A", served)
    assert code == 0, out
    assert app_module.app.get(out.strip()).args == ["1e999", 1.5]
    code, out = invoke("add", "add", "1e999", "-A", served)
    assert (code, "parameter 'a' expects int, got '1e999' (str)" in out) == (1, True), out
    code, out = invoke("add", "add", "1", "--kwargs", '{"b": NaN}', "-A", served)
    assert (code, out.strip()) == (1, "error: --kwargs: not valid JSON: NaN is not JSON")


def test_add_refuses_a_task_the_app_does_not_have(served: str, app_module: ModuleType) -> None:
    code, out = invoke("add", "ad", "1", "-A", served)
    assert code == 1
    assert out.strip() == (
        "error: unknown task 'ad' (did you mean 'add'?): it is not registered in this app; "
        "--force enqueues it for a worker of another app"
    )
    code, out = invoke("add", "elsewhere", "--force", "-A", served)
    assert code == 0, out
    assert app_module.app.get(out.strip()).task_name == "elsewhere"


def test_stats_inspect_takes_qtasks_task_names(served: str) -> None:
    """QTasks' ``stats inspect task NAME`` and ``tasks NAME...``: the named tasks, and an
    error for a name the app does not have."""
    code, out = invoke("stats", "inspect", "task", "add", "json=true", "-A", served)
    assert code == 0, out
    assert list(json.loads(out)["tasks"]) == ["add"]
    code, out = invoke("stats", "inspect", "tasks", "add", "fail", "--json", "-A", served)
    assert code == 0, out
    assert list(json.loads(out)["tasks"]) == ["add", "fail"]
    code, out = invoke("stats", "inspect", "tasks", "-A", served, "--json")
    assert (code, len(json.loads(out)["tasks"])) == (0, 3)
    code, out = invoke("stats", "inspect", "task", "nosuch", "-A", served)
    assert (code, out.strip()) == (
        1,
        "error: unknown task 'nosuch': it is not registered in this app",
    )
    code, out = invoke("stats", "inspect", "task", "-A", served)
    assert (code, "give one task NAME" in out) == (1, True)
    code, out = invoke("stats", "inspect", "app", "add", "-A", served)
    assert (code, "unknown word 'add'" in out) == (1, True)


def test_dlq_requeue_of_ids_that_are_not_dead_letters_exits_1(
    served: str, app_module: ModuleType
) -> None:
    app: QueueTasks = app_module.app
    rejected = app.add_task("no_such_task")
    assert app.wait(rejected.uuid, 5).status.value == "error"
    code, out = invoke("dlq", "requeue", "nonexistent", rejected.uuid, "-A", served)
    assert code == 1
    assert out.splitlines() == ["requeued 1", "error: not a dead letter: nonexistent"]
    code, out = invoke("dlq", "requeue", "nonexistent", "-A", served)
    assert code == 1
    assert out.splitlines() == ["requeued 0", "error: not a dead letter: nonexistent"]


SECRET_APP = """
from qtasks import QueueConfig, QueueTasks

app = QueueTasks("secret-app", config=QueueConfig(plugins_disabled=["timer"]))

@app.task
def login(user: str, password: str = "", **options: object) -> str:
    return f"redis://{user}:{password}@db:6379/0"
"""


def test_task_records_are_printed_with_secrets_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``qtasks get`` and ``add --wait`` printed ``{"password": "hunter2"}`` as it is, where
    the dashboard and ``qtasks config`` mask it (review r15 #6); --show-secrets shows it."""
    name = f"secretapp_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(SECRET_APP)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    app: QueueTasks = importlib.import_module(name).app
    target = f"{name}:app"
    try:
        with app:
            code, out = invoke("add", "-A", target, "login", "ann", "hunter2", "--wait", "5")
            assert code == 0, out
            assert 'args: ["ann", "***"]' in out  # positional, by the task's parameter name
            assert "returning: redis://ann:***@db:6379/0" in out  # a result quoting a DSN
            assert "hunter2" not in out
            kwargs = '{"password": "hunter2", "note": "token=hunter2", "user_name": "x"}'
            code, out = invoke("add", "-A", target, "login", "bob", "--kwargs", kwargs, "--json")
            assert code == 0, out
            enqueued = json.loads(out)
            assert enqueued["kwargs"] == {"password": "***", "note": "token=***", "user_name": "x"}
            app.wait(enqueued["uuid"], 5)
            for extra in ([], ["--json"]):
                code, out = invoke("get", enqueued["uuid"], "-A", target, *extra)
                assert code == 0, out
                assert "hunter2" not in out and "***" in out
            code, out = invoke("get", enqueued["uuid"], "-A", target, "--show-secrets")
            assert code == 0, out
            assert '"password": "hunter2"' in out
            assert "warning: --show-secrets: passwords and secrets are shown" in out
    finally:
        app.close()
        sys.modules.pop(name, None)


UNREAD_APP = """
from qtasks import AsyncQueueTasks, QueueConfig
built = AsyncQueueTasks("built", config=QueueConfig(plugins_disabled=["*"]))
configured = AsyncQueueTasks.from_config(name="configured", plugins_disabled=["*"], lease=7)
"""


def test_settings_an_app_built_in_code_does_not_read_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A qtasks.toml naming Redis next to an app built with its constructor: `qtasks run` would
    serve an in-memory queue. Every command that loads the app says which settings it does
    not use, and where they came from; an app built by from_config() reads them, and a key
    it sets in code or a flag given on the command line is not named."""
    (tmp_path / "qtasks.toml").write_text(
        'broker = "redis"\nbroker_url = "redis://default:hunter2@127.0.0.1:6379/5"\n'
        "prefetch = 3\nlease = 9\n"
    )
    name = f"unread_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(UNREAD_APP)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("QTASKS_MAX_TASKS_PROCESS", "4")
    try:
        code, out = invoke("-A", f"{name}:built", "config", "--json")
        assert code == 0, out
        warned = [r.getMessage() for r in caplog.records if "does not use" in r.getMessage()]
        assert len(warned) == 1, warned
        message = warned[0]
        toml = str(tmp_path / "qtasks.toml")
        assert f'broker = "redis" ({toml}; the app has "memory")' in message
        assert f"prefetch = 3 ({toml}; the app has null)" in message
        assert "max_tasks_process = 4 (env QTASKS_MAX_TASKS_PROCESS; the app has 10)" in message
        assert "hunter2" not in message and "redis://default:***@127.0.0.1:6379/5" in message
        assert "QueueTasks.from_config()" in message

        # The command works on a resolved app too (run, add, inspect...): a flag given for
        # a key is applied, so it is not named.
        caplog.clear()
        from qtasks.cli import resolve_app

        resolve_app(f"{name}:built", None, {"prefetch": 2}, need_tasks=False)
        message = next(r.getMessage() for r in caplog.records if "does not use" in r.getMessage())
        assert "prefetch" not in message and 'broker = "redis"' in message

        # from_config() read the file and the variable; lease was set in code on purpose.
        caplog.clear()
        resolve_app(f"{name}:configured", None, {}, need_tasks=False)
        assert not [r for r in caplog.records if "does not use" in r.getMessage()]
    finally:
        sys.modules.pop(name, None)


def test_unread_settings_are_not_claimed_for_components_the_code_built_nor_said_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker object the code built (its own URL) is not what the file's broker keys would
    build, and the warning does not claim the app serves memory; the file's own warnings
    (read when the command read it) are not repeated; a file that cannot be read next to an
    app built in code is said, not ignored."""
    from qtasks.cli import resolve_app
    from qtasks.components import Broker

    name = f"unread_obj_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "from qtasks import AsyncQueueTasks, QueueConfig\n"
        "from qtasks.memory import MemoryBroker\n"
        "class OwnBroker(MemoryBroker):\n"
        "    pass\n"
        "config = QueueConfig(plugins_disabled=['*'])\n"
        "app = AsyncQueueTasks('obj', broker=OwnBroker(), config=config)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        (tmp_path / "qtasks.toml").write_text(
            'broker = "redis"\nbroker_url = "redis://127.0.0.1:6379/5"\nprefetch = 3\n'
            '[extra]\nbroker = "redis"\n'
        )
        app = resolve_app(f"{name}:app", None, {}, need_tasks=False)
        assert isinstance(app.broker, Broker) and type(app.broker).__name__ == "OwnBroker"
        said = [r.getMessage() for r in caplog.records]
        [warned] = [m for m in said if "does not use" in m]
        assert "prefetch = 3" in warned, warned
        assert 'broker = "redis"' not in warned and "broker_url" not in warned, warned
        # Read for the comparison only, quietly: what reading it says is said by the commands
        # that read it for their app (none here, as before).
        assert not [m for m in said if "inside [extra]" in m], said
        caplog.clear()
        (tmp_path / "qtasks.toml").write_text('broker = "redis\n')  # unterminated
        resolve_app(f"{name}:app", None, {}, need_tasks=False)
        [warned] = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
        assert "qtasks.toml" in warned and f"the app {name}:app, built in code" in warned
    finally:
        sys.modules.pop(name, None)
