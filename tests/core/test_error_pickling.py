"""Every qtasks error survives ``pickle`` (an error of a worker process reaching its parent
through ``multiprocessing`` or a process pool, a test runner's subprocess): most build their
message from other arguments, and ``Exception``'s own pickling called the class with the
message alone (``TypeError: __init__() missing 1 required positional argument``)."""

from __future__ import annotations

import importlib
import inspect
import pickle
from typing import Any

import pytest

from qtasks.errors import QTasksError

MODULES = [
    "qtasks.errors",
    "qtasks.exc",
    "qtasks_rabbitmq.errors",
    "qtasks_timer.errors",
    "qtasks_testing.harness",
]
SAMPLES: dict[str, Any] = {"size": 2048, "limit": 1024, "timeout": 5.0, "max_time": 1.5}


def error_classes() -> list[type[QTasksError]]:
    found: dict[str, type[QTasksError]] = {}
    for name in MODULES:
        module = importlib.import_module(name)
        for value in vars(module).values():
            if inspect.isclass(value) and issubclass(value, QTasksError):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return [found[key] for key in sorted(found)]


def build(cls: type[QTasksError]) -> QTasksError:
    """``cls`` built with a sample for each of its parameters (strings but the numbers)."""
    args: list[Any] = []
    try:
        parameters = list(inspect.signature(cls).parameters.values())
    except ValueError:  # Exception's own __init__: any arguments
        parameters = []
    for parameter in parameters:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.default is not parameter.empty:
            continue
        args.append(SAMPLES.get(parameter.name, f"<{parameter.name}>"))
    if not args:
        args = ["what went wrong"]
    return cls(*args)


def test_the_tree_is_found() -> None:
    names = {cls.__name__ for cls in error_classes()}
    assert {"TaskTimeoutError", "OversizedMessageError", "ScheduleError", "HarnessError"} <= names


@pytest.mark.parametrize("cls", error_classes(), ids=lambda cls: cls.__name__)
def test_every_error_survives_pickle(cls: type[QTasksError]) -> None:
    error = build(cls)
    error.add_note("a note")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls
    assert str(copy) == str(error)
    assert copy.args == error.args
    assert vars(copy) == vars(error)  # uuid, timeout, size... and the notes


def test_an_error_raised_from_another_keeps_its_fields_and_message() -> None:
    from qtasks.errors import TaskTimeoutError

    try:
        try:
            raise ValueError("inner")
        except ValueError as inner:
            raise TaskTimeoutError("u1", 3.0) from inner
    except TaskTimeoutError as error:
        copy = pickle.loads(pickle.dumps(error))
    assert (copy.uuid, copy.timeout) == ("u1", 3.0)
    assert "did not finish within 3.0 s" in str(copy)
