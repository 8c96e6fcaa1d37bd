"""The pytest plugin, run through ``pytester`` under plain pytest, anyio and pytest-asyncio."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qtasks_testing.harness import HarnessError
from qtasks_testing.pytest_plugin import load_app

pytest_plugins = ["pytester"]

SYNC_TESTS = """
import pytest
from qtasks import TaskStatus


def test_inline(qtasks, qtasks_app):
    @qtasks_app.task
    def add(a, b):
        return a + b

    assert add.add_task(1, 2).returning == 3
    qtasks.assert_enqueued(add, 1, 2)
    qtasks.assert_not_enqueued(add, 2, 1)


def test_fresh_app_per_test(qtasks, qtasks_app):
    assert "add" not in qtasks_app.tasks
    assert qtasks.enqueued() == []


def test_worker(qtasks_worker, qtasks_app):
    @qtasks_app.task
    def add(a, b):
        return a + b

    task = add.add_task(1, 2)
    assert qtasks_worker.wait(task).returning == 3


@pytest.mark.qtasks(raise_task_errors=False)
def test_marker_options(qtasks, qtasks_app):
    @qtasks_app.task
    def boom():
        raise ValueError("expected")

    assert boom.add_task().status is TaskStatus.ERROR


def test_failing_task(qtasks, qtasks_app):
    @qtasks_app.task
    def divide(a, b):
        return a / b  # the line the report must show

    divide.add_task(1, 0)
"""

ASYNC_TESTS = """
import pytest


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.{mark}
async def test_inline(aqtasks, qtasks_async_app):
    @qtasks_async_app.task
    async def add(a, b):
        return a + b

    assert (await add.add_task(1, 2)).returning == 3
    aqtasks.assert_enqueued("add", 1, 2)


@pytest.mark.{mark}
async def test_worker(aqtasks_worker, qtasks_async_app):
    @qtasks_async_app.task
    async def add(a, b):
        return a + b

    task = await add.add_task(1, 2)
    assert (await aqtasks_worker.wait(task)).returning == 3
"""


def test_sync_fixtures_under_plain_pytest(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(SYNC_TESTS)
    result = pytester.runpytest("-p", "no:asyncio", "-p", "no:anyio")
    result.assert_outcomes(passed=4, failed=1)
    # The failing task's own traceback is in the report of the test that added it.
    result.stdout.fnmatch_lines(
        [
            "*TaskFailedError: task divide(1, 0) * failed: ZeroDivisionError: division by zero*",
            "*return a / b  # the line the report must show*",
        ]
    )


@pytest.mark.parametrize(
    ("mark", "args"),
    [
        ("anyio", ["-p", "no:asyncio"]),
        ("asyncio", ["-p", "no:anyio", "-o", "asyncio_mode=strict"]),
        ("asyncio", ["-p", "no:anyio", "-o", "asyncio_mode=auto"]),
    ],
    ids=["anyio", "pytest-asyncio-strict", "pytest-asyncio-auto"],
)
def test_async_fixtures(pytester: pytest.Pytester, mark: str, args: list[str]) -> None:
    pytester.makepyfile(ASYNC_TESTS.format(mark=mark))
    result = pytester.runpytest(
        "-W",
        "error::DeprecationWarning",
        "-o",
        "asyncio_default_fixture_loop_scope=function",
        *args,
    )
    result.assert_outcomes(passed=2)


def test_ini_option_wraps_the_users_app(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        myproject="""
from qtasks import QueueTasks

app = QueueTasks()


@app.task
def greet(name):
    return f"hello {name}"


def signup(name):
    greet.add_task(name)
    return "ok"
""",
        test_user="""
import myproject


def test_code_under_test(qtasks):
    assert myproject.signup("ada") == "ok"
    qtasks.assert_enqueued("greet", "ada")
    assert qtasks.enqueued()[0].kwargs == {}


def test_components_restored_after_the_previous_test():
    from qtasks import MemoryBroker
    assert myproject.app.aio.broker is ORIGINAL_BROKER
    assert "enqueue" not in vars(myproject.app.aio)


ORIGINAL_BROKER = myproject.app.aio.broker
""",
    )
    pytester.makeini("[pytest]\nqtasks_app = myproject:app\n")
    result = pytester.runpytest("-p", "no:asyncio")
    result.assert_outcomes(passed=2)


def test_a_wrong_qtasks_app_option_names_the_modules_apps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``qtasks_app = myproject:ap`` raised a bare ``AttributeError`` from the fixture, and
    ``qtasks_app = myproject:send_email`` (a task is callable) called the task as an app
    factory: its code ran in the test process, then "is a str, not a qtasks app" (the ``qtasks
    -A`` option already refused a task). Both are refused naming the module's apps."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "ini_target_mod.py").write_text(
        "from pathlib import Path\n"
        "from qtasks import QueueTasks\n"
        "shop = QueueTasks('shop')\n"
        "@shop.task\n"
        "def purge() -> str:\n"
        "    Path('purged').write_text('everything')\n"
        "    return 'purged'\n"
    )
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(HarnessError) as caught:
            load_app("ini_target_mod:ap")
        assert str(caught.value) == (
            "qtasks_app 'ini_target_mod:ap': module 'ini_target_mod' has no 'ap' (its apps: "
            "ini_target_mod:shop)"
        )
        with pytest.raises(HarnessError) as caught:
            load_app("ini_target_mod:purge")
        assert str(caught.value) == (
            "qtasks_app 'ini_target_mod:purge' is a task, not an app: name the app it belongs "
            "to (its apps: ini_target_mod:shop)"
        )
        assert not (tmp_path / "purged").exists()
        assert load_app("ini_target_mod:shop").name == "shop"
    finally:
        sys.modules.pop("ini_target_mod", None)
