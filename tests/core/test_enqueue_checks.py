"""The options of an enqueue (``priority``, ``delay``, ``eta``, ``timeout``) are checked by one
rule at every entry point, before anything is stored or published (review r5 #3, r19 #10)."""

from __future__ import annotations

import enum
import re
import reprlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from qtasks import AsyncQueueTasks, QueueConfig, QueueTasks
from qtasks.errors import (
    ConfigError,
    SerializationError,
    TaskArgumentsError,
    TaskDeclarationError,
)

pytestmark = pytest.mark.anyio

BAD_PRIORITIES = [1.5, "high", True, [1], 2**63, -(2**63) - 1, 10**400]
BAD_TIMES = ["5", float("nan"), float("inf"), float("-inf"), True, 10**400, [1]]


def short(value: Any) -> str:
    return f"{value!r:.20}"


class Level(enum.IntEnum):
    HIGH = 1


def app_with_add() -> AsyncQueueTasks:
    app = AsyncQueueTasks("checks")

    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    return app


async def assert_nothing_written(app: AsyncQueueTasks) -> None:
    stats = await app.broker.stats()
    assert (stats.ready_by_priority, stats.delayed) == ({}, 0)
    assert await app.storage.stats() == {}


def entry_points(app: AsyncQueueTasks) -> dict[str, Callable[..., Awaitable[Any]]]:
    """Each way the async app enqueues one call of ``add(1, 2)`` with ``**options``."""
    add = app.tasks["add"]
    return {
        "add_task": lambda **o: app.add_task("add", 1, 2, **o),
        "qtasks form": lambda **o: app.add_task(task_name="add", a=1, b=2, **o),
        "enqueue": lambda **o: app.enqueue("add", (1, 2), **o),
        "task.add_task": lambda **o: add.add_task(1, 2, **o),
        "task.enqueue": lambda **o: add.enqueue((1, 2), **o),
    }


async def refused_everywhere(app: AsyncQueueTasks, option: str, seconds: Any) -> None:
    """Every entry point refuses ``option=seconds`` as finite seconds >= 0 would, unwritten."""
    says = f"{option} expects finite seconds >= 0, got " + re.escape(reprlib.repr(seconds))
    for call in entry_points(app).values():
        with pytest.raises(TaskArgumentsError, match=f"^add_task: {says}"):
            await call(**{option: seconds})
        await assert_nothing_written(app)


@pytest.mark.parametrize("priority", BAD_PRIORITIES, ids=short)
async def test_a_bad_priority_is_refused_by_every_entry_point(priority: Any) -> None:
    app = app_with_add()
    async with app:
        for call in entry_points(app).values():
            with pytest.raises(TaskArgumentsError, match="add_task: priority expects an int"):
                await call(priority=priority)
            await assert_nothing_written(app)
        with pytest.raises(TaskArgumentsError, match=r"^add_tasks: priority expects an int"):
            await app.tasks["add"].add_tasks([(1, 2)], priority=priority)
        await assert_nothing_written(app)
        with pytest.raises(TaskDeclarationError, match="priority expects an int"):
            app.tasks["add"].s(1, 2).set(priority=priority)
        with pytest.raises(TaskDeclarationError, match="priority expects an int"):
            app.signature("add", (1, 2), priority=priority)
        with pytest.raises(TaskDeclarationError, match="option priority expects an int"):

            @app.task(priority=priority)
            def other() -> None: ...


@pytest.mark.parametrize("option", ["delay", "eta"])
@pytest.mark.parametrize("value", BAD_TIMES, ids=short)
async def test_a_bad_delay_or_eta_is_refused_by_every_entry_point(option: str, value: Any) -> None:
    app = app_with_add()
    async with app:
        for call in entry_points(app).values():
            with pytest.raises(TaskArgumentsError, match=f"add_task: {option} expects"):
                await call(**{option: value})
            await assert_nothing_written(app)
        if option == "delay":  # add_tasks takes no eta
            with pytest.raises(TaskArgumentsError, match=r"^add_tasks: delay expects"):
                await app.tasks["add"].add_tasks([(1, 2)], delay=value)
            await assert_nothing_written(app)


@pytest.mark.parametrize("timeout", [*BAD_TIMES, -1, -0.001], ids=short)
async def test_a_bad_timeout_is_refused_before_the_enqueue(timeout: Any) -> None:
    """``timeout`` was first used by the wait, once the task was stored and published: a bare
    ``TypeError`` (or ``TaskTimeoutError``) came after the side effect, and a caller retrying
    on it enqueued the task again (review r19 #10)."""
    app = app_with_add()
    async with app:
        await refused_everywhere(app, "timeout", timeout)
        # A float of seconds is still taken.
        assert (await app.add_task("add", 1, 2, timeout=5.0)).returning == 3


