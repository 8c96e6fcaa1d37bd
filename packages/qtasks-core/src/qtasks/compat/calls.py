"""QTasks' call shapes that name the task by keyword: ``add_task(5, task_name="x")``."""

from __future__ import annotations

from typing import Any

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
