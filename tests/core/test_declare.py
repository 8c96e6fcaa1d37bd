"""Declaring tasks: options are checked at declaration time; the decorated object stays callable."""

from __future__ import annotations

import inspect
import re
import warnings
from typing import Any

import pytest

from qtasks import AsyncQueueTasks, QueueTasks, TaskDeclarationError
from qtasks.errors import QTasksError, TaskArgumentsError
from qtasks.task import TaskKind


def test_bare_decorator_keeps_function_callable() -> None:
    app = AsyncQueueTasks()

    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    assert add(2, 3) == 5
    assert app.tasks["add"] is add
    assert add.kind is TaskKind.SYNC


def test_named_task_and_kinds() -> None:
    app = AsyncQueueTasks()

    @app.task("custom", priority=3, tags=["a"], description="d", extra_flag=True)
    async def coro() -> None: ...

    @app.task
    def gen():  # type: ignore[no-untyped-def]
        yield 1

    @app.task
    async def agen():  # type: ignore[no-untyped-def]
        yield 1

    assert app.tasks["custom"].options.priority == 3
    assert app.tasks["custom"].options.tags == ("a",)
    assert app.tasks["custom"].options.extra == {"extra_flag": True}
    assert coro.kind is TaskKind.ASYNC
    assert gen.kind is TaskKind.SYNC_GEN
    assert agen.kind is TaskKind.ASYNC_GEN


def test_duplicate_name_is_an_error() -> None:
    app = AsyncQueueTasks()

    @app.task
    def job() -> None: ...

    with pytest.raises(TaskDeclarationError, match="already registered"):

        @app.task(name="job")
        def other() -> None: ...


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("priority", "high"),
        ("echo", 1),
        ("max_time", -1),
        ("retry", "3"),
        ("retry_on_exc", ["ValueError"]),
        ("decode", 42),
        ("generate_handler", "x"),
        ("tags", [1]),
        ("retry_backoff", "fast"),
    ],
)
def test_wrong_option_type_is_an_error(option: str, value: object) -> None:
    app = QueueTasks()
    with pytest.raises(TaskDeclarationError, match=option) as info:

        @app.task(**{option: value})  # type: ignore[call-overload, untyped-decorator]  # bad on purpose
        def job() -> None: ...

    assert isinstance(info.value, QTasksError)
    assert "job" not in app.tasks


def test_echo_needs_a_parameter() -> None:
    app = AsyncQueueTasks()
    with pytest.raises(TaskDeclarationError, match="echo"):

        @app.task(echo=True)
        def job() -> None: ...


@pytest.mark.parametrize(
    ("args", "kwargs", "ok"),
    [
        ((1, 2), {}, True),
        ((1,), {"b": 2}, True),
        ((), {"a": 1, "b": 2}, True),
        ((1,), {}, False),
        ((1, 2, 3), {}, False),
        ((1,), {"a": 2}, False),
        ((), {"a": 1, "c": 2}, False),
    ],
)
def test_argument_check(args: tuple[int, ...], kwargs: dict[str, int], ok: bool) -> None:
    from qtasks.errors import TaskArgumentsError

    app = AsyncQueueTasks()

    @app.task
    def plain(a: int, b: int) -> None: ...

    @app.task
    def with_default(a: int, b: int = 0, *rest: int) -> None: ...

    def fits(task: object) -> bool:
        try:
            task.check_arguments(args, kwargs)  # type: ignore[attr-defined]
        except TaskArgumentsError:
            return False
        return True

    assert fits(plain) is ok
    # the general path agrees with inspect's own binding
    try:
        inspect.signature(with_default).bind(*args, **kwargs)
        expected = True
    except TypeError:
        expected = False
    assert fits(with_default) is expected


@pytest.mark.parametrize(
    ("option", "value", "instead"),
    [
        ("max_retries", 3, "retry=N"),
        ("autoretry_for", (ConnectionError,), "retry_on_exc=[...] with retry=N"),
        ("time_limit", 30, "max_time=seconds"),
        ("bind", True, "echo=True"),
    ],
)
def test_celerys_name_for_an_option_warns_with_ours(option: str, value: Any, instead: str) -> None:
    """``@app.task(max_retries=3, autoretry_for=(ConnectionError,))``, Celery's spelling, was
    kept in the task's extra without a word: the task was never retried (walk-through). It
    warns at the declaration, naming the option to write (docs/from-celery.md)."""
    app = QueueTasks("celery-names")
    says = f"unknown option '{option}' is kept in the task's extra and not applied; did you mean"
    with pytest.warns(UserWarning, match=re.escape(f"{says} {instead}?")) as caught:

        @app.task(**{option: value})
        def f() -> None: ...

    assert [w.filename for w in caught] == [__file__]  # points at the declaration
    assert f.options.extra == {option: value}