@pytest.mark.parametrize("delay", [-5, -0.001, -(10**300)], ids=short)
async def test_a_negative_delay_is_refused_as_a_signature_refuses_it(delay: Any) -> None:
    """A negative delay was taken by ``add_task`` as "due now", while a signature refused it:
    now every entry point refuses it, with the signature's words."""
    app = app_with_add()
    says = "delay expects finite seconds >= 0, got " + re.escape(reprlib.repr(delay))
    async with app:
        await refused_everywhere(app, "delay", delay)
        add = app.tasks["add"]
        with pytest.raises(TaskDeclarationError, match=f"^signature of 'add': {says}"):
            add.s(1, 2).set(delay=delay)
        # add_tasks' own option, refused as add_task's (it raised the signatures'
        # TaskDeclarationError, a sibling that an ``except TaskArgumentsError`` missed).
        with pytest.raises(TaskArgumentsError, match=f"^add_tasks: {says}"):
            await add.add_tasks([(1, 2), (3, 4)], delay=delay)
        await assert_nothing_written(app)
        # 0 is now, not refused.
        assert (await app.add_task("add", 1, 2, delay=0, timeout=5)).returning == 3


def test_the_sync_app_refuses_them_too() -> None:
    app = QueueTasks("checks")

    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    with app:
        for options in (
            {"priority": True},
            {"delay": float("nan")},
            {"delay": -5},
            {"eta": "tomorrow"},
            {"timeout": "5"},
            {"timeout": -1},
        ):
            with pytest.raises(TaskArgumentsError):
                app.add_task("add", 1, 2, **options)
            with pytest.raises(TaskArgumentsError):
                add.add_task(1, 2, **options)
        with pytest.raises(
            TaskArgumentsError, match=r"^add_tasks: delay expects finite seconds >= 0"
        ):
            add.add_tasks([(1, 2)], delay=-5)
        with pytest.raises(TaskArgumentsError, match=r"^add_tasks: priority expects an int"):
            add.add_tasks([(1, 2)], priority=True)
        assert app.portal.call(app.aio.storage.stats) == {}


async def test_the_priority_range_ends_and_an_int_enum_are_accepted() -> None:
    app = app_with_add()
    async with app:
        for priority in (2**63 - 1, -(2**63), Level.HIGH):
            task = await app.add_task("add", 1, 2, priority=priority, timeout=5)
            assert task.returning == 3
            assert type(task.priority) is int and task.priority == priority
        sig = app.tasks["add"].s(1, 2).set(priority=Level.HIGH)
        assert type(sig.priority) is int
        (bulk,) = await app.add_tasks([sig])
        assert (await bulk.wait_result(5)).priority == 1


@pytest.mark.parametrize("priority", [True, 1.5, 2**63])
def test_the_default_priority_follows_the_same_rule(priority: Any) -> None:
    with pytest.raises(ConfigError, match="'default_priority'"):
        QueueConfig(default_priority=priority)


BAD_NAMES = [5, None, b"add", 1.5, ("add",)]


@pytest.mark.parametrize("name", BAD_NAMES, ids=short)
async def test_a_task_name_that_is_not_a_str_is_refused_at_the_call(name: Any) -> None:
    """A name that is not a ``str`` was enqueued, and the worker then rejected the message as
    undecodable (review r11 #4); now every entry point refuses it, with QTasks' ``TypeError``."""
    from qtasks.workflows import Signature

    app = app_with_add()
    add = app.tasks["add"]
    says = "add_task: a task name must be a str, got " + re.escape(reprlib.repr(name))
    async with app:
        for where, call in (
            ("", lambda: app.add_task(name, 1, 2)),
            ("", lambda: app.enqueue(name, (1, 2))),
            ("", lambda: add.add_task(1, 2, task_name=name)),
            ("add_tasks item 0: ", lambda: app.add_tasks([Signature(name, (1, 2))])),
        ):
            with pytest.raises(TaskArgumentsError, match=f"^{where}{says}") as caught:
                await call()
            assert isinstance(caught.value, TypeError)
            await assert_nothing_written(app)


async def test_qtasks_echo_form_on_the_app_says_how_to_name_the_task() -> None:
    """``app.add_task(5, task_name="add")``: QTasks' app refused it (``task_name`` twice);
    it enqueued a task named ``5`` here, which failed in the worker."""
    app = app_with_add()
    says = (
        "add_task: the task is named twice, 1 (int) first and task_name='add'; the app takes "
        "the name first: add_task('add', 1, ...)"
    )
    async with app:
        with pytest.raises(TaskArgumentsError, match=re.escape(says)):
            await app.add_task(1, task_name="add", b=2)  # type: ignore[arg-type]  # refused: tested
        await assert_nothing_written(app)
    sync = QueueTasks("checks")

    @sync.task
    def add(a: int, b: int) -> int:
        return a + b

    with sync:
        refused: list[Callable[[], object]] = [
            lambda: sync.add_task(1, task_name="add", b=2),  # type: ignore[arg-type]  # tested
            lambda: sync.add_task(None, 1, 2),  # type: ignore[arg-type]  # the wrong type tested
            lambda: sync.enqueue(5, (1, 2)),  # type: ignore[arg-type]  # the wrong type tested
            lambda: add.add_task(1, 2, task_name=5),
        ]
        for call in refused:
            with pytest.raises(TaskArgumentsError, match=r"^add_task: "):
                call()
        assert sync.portal.call(sync.aio.storage.stats) == {}
        assert sync.add_task("add", 1, b=2, timeout=5).returning == 3


