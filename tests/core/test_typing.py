"""Typed for users: mypy (strict) accepts ``task.add_task(..., timeout=, delay=, priority=,
eta=)`` and a call that leaves out injected parameters (State, Depends), and still flags a
mistyped option, a mistyped ``enqueue``, a wrong record type and a mistyped direct call of the
task. An echo task's ``self.add_task`` takes QTasks' form too (``add_task(5, task_name="x")``)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

from mypy import api

SNIPPET = """
from typing import Annotated

from qtasks import AsyncQueueTasks, AsyncTask, Depends, QueueTasks, Task
from qtasks.context import AsyncTaskHandle, SyncTaskHandle
from qtasks.plugins import AsyncState, SyncState


class Counter(AsyncState):
    pass


class SyncCounter(SyncState):
    pass


def connect() -> str:
    return "conn"


app = AsyncQueueTasks()
sync_app = QueueTasks()


@app.task
async def plain(x: int, y: str = "a") -> int:
    return x


@app.task
async def with_state(x: int, state: Counter) -> int:
    return x


@app.task
async def with_depends(x: int, conn: Annotated[str, Depends(connect)]) -> int:
    return x


@sync_app.task
def sync_with_state(x: int, state: SyncCounter) -> int:
    return x


@app.task(echo=True)
async def parent(self: AsyncTaskHandle) -> None:
    child: AsyncTask = await self.add_task("plain", 1, timeout=5)
    await self.add_task(1, task_name="plain", priority=1)  # QTasks' form
    await self.add_task(1)  # E: no task name


@sync_app.task(echo=True)
def sync_parent(self: SyncTaskHandle) -> None:
    child: Task = self.add_task(1, task_name="sync_with_state", timeout=5)


async def produce() -> None:
    queued: AsyncTask = await plain.add_task(1, timeout=5)
    print(queued.uuid)
    await plain.add_task(1, y="b", priority=2, delay=0.5)
    await plain.add_task(1, eta=1700000000.0)
    await with_state.add_task(1)
    await with_state.add_task(x=1, timeout=5)
    await with_depends.add_task(1, priority=0)
    await plain.enqueue((1,), {"y": "b"}, timeout=5)
    record: Task = sync_with_state.add_task(1, timeout=5)
    print(record.uuid)
    await plain(1, "b")


async def wrong() -> None:
    await plain.add_task(1, timeout="soon")  # E: option
    await plain.enqueue((1,), priority="high")  # E: enqueue option
    sync_record: Task = await plain.add_task(1)  # E: the async app's record
    await plain("one")  # E: direct call
"""


def run_mypy(tmp_path: Path, source: str) -> tuple[str, int]:
    path = tmp_path / "user_code.py"
    path.write_text(textwrap.dedent(source))
    stdout, stderr, status = api.run(
        [
            "--strict",
            "--no-error-summary",
            "--show-error-codes",
            "--config-file",
            os.devnull,  # the snippet alone, not the workspace's files
            "--cache-dir",
            str(tmp_path / "mypy_cache"),
            str(path),
        ]
    )
    return stdout + stderr, status


def test_user_code_type_checks(tmp_path: Path) -> None:
    output, _ = run_mypy(tmp_path, SNIPPET)
    lines = SNIPPET.splitlines()
    flagged = {int(line.split(":")[1]) for line in output.splitlines() if ": error:" in line}
    expected = {i for i, line in enumerate(lines, start=1) if "# E:" in line}
    assert flagged == expected, output
    codes = ("[arg-type]", "[assignment]", "[call-overload]")
    assert sum(output.count(code) for code in codes) == len(expected), output
