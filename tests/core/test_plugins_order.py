"""The order of hooks for one task, recorded by a plugin in a real in-process worker.

The expected sequences here are the ones written in the ``qtasks.hookspecs`` module docstring.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest

from qtasks import AsyncQueueTasks, QueueConfig, TaskStatus, hookimpl, hookspecs

pytestmark = pytest.mark.anyio

# Hooks not about one task (periodic heartbeats, app lifecycle) stay out of the sequences.
NOT_PER_TASK = {
    "qtasks_app_configured",
    "qtasks_app_started",
    "qtasks_app_stopping",
    "qtasks_app_stopped",
    "qtasks_component_started",
    "qtasks_component_stopped",
    "qtasks_broker_listening",
    "qtasks_global_config_status",
    "qtasks_task_registered",
    "qtasks_inspect",
}
HOOK_NAMES = sorted(
    name for name in vars(hookspecs) if name.startswith("qtasks_") and name not in NOT_PER_TASK
)


class Recorder:
    """Implements every per-task hook (async where allowed) and records the calls."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.finished = 0
        self.changed = anyio.Event()

    def seen(self, hook: str) -> None:
        self.calls.append(hook)
        if hook == "qtasks_worker_execute_after":
            self.finished += 1
            self.changed.set()
            self.changed = anyio.Event()

    async def wait_finished(self, count: int) -> None:
        with anyio.fail_after(10):
            while self.finished < count:
                await self.changed.wait()


def _impl(hook: str) -> Callable[..., Any]:
    if hook == "qtasks_task_retry_delay":  # firstresult: sync only

        def sync_impl(self: Recorder) -> None:
            self.seen(hook)

        impl: Callable[..., Any] = sync_impl
    else:

        async def async_impl(self: Recorder) -> None:
            self.seen(hook)

        impl = async_impl
    impl.__name__ = hook
    return hookimpl(impl)


for _hook in HOOK_NAMES:
    setattr(Recorder, _hook, _impl(_hook))

ENQUEUE = ["qtasks_task_enqueue", "qtasks_storage_added", "qtasks_task_enqueued"]
RECEIVE_AND_START = [
    "qtasks_broker_message_received",
    "qtasks_worker_task_received",
    "qtasks_storage_saved",
    "qtasks_worker_execute_before",
    "qtasks_executor_middlewares",
    "qtasks_executor_args",
    "qtasks_executor_execute_before",
]
SUCCESS_END = [
    "qtasks_executor_result",
    "qtasks_executor_execute_after",
    "qtasks_executor_closed",
    "qtasks_storage_saved",
    "qtasks_broker_acked",
    "qtasks_task_succeeded",
    "qtasks_worker_execute_after",
]
ERROR_END = [
    "qtasks_executor_closed",
    "qtasks_executor_error",
    "qtasks_task_retry_delay",
    "qtasks_storage_saved",
    "qtasks_broker_acked",
    "qtasks_task_failed",
    "qtasks_worker_execute_after",
]


@pytest.fixture
async def app() -> AsyncIterator[AsyncQueueTasks]:
    # Entry-point plugins off: the sequences must only contain what this test registers.
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"], shutdown_grace=1.0))
    yield app
    await app.aclose()


async def test_success_order(app: AsyncQueueTasks) -> None:
    recorder = Recorder()
    app.add_plugin(recorder)

    @app.task
    async def ok() -> int:
        return 1

    async with app:
        task = await ok.add_task()
        await recorder.wait_finished(1)
    assert recorder.calls == [*ENQUEUE, *RECEIVE_AND_START, *SUCCESS_END]
    record = await app.get(task.uuid)
    assert record is not None
    assert record.status is TaskStatus.SUCCESS
    assert recorder.calls[-1] == "qtasks_storage_got"


async def test_error_order(app: AsyncQueueTasks) -> None:
    recorder = Recorder()
    app.add_plugin(recorder)

    @app.task
    async def boom() -> None:
        raise ValueError("boom")

    async with app:
        await boom.add_task()
        await recorder.wait_finished(1)
    assert recorder.calls == [*ENQUEUE, *RECEIVE_AND_START, *ERROR_END]


async def test_retry_order(app: AsyncQueueTasks) -> None:
    recorder = Recorder()
    app.add_plugin(recorder)
    attempts: list[int] = []

    @app.task(retry=1, retry_backoff=0)
    async def flaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise ValueError("first time")
        return "ok"

    async with app:
        task = await flaky.add_task()
        await recorder.wait_finished(2)
        final = await task.wait_result(timeout=5)
    assert (final.status, final.returning, final.attempt) == (TaskStatus.SUCCESS, "ok", 2)
    retry_end = [
        "qtasks_executor_closed",
        "qtasks_executor_error",
        "qtasks_task_retry_delay",
        "qtasks_worker_task_retry",
        "qtasks_broker_requeued",
        "qtasks_worker_execute_after",
    ]
    assert recorder.calls == [
        *ENQUEUE,
        *RECEIVE_AND_START,
        *retry_end,
        *RECEIVE_AND_START,
        *SUCCESS_END,
    ]