@pytest.mark.parametrize(
    ("args", "kwargs", "culprit"),
    [
        ((1, object()), {}, "argument args[1] cannot be encoded (object)"),
        ((1,), {"b": {1, 2}}, "argument kwargs['b'] cannot be encoded (set)"),
        ((b"raw", 2), {}, "argument args[0] cannot be encoded (bytes)"),
    ],
)
async def test_an_argument_that_cannot_be_encoded_is_named_with_its_task(
    args: tuple[Any, ...], kwargs: dict[str, Any], culprit: str
) -> None:
    """``add_task("send", user)`` with an object the serializer cannot store said only
    "cannot encode as JSON: Object of type User is not JSON serializable": not which task, nor
    which of its arguments (walk-through). Now the error names both, before anything is
    written."""
    app = app_with_add()
    with pytest.raises(SerializationError) as raised:
        await app.add_task("add", *args, **kwargs)
    assert str(raised.value).startswith(f"task 'add': {culprit}: cannot encode as JSON: ")
    await assert_nothing_written(app)


async def test_a_tasks_own_parameter_named_like_an_app_option_is_its_argument() -> None:
    """``cache.add_task("k", expires=10)`` of a task with its own ``expires`` parameter took
    the keyword as the app's option: the message expired in 10 s and the task ran with its
    default (``unique_key``, ``unique_for`` alike; walk-through). On the declaration, whose
    ``add_task`` passes those options on through its keywords, the task's own parameter
    wins; a task without one keeps the option (docs/flow-control.md)."""
    app = AsyncQueueTasks("own-names")

    @app.task
    async def cache(key: str, expires: int = 60, unique_key: str = "-") -> str:
        return f"{key} for {expires}s ({unique_key})"

    @app.task
    async def notify(user: int) -> int:
        return user

    async with app:
        done = await cache.add_task("k", expires=10, unique_key="u", timeout=5)
        assert done.returning == "k for 10s (u)"
        first = await notify.add_task(7, unique_key="receipt:7")
        again = await notify.add_task(7, unique_key="receipt:7")  # the option still works
        assert again.uuid == first.uuid


@pytest.mark.parametrize("option", ["delay", "eta"])
async def test_an_eta_or_delay_in_milliseconds_is_refused(option: str) -> None:
    """``eta=time.time() * 1000`` (or a delay that large) was taken and left to the worker;
    more than 100 years ahead is refused at the call, saying it looks like milliseconds."""
    app = app_with_add()
    async with app:
        now = app.clock()
        value = now * 1000 if option == "eta" else 200 * 365.25 * 86400
        says = f"{option} {re.escape(repr(value))} is [0-9,]+ years ahead, more than 100: it "
        says += "looks like milliseconds"
        for call in entry_points(app).values():
            with pytest.raises(TaskArgumentsError, match=f"^add_task: {says}"):
                await call(**{option: value})
            await assert_nothing_written(app)
        if option == "delay":  # add_tasks takes no eta
            with pytest.raises(TaskArgumentsError, match=f"^add_tasks: {says}"):
                await app.tasks["add"].add_tasks([(1, 2)], delay=value)
            await assert_nothing_written(app)
            # A workflow's steps are enqueued without add_task: their signatures refuse it.
            with pytest.raises(TaskDeclarationError, match=f"^signature of 'add': {says}"):
                app.tasks["add"].s(1, 2).set(delay=value)
        # 99 years ahead is still a time.
        far = 99 * 365.25 * 86400
        if option == "eta":
            task = await app.add_task("add", 1, 2, eta=now + far)
        else:
            task = await app.add_task("add", 1, 2, delay=far)
        assert task.status == "new"


async def test_an_envelope_with_an_eta_in_milliseconds_is_refused_for_every_broker() -> None:
    """``Broker.publish`` called directly was handed any eta: the check was add_task's. It is
    made where every envelope is made, so no broker gets one (nor a workflow's step)."""
    import time

    from qtasks.memory import MemoryBroker
    from qtasks.messages import Envelope

    value = time.time() * 1000
    says = f"^Envelope: eta {re.escape(repr(value))} is [0-9,]+ years ahead, more than 100: "
    says += r"it looks like milliseconds; eta takes a unix time in seconds \(time.time\(\)"
    with pytest.raises(TaskArgumentsError, match=says):
        Envelope("id-1", b"{}", 0, value)
    kept = Envelope("id-2", b"{}", 0, time.time() + 99 * 365.25 * 86400)  # 99 years: a time
    broker = MemoryBroker()
    app = AsyncQueueTasks(broker=broker)
    async with app:
        await broker.publish(kept)
        assert kept.eta is not None
        assert Envelope("id-3", b"{}") == Envelope("id-3", b"{}", 0, None)  # still a dataclass