@pytest.mark.parametrize(
    ("option", "value", "advice"),
    [
        ("queue", "high", "an app has one queue, its broker's"),
        ("routing_key", "high", "an app has one queue, its broker's"),
        ("ignore_result", True, "every task's record is stored with its result"),
        ("serializer", "pickle", "messages are JSON, or what the app's serializer="),
        ("retry_backoff_max", 60, "did you mean the app's setting retry_backoff_max"),
    ],
)
def test_celerys_options_without_a_counterpart_warn_with_what_qtasks_does(
    option: str, value: Any, advice: str
) -> None:
    """``@app.task(queue="high")``, the commonest Celery option, was kept in the task's extra
    without a word: the task went to the app's one queue, served by every worker of the app,
    and the newcomer's routing silently did nothing (walk-through of docs/from-celery.md).
    It warns at the declaration with what qtasks does instead; so do ``routing_key``,
    ``ignore_result`` and ``serializer``, and ``retry_backoff_max``, which named
    ``retry_backoff`` (a typo's match) rather than the app's setting of that name."""
    app = QueueTasks("celery-advice")
    with pytest.warns(UserWarning, match=re.escape(advice)) as caught:

        @app.task(**{option: value})
        def f() -> None: ...

    assert [w.filename for w in caught] == [__file__]
    assert f"unknown option '{option}' is kept in the task's extra" in str(caught[0].message)
    assert f.options.extra == {option: value}


def test_celerys_delay_and_apply_async_of_a_task_name_add_task() -> None:
    """``add.delay(2, 3)``, the first line of every Celery tutorial, raised a bare
    ``AttributeError: 'SyncTaskDef' object has no attribute 'delay'`` (a signature's
    ``.delay()`` already named ``run_workflow``); and ``add_task(2, 3, countdown=10)`` only
    said "unexpected keyword argument 'countdown'". Each now names what to write, before
    anything is enqueued."""
    app = QueueTasks("celery-calls")

    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    with pytest.raises(
        TaskArgumentsError, match=r"^add\.delay\(\.\.\.\) is Celery's call: .*add\.add_task"
    ):
        add.delay(2, 3)
    with pytest.raises(TaskArgumentsError, match=r"^add\.apply_async\(\.\.\.\) .* delay=seconds"):
        add.apply_async((2, 3), countdown=10)
    with pytest.raises(TaskArgumentsError, match=r"countdown= is Celery.s: .*delay=seconds\)\)$"):
        add.add_task(2, 3, countdown=10)
    with pytest.raises(TaskArgumentsError, match=r"queue= is Celery's: an app has one queue"):
        app.add_task("add", 2, 3, queue="high")

    @app.task
    def scheduled(countdown: int) -> int:  # a task's own parameter of that name is its own
        return countdown

    with pytest.raises(TaskArgumentsError) as caught:
        scheduled.add_task()
    assert "Celery" not in str(caught.value)
    app.close()


def test_a_self_parameter_without_echo_says_to_declare_echo() -> None:
    """``def poll(self, every)`` declared with a bare ``@app.task`` (Celery's ``bind=True``,
    or qtasks' ``echo=True``, left out): ``add_task("poll", 5)`` said only "missing a required
    argument: 'every'", the caller's 5 gone to ``self``. The error now names the fix."""
    app = QueueTasks("self-without-echo")

    @app.task
    def poll(self: Any, every: float) -> float:
        return every

    for args in [(5,), ()]:
        with pytest.raises(TaskArgumentsError, match=r"first parameter is 'self': .*echo=True"):
            poll.add_task(*args)

    @app.task(echo=True)
    def polled(self: Any, every: float) -> float:
        return every

    with pytest.raises(TaskArgumentsError) as caught:
        polled.add_task()  # echo=True: 'every' is what is missing, no word about self
    assert "echo" not in str(caught.value)
    app.close()


def test_a_router_or_shared_tasks_option_is_warned_about_where_it_is_declared() -> None:
    """``@shared_task(bind=True)`` / ``@router.task(max_retries=3)`` warned when an app bound
    the task, pointing at ``QueueTasks()`` or ``include_router`` (not at the option) and once
    per app (twice for a sync app's build). It warns once, at the declaration."""
    from qtasks import SyncRouter, shared_task
    from qtasks.routers import shared_tasks

    router = SyncRouter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 2  # type: ignore[union-attr]

        @router.task(max_retries=3)
        def routed() -> None: ...

        @shared_task(bind=True)
        def shared(self: Any) -> None: ...

    assert [(w.filename, w.lineno) for w in caught] == [(__file__, line), (__file__, line + 3)]
    assert "did you mean retry=N" in str(caught[0].message)
    assert "did you mean echo=True" in str(caught[1].message)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # binding them to an app warns no more
            app = QueueTasks("declared-once")
            app.include_router(router)
            with app:
                pass
            app.close()
        assert {"routed", "shared"} <= set(app.tasks)
        assert app.tasks["routed"].options.extra == {"max_retries": 3}
    finally:
        shared_tasks.tasks.pop("shared", None)  # this process's other tests