async def test_cancel_order(app: AsyncQueueTasks) -> None:
    recorder = Recorder()
    app.add_plugin(recorder)
    started = anyio.Event()

    @app.task
    async def waits() -> None:
        started.set()
        await anyio.sleep(30)

    async with app:
        task = await waits.add_task()
        with anyio.fail_after(5):
            await started.wait()
        await app.cancel(task.uuid, "enough")
        await recorder.wait_finished(1)
    calls = list(recorder.calls)
    record = await app.get(task.uuid)
    assert record is not None
    assert (record.status, record.cancel_reason) == (TaskStatus.CANCEL, "enough")
    assert calls == [
        *ENQUEUE,
        *RECEIVE_AND_START,
        "qtasks_executor_closed",
        "qtasks_storage_saved",
        "qtasks_broker_acked",
        "qtasks_task_cancelled",
        "qtasks_worker_execute_after",
    ]


async def test_timeout_order(app: AsyncQueueTasks) -> None:
    recorder = Recorder()
    app.add_plugin(recorder)

    @app.task(max_time=0.05)
    async def slow() -> None:
        await anyio.sleep(30)

    async with app:
        task = await slow.add_task()
        await recorder.wait_finished(1)
    calls = list(recorder.calls)
    record = await app.get(task.uuid)
    assert record is not None
    assert record.status is TaskStatus.ERROR
    assert "TaskMaxTimeError" in (record.error or "")
    assert calls == [
        *ENQUEUE,
        *RECEIVE_AND_START,
        "qtasks_task_timed_out",
        *ERROR_END,
    ]


async def test_app_lifecycle_order() -> None:
    calls: list[tuple[str, str]] = []

    class Lifecycle:
        @hookimpl
        def qtasks_app_configured(self) -> None:
            calls.append(("app_configured", ""))

        @hookimpl
        def qtasks_app_started(self) -> None:
            calls.append(("app_started", ""))

        @hookimpl
        async def qtasks_component_started(self, kind: str) -> None:
            calls.append(("started", kind))

        @hookimpl
        def qtasks_broker_listening(self) -> None:
            calls.append(("broker_listening", ""))

        @hookimpl
        def qtasks_component_stopped(self, kind: str) -> None:
            calls.append(("stopped", kind))

        @hookimpl
        def qtasks_app_stopping(self) -> None:
            calls.append(("app_stopping", ""))

        @hookimpl
        def qtasks_app_stopped(self) -> None:
            calls.append(("app_stopped", ""))

    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"]))
    app.add_plugin(Lifecycle())
    async with app:
        pass
    assert calls == [
        ("app_configured", ""),
        ("started", "storage"),
        ("started", "global_config"),
        ("started", "broker"),
        ("app_started", ""),
        ("broker_listening", ""),
        ("started", "worker"),
        ("stopped", "worker"),
        ("app_stopping", ""),
        ("stopped", "broker"),
        ("stopped", "global_config"),
        ("stopped", "storage"),
        ("app_stopped", ""),
    ]


async def test_expired_order(app: AsyncQueueTasks) -> None:
    recorder = Recorder()
    app.add_plugin(recorder)

    @app.task
    async def late() -> None: ...

    async with app:
        task = await late.add_task(delay=0.1, expires=0.05)
        assert (await app.wait(task.uuid, 5)).status is TaskStatus.EXPIRED
    assert recorder.calls[: len(ENQUEUE)] == ENQUEUE
    assert recorder.calls[len(ENQUEUE) :] == [
        "qtasks_broker_message_received",
        "qtasks_worker_task_received",
        "qtasks_storage_saved",
        "qtasks_broker_acked",
        "qtasks_task_expired",
    ]


async def test_held_by_flow_control_order(app: AsyncQueueTasks) -> None:
    recorder = Recorder()
    app.add_plugin(recorder)

    @app.task(rate_limit="2/s")
    async def limited() -> None: ...

    async with app:
        await limited.add_task()
        await recorder.wait_finished(1)
        recorder.calls.clear()
        await limited.add_task()  # its token is 500 ms away: held, then run
        await recorder.wait_finished(2)
    assert recorder.calls == [
        *ENQUEUE,
        "qtasks_broker_message_received",
        "qtasks_worker_task_received",
        "qtasks_broker_requeued",
        *RECEIVE_AND_START,
        *SUCCESS_END,
    ]
