"""QTasks' call shapes that name the task by keyword: ``add_task(5, task_name="x")``."""

from __future__ import annotations

import reprlib
from typing import Any

from qtasks.errors import TaskArgumentsError

UNSET: Any = object()
"""Default of a positional-only ``task_name``: the caller passed none (QTasks' keyword form)."""


def split_task_name(
    first: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[str, tuple[Any, ...]]:
    """``(task_name, args)`` of an ``add_task`` call.

    qtasks' form names the task first: ``add_task("x", 5)``. QTasks' echo task and timer name it
    by keyword with every positional an argument: ``add_task(5, task_name="x")``. When
    ``task_name`` is among ``kwargs`` it is popped and ``first`` (if given) becomes the first
    argument. So a task whose own parameter is called ``task_name`` is enqueued with
    ``enqueue`` (as with ``priority`` and ``timeout``)."""
    if "task_name" in kwargs:
        name = kwargs.pop("task_name")
        return name, args if first is UNSET else (first, *args)
    if first is UNSET:
        raise TypeError("add_task() needs the task's name: add_task('name', *args, **kwargs)")
    return first, args


def bad_task_name(task_name: Any, kwargs: dict[str, Any]) -> TaskArgumentsError:
    """The error for an enqueue whose task name is not a ``str`` (the worker could not decode
    its message). The app's ``add_task`` takes the name first; QTasks' ``app.add_task(5,
    task_name="x")`` raised ``TypeError`` (two values for ``task_name``), as this does."""
    got = f"{reprlib.repr(task_name)} ({type(task_name).__name__})"
    named = kwargs.get("task_name")
    if isinstance(named, str):
        return TaskArgumentsError(
            f"add_task: the task is named twice, {got} first and task_name={named!r}; the "
            f"app takes the name first: add_task({named!r}, {reprlib.repr(task_name)}, ...) "
            "(the form add_task(5, task_name=...) is an echo task's self.add_task or a timer's)"
        )
    return TaskArgumentsError(
        f"add_task: a task name must be a str, got {got}; "
        "name the task first: add_task('name', *args, **kwargs)"
    )
