"""What makes every run of a task fail in its dependencies is refused when the task is
declared (``@app.task``), not found at its first run in production: a parameter of a
dependency function that nothing fills, a dependency using a shorter-lived one, an unknown
scope, a cycle, injected parameters that cannot be passed, a State of the wrong colour."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import pytest

from qtasks import AsyncQueueTasks, Depends, QueueTasks, TaskStatus
from qtasks.depends import Dependency
from qtasks.errors import DependencyError, QTasksError, StateError
from qtasks.routers import Router
from qtasks.state import SyncState


def ping(p: Annotated[int, Depends(pong)]) -> int:  # pong: found when the string is evaluated
    return p


def pong(p: Annotated[int, Depends(ping)]) -> int:
    return p


def per_task() -> int:
    return 1


def longer(x: int = Depends(per_task)) -> int:
    return x


def needs_arg(x: int) -> int:
    return x


def uses_needs_arg(y: int = Depends(needs_arg, scope="worker")) -> int:
    return y


class Settings(SyncState):
    scope = "global_config"


async def scope_mismatch(v: int = Depends(longer, scope="worker")) -> int:
    return v


async def no_default(v: int = Depends(needs_arg)) -> int:
    return v


async def nested_no_default(v: int = Depends(uses_needs_arg, scope="worker")) -> int:
    return v


# Built directly, bypassing Depends()'s check; ignore: "cluster" is not a Scope on purpose.
CLUSTER = Dependency(per_task, "cluster")  # type: ignore[arg-type]


async def bad_scope(v: Any = CLUSTER) -> int:
    return int(v)


async def positional_only(a: int, /, v: int = Depends(per_task)) -> int:
    return v


async def wrong_colour(s: Settings) -> None:
    return None


@pytest.mark.parametrize(
    ("body", "error", "match"),
    [
        (scope_mismatch, DependencyError, r"longer \(scope 'worker'\) cannot use per_task"),
        (no_default, DependencyError, "parameter 'x' of dependency needs_arg has no default"),
        (nested_no_default, DependencyError, "parameter 'x' of dependency needs_arg"),
        (bad_scope, DependencyError, "unknown Depends scope 'cluster' of per_task"),
        (positional_only, DependencyError, "make its injected parameters keyword-only"),
        (wrong_colour, StateError, "would block the event loop"),
    ],
)
def test_a_broken_dependency_is_refused_when_the_task_is_declared(
    body: Callable[..., Any], error: type[QTasksError], match: str
) -> None:
    app = AsyncQueueTasks()
    with pytest.raises(error, match=match):
        app.task(body)
    assert body.__name__ not in app.tasks  # not registered half-way


def test_a_dependency_cycle_is_refused_when_the_task_is_declared() -> None:
    app = AsyncQueueTasks()

    async def cyclic(v: Annotated[int, Depends(pong)]) -> int:
        return v

    with pytest.raises(DependencyError, match="dependency cycle: pong -> ping"):
        app.task(cyclic)


def test_the_sync_app_and_routers_check_too() -> None:
    with pytest.raises(DependencyError, match="needs_arg has no default"):
        QueueTasks().task(no_default)
    router = Router()
    router.task(no_default)
    with pytest.raises(DependencyError, match="needs_arg has no default"):
        AsyncQueueTasks().include_router(router)


class Conn:
    """A dependency that is a class: its ``__init__``'s annotations are strings here."""

    def __init__(self, url: str) -> None:
        self.url = url


class Connect:
    """A dependency that is a callable object."""

    def __call__(self, url: str) -> str:
        return url


def two_args(a: int, b: str) -> str:
    return f"{a}{b}"


async def class_dependency(c: Annotated[Conn, Depends(Conn)]) -> None:
    return None


async def object_dependency(c: Annotated[str, Depends(Connect())]) -> None:
    return None


async def partial_dependency(c: Annotated[str, Depends(functools.partial(two_args, 1))]) -> None:
    return None


@pytest.mark.parametrize(
    ("body", "unfilled"),
    [(class_dependency, "url"), (object_dependency, "url"), (partial_dependency, "b")],
)
def test_string_annotations_of_a_class_object_or_partial_dependency_are_resolved(
    body: Callable[..., Any], unfilled: str
) -> None:
    """With ``from __future__ import annotations`` (this module), a dependency's annotations
    are strings, evaluated in the module of the code ``inspect.signature`` reads: for a
    function its own, for a class its ``__init__``'s, for a callable object its ``__call__``'s,
    for a partial its function's. Those three stayed strings, taken for names that may resolve
    by the run, so their errors waited for the first run."""
    assert isinstance(inspect.signature(Conn).parameters["url"].annotation, str)
    with pytest.raises(DependencyError, match=f"parameter '{unfilled}' of dependency"):
        AsyncQueueTasks().task(body)


FORWARD = """
from __future__ import annotations
from typing import Annotated
from qtasks import Depends

@app.task
async def early(v: Annotated[int, Depends(defined_later)]) -> int:
    return v

def defined_later(x: int) -> int:  # a parameter nothing fills: fails every run
    return x
"""


@pytest.mark.anyio
async def test_a_name_defined_further_down_the_module_is_checked_at_the_run() -> None:
    """A name the annotation uses that the module defines after the task cannot be resolved
    when ``@app.task`` runs: the declaration stands, and the run finds the error."""
    app = AsyncQueueTasks()
    exec(compile(FORWARD, "forward_module", "exec"), {"app": app, "__name__": "forward_module"})
    assert "early" in app.tasks
    async with app:
        record = await app.add_task("early", timeout=10)
    assert record.status is TaskStatus.ERROR
    assert record.error is not None
    assert "parameter 'x' of dependency defined_later has no default" in record.error
