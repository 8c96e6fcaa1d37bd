"""A failed task as the person running the worker sees it: logged (retries at INFO, the
final failure at ERROR, masked), and a record traceback that starts at the task's own code."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks.record import TaskRecord, TaskStatus

pytestmark = pytest.mark.anyio

SECRET = "redis://ops:hunter2@db.internal:6379/0"


def app_with_failures() -> AsyncQueueTasks:
    app = AsyncQueueTasks("failures", config=QueueConfig(plugins_disabled=["*"]))

    @app.task(retry=1, retry_backoff=0.01)
    def sync_fails(n: int) -> None:
        raise ValueError(f"cannot reach {SECRET} for {n}")

    @app.task
    async def async_fails() -> None:
        found: dict[str, int] = {}
        try:
            found["missing"]
        except KeyError as exc:
            raise RuntimeError("lookup failed") from exc

    @app.task
    async def group_fails() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(inner_fails)

    @app.task(max_time=0.05)
    async def too_slow() -> None:
        await app_sleep()

    return app


async def app_sleep() -> None:
    await anyio.sleep(5)


async def inner_fails() -> None:
    raise KeyError("the real cause")


@pytest.fixture(autouse=True)
def worker_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="qtasks.worker")


async def finals(app: AsyncQueueTasks, *calls: tuple[Any, ...]) -> list[TaskRecord]:
    """Serve ``app`` while each call (task name, then its arguments) runs to its end."""
    async with app:
        return [await app.add_task(name, *args, timeout=10) for name, *args in calls]


def failures_of(caplog: pytest.LogCaptureFixture, uuid: str) -> list[tuple[int, str]]:
    return [
        (r.levelno, r.getMessage())
        for r in caplog.records
        if r.name == "qtasks.worker" and uuid in r.getMessage()
    ]


async def test_a_retried_then_failed_sync_task_is_logged_masked_from_its_own_code(
    caplog: pytest.LogCaptureFixture,
) -> None:
    [final] = await finals(app_with_failures(), ("sync_fails", 7))
    assert final.status is TaskStatus.ERROR and final.attempt == 2
    said = failures_of(caplog, final.uuid)
    assert [level for level, _ in said] == [logging.INFO, logging.ERROR], said
    retry, failed = said[0][1], said[1][1]
    assert "task sync_fails" in retry and "failed on attempt 1, retrying in" in retry
    assert "ValueError: cannot reach redis://ops:***@db.internal:6379/0 for 7" in retry
    first, *frames = failed.splitlines()
    assert first.endswith(
        "failed: ValueError: cannot reach redis://ops:***@db.internal:6379/0 for 7"
    )
    assert frames[0].strip().startswith(f'File "{__file__}"') and "in sync_fails" in frames[0]
    assert any('raise ValueError(f"cannot reach {SECRET} for {n}")' in f for f in frames)
    assert "hunter2" not in retry + failed
    # The record's traceback: Python's format, from the task's frame on (no worker.py,
    # executor.py, threads.py nor anyio frame before it).
    assert final.traceback is not None
    lines = final.traceback.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[1].strip().startswith(f'File "{__file__}"'), lines[:3]
    assert "qtasks/executor.py" not in final.traceback and "anyio" not in final.traceback


async def test_a_chained_error_keeps_its_cause_and_an_error_of_qtasks_its_frames(
    caplog: pytest.LogCaptureFixture,
) -> None:
    chained, slow = await finals(app_with_failures(), ("async_fails",), ("too_slow",))
    assert chained.traceback is not None
    assert "KeyError: 'missing'" in chained.traceback
    assert "The above exception was the direct cause" in chained.traceback
    top = chained.traceback.split("The above exception was the direct cause")[1]
    assert top.splitlines()[3].strip().startswith(f'File "{__file__}"'), top
    [(level, failed)] = failures_of(caplog, chained.uuid)
    assert level == logging.ERROR
    assert "failed: RuntimeError: lookup failed (from KeyError: 'missing')" in failed
    assert "in async_fails" in failed and "qtasks/worker.py" not in failed
    # Raised by qtasks itself: the whole traceback stays in the record, the log line needs
    # no frames.
    assert slow.status is TaskStatus.ERROR and slow.traceback is not None
    assert "TaskMaxTimeError" in slow.traceback and "qtasks/executor.py" in slow.traceback
    [(level, failed)] = failures_of(caplog, slow.uuid)
    assert level == logging.ERROR and "\n" not in failed and "TaskMaxTimeError" in failed


async def test_an_exception_group_is_logged_with_the_errors_inside_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    [final] = await finals(app_with_failures(), ("group_fails",))
    [(level, failed)] = failures_of(caplog, final.uuid)
    first, *frames = failed.splitlines()
    assert level == logging.ERROR and "[KeyError: 'the real cause']" in first, failed
    assert "in inner_fails" in frames[0] and 'raise KeyError("the real cause")' in failed


class Unprintable(Exception):
    """An exception whose text cannot be had (a library's broken ``__str__``)."""

    def __str__(self) -> str:
        raise RuntimeError("no text")


async def test_an_exception_without_a_text_fails_its_task_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its record says so, as Python's traceback module does, on the first delivery: not
    handed back until the delivery limit dead-letters it with the ``__str__``'s error."""
    app = AsyncQueueTasks("unprintable", config=QueueConfig(plugins_disabled=["*"]))
    runs: list[int] = []

    @app.task
    async def unprintable() -> None:
        runs.append(1)
        raise Unprintable()

    [final] = await finals(app, ("unprintable",))
    assert final.status is TaskStatus.ERROR and runs == [1]
    assert final.error == "Unprintable: <exception str() failed>"
    assert final.traceback is not None and "in unprintable" in final.traceback
    [(level, failed)] = failures_of(caplog, final.uuid)
    assert level == logging.ERROR and "failed: Unprintable: <exception str() failed>" in failed


class NoCredentialsError(Exception):
    """As botocore's: a class whose name holds a secret noun."""


async def test_an_error_named_after_credentials_is_logged_with_its_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The worker's log line says why the task failed (it said ``NoCredentialsError: ***``:
    the class name was read as the name of a secret whose value followed)."""
    app = AsyncQueueTasks("credentials", config=QueueConfig(plugins_disabled=["*"]))

    @app.task
    async def upload() -> None:
        raise NoCredentialsError(f"Unable to locate credentials for {SECRET}")

    [final] = await finals(app, ("upload",))
    [(level, failed)] = failures_of(caplog, final.uuid)
    assert level == logging.ERROR
    shown = "NoCredentialsError: Unable to locate credentials for redis://ops:***@db.internal"
    assert f"failed: {shown}" in failed, failed
    assert "hunter2" not in failed
