"""QTasks 1.7's names that qtasks' modules at QTasks' paths lack: reading one says what to write.

qtasks keeps QTasks' import paths where it has what they held (``from qtasks.plugins import
AsyncState``); QTasks' modules held more (``AsyncDependsPlugin``, which qtasks has no use for:
``Depends`` is built in). Each such module ends with ``__getattr__ = refuse(__name__)`` (outside
type checking, so that a type checker still reports the name as missing), which raises, for a
name of :data:`MISSING`, :class:`~qtasks.errors.QTasksImportNotProvidedError` from a ``from
module import name`` (an ``ImportError``: CPython replaces an ``AttributeError`` raised there
with a bare "cannot import name", losing the advice) and
:class:`~qtasks.errors.QTasksAttributeNotProvidedError` otherwise (an ``AttributeError``, so
``hasattr()`` says ``False``). The modules qtasks lacks altogether are
:mod:`qtasks.compat.modules`'.
"""

from __future__ import annotations

import importlib
import opcode
import sys
from collections.abc import Callable
from typing import Any

from qtasks.compat.modules import DEPENDS, INSTEAD, STATES
from qtasks.errors import QTasksAttributeNotProvidedError, QTasksImportNotProvidedError

_IMPORT_FROM = opcode.opmap["IMPORT_FROM"]

_PLUGINS = {
    "AsyncDependsPlugin": DEPENDS,
    "SyncDependsPlugin": DEPENDS,
    "AsyncStatePlugin": STATES,
    "SyncStatePlugin": STATES,
    "AsyncPydanticWrapperPlugin": INSTEAD["qtasks.plugins.pydantic"],
    "SyncPydanticWrapperPlugin": INSTEAD["qtasks.plugins.pydantic"],
    "AsyncRetryPlugin": INSTEAD["qtasks.plugins.retries"],
    "SyncRetryPlugin": INSTEAD["qtasks.plugins.retries"],
    "AsyncTestPlugin": INSTEAD["qtasks.plugins.testing"],
    "SyncTestPlugin": INSTEAD["qtasks.plugins.testing"],
    "AsyncgRPCPlugin": INSTEAD["qtasks.plugins.grpc"],
    "SyncgRPCPlugin": INSTEAD["qtasks.plugins.grpc"],
}
_REGISTRIES = {"AsyncStateRegistry": STATES, "SyncStateRegistry": STATES}
_BASE_TIMER = {"BaseTimer": INSTEAD["qtasks.timers.base"]}
_BASE_TEST_CASE = {"BaseTestCase": INSTEAD["qtasks.tests.base"]}
_STATUS = INSTEAD["qtasks.schemas.task_status"]

MISSING: dict[str, dict[str, str]] = {
    "qtasks.plugins": _PLUGINS,
    "qtasks.plugins.depends": {k: v for k, v in _PLUGINS.items() if "Depends" in k},
    "qtasks.plugins.depends.async_depends": {"AsyncDependsPlugin": DEPENDS},
    "qtasks.plugins.depends.sync_depends": {"SyncDependsPlugin": DEPENDS},
    "qtasks.plugins.states": {k: v for k, v in _PLUGINS.items() if "State" in k},
    "qtasks.plugins.states.async_state": {"AsyncStatePlugin": STATES},
    "qtasks.plugins.states.sync_state": {"SyncStatePlugin": STATES},
    "qtasks.plugins.states.fsm": _REGISTRIES,
    "qtasks.middlewares.task": {"BaseMiddleware": INSTEAD["qtasks.middlewares.base"]},
    "qtasks.registries": {"TaskRegistry": INSTEAD["qtasks.registries.task_registry"]},
    "qtasks.registries.async_task_decorator": {
        "AsyncTaskCls": INSTEAD["qtasks.schemas.task_cls"],
        "AsyncContext": INSTEAD["qtasks.contexts"],
    },
    "qtasks.registries.sync_task_decorator": {
        "SyncTaskCls": INSTEAD["qtasks.schemas.task_cls"],
        "SyncContext": INSTEAD["qtasks.contexts"],
    },
    "qtasks.schemas": {
        "TaskExecSchema": INSTEAD["qtasks.schemas.task_exec"],
        "GlobalConfigSchema": INSTEAD["qtasks.schemas.global_config"],
        "TaskStatusNewSchema": _STATUS,
        "TaskStatusProcessSchema": _STATUS,
        "TaskStatusSuccessSchema": _STATUS,
        "TaskStatusErrorSchema": _STATUS,
    },
    "qtasks.tests.async_testcase": _BASE_TEST_CASE,
    "qtasks.tests.sync_testcase": _BASE_TEST_CASE,
    "qtasks.timers.async_timer": _BASE_TIMER,
    "qtasks.timers.sync_timer": _BASE_TIMER,
}
"""QTasks module qtasks has -> {a public name it held that qtasks lacks: what to write}."""


def refuse(module: str, lazy: dict[str, str] | None = None) -> Callable[[str], Any]:
    """The ``__getattr__`` of ``module``: a name of :data:`MISSING` raises with its advice,
    any other as Python does for a missing attribute. ``lazy``: names the module provides
    from another module, imported on first use (one that imports ``module``)."""
    missing, later = MISSING[module], lazy or {}

    def __getattr__(name: str) -> Any:
        if name in later:
            return getattr(importlib.import_module(later[name]), name)
        advice = missing.get(name)
        if advice is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}", name=name)
        caller = sys._getframe(1)  # the code reading the name
        lasti = caller.f_lasti
        if lasti >= 0 and caller.f_code.co_code[lasti] == _IMPORT_FROM:
            raise QTasksImportNotProvidedError(module, name, advice)
        raise QTasksAttributeNotProvidedError(module, name, advice)

    return __getattr__
