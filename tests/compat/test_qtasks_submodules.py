"""QTasks 1.7's long import paths below ``qtasks.middlewares``, ``qtasks.exc``, ``qtasks.timers``,
``qtasks.tests``, ``qtasks.routers``, ``qtasks.plugins.depends`` and ``qtasks.plugins.states``
(``from qtasks.middlewares.task import TaskMiddleware``...): those holding what qtasks provides
give the same objects as the short paths, the others are refused with what to write instead,
never "'qtasks.exc' is not a package". Each import runs in a fresh interpreter, as a user's
program would."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qtasks.compat.modules import INSTEAD

SAME = {
    "qtasks.middlewares.task": ("qtasks.middlewares", ["TaskMiddleware"]),
    "qtasks.exc.task": ("qtasks.exc", ["TaskCancelError"]),
    "qtasks.exc.plugins": ("qtasks.exc", ["TaskPluginTriggerError"]),
    "qtasks.timers.async_timer": ("qtasks_timer", ["AsyncTimer"]),
    "qtasks.timers.sync_timer": ("qtasks_timer", ["SyncTimer"]),
    "qtasks.tests.async_testcase": ("qtasks.tests", ["AsyncTestCase"]),
    "qtasks.tests.sync_testcase": ("qtasks.tests", ["SyncTestCase"]),
    "qtasks.routers.async_router": ("qtasks", ["AsyncRouter"]),
    "qtasks.routers.sync_router": ("qtasks", ["SyncRouter"]),
    "qtasks.plugins.depends.class_depends": ("qtasks.plugins.depends", ["Depends", "ScopeEnum"]),
    "qtasks.plugins.depends.enums": ("qtasks.plugins.depends", ["ScopeEnum"]),
    "qtasks.plugins.depends.enums.scope": ("qtasks.plugins.depends", ["ScopeEnum"]),
    "qtasks.plugins.states.fsm": ("qtasks.state", ["AsyncState", "SyncState"]),
    "qtasks.plugins.states.async_state": ("qtasks.state", ["AsyncState"]),
    "qtasks.plugins.states.sync_state": ("qtasks.state", ["SyncState"]),
    "qtasks.plugins.depends.async_depends": ("qtasks", ["Depends"]),
    "qtasks.plugins.depends.sync_depends": ("qtasks", ["Depends"]),
    "qtasks.plugins": ("qtasks", ["Depends"]),
    "qtasks.schemas": ("qtasks.schemas.test", ["TestConfig"]),
    "qtasks.contrib.django.autodiscover": ("qtasks.contrib.django", ["autodiscover_tasks"]),
}

REFUSED = {
    "qtasks.middlewares.base": "qtasks.middlewares.base",
    "qtasks.timers.base": "qtasks.timers.base",
    "qtasks.tests.base": "qtasks.tests.base",
    "qtasks.tests.async_classes": "qtasks.tests.async_classes",
    "qtasks.tests.sync_classes": "qtasks.tests.sync_classes",
    "qtasks.plugins.depends.contexts.async_contexts": "qtasks.plugins.depends.contexts",
    "qtasks.plugins.states.registry": "qtasks.plugins.states.registry",
    "qtasks.registries.task_registry": "qtasks.registries.task_registry",
    "qtasks.schemas.task_cls": "qtasks.schemas.task_cls",
    "qtasks.types.typing": "qtasks.types",
    "qtasks._state": "qtasks._state",
}


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("path", SAME)
def test_qtasks_long_path_gives_the_same_objects(path: str) -> None:
    short, names = SAME[path]
    listed = ", ".join(names)
    code = (
        f"from {path} import {listed}\n"
        f"import {short} as short\n"
        f"print([obj is getattr(short, name) for name, obj in zip({names!r}, [{listed}])])\n"
    )
    done = run(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == repr([True] * len(names))


@pytest.mark.parametrize("path", REFUSED)
def test_qtasks_long_path_qtasks_lacks_says_what_to_write(path: str) -> None:
    refused = REFUSED[path]
    done = run(f"import {path}\n")
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"qtasks.errors.QTasksModuleNotProvidedError: {refused} is QTasks 1.7's module"
    ), last
    assert INSTEAD[refused] in last
    assert "is not a package" not in done.stderr


def test_the_short_paths_still_hold_their_names() -> None:
    """The modules turned into packages keep what they had (and import nothing extra)."""
    code = (
        "import sys\n"
        "from qtasks.middlewares import TaskMiddleware\n"
        "from qtasks.exc import TaskCancelError, TaskPluginTriggerError\n"
        "from qtasks.tests import AsyncTestCase, SyncTestCase\n"
        "from qtasks.routers import Router, pin_app, shared_tasks\n"
        "from qtasks.plugins.depends import Depends, ScopeEnum\n"
        "from qtasks.plugins.states import AsyncState, SyncState\n"
        "from qtasks.timers import AsyncTimer, SyncTimer\n"
        "print(sorted(m for m in sys.modules if m.startswith('qtasks.exc.')))\n"
    )
    done = run(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
