"""Shared test helpers: record what timers enqueue, wait on conditions with deadlines."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import anyio

from qtasks import hookimpl
from qtasks.messages import Message
from qtasks.record import TaskRecord
from qtasks_timer.timer import HEADER


class Recorder:
    """A plugin that records every timer enqueue that reached the broker."""

    def __init__(self, name: str = "recorder") -> None:
        self.name = name
        self._pending: dict[str, dict[str, Any]] = {}
        self.enqueued: list[tuple[dict[str, Any], float, str]] = []

    @hookimpl(trylast=True)
    def qtasks_task_enqueue(self, message: Message) -> None:
        info = message.headers.get(HEADER)
        if info is not None:
            self._pending[message.uuid] = {**info, "task": message.task_name}

    @hookimpl
    def qtasks_task_enqueued(self, record: TaskRecord) -> None:
        info = self._pending.pop(record.uuid, None)
        if info is not None:
            self.enqueued.append((info, time.time(), record.uuid))

    def count(self, timer_id: str | None = None) -> int:
        return sum(1 for info, _, _ in self.enqueued if timer_id in (None, info["id"]))

    def ticks(self, timer_id: str | None = None) -> list[str]:
        return [info["tick"] for info, _, _ in self.enqueued if timer_id in (None, info["id"])]


async def wait_until(condition: Callable[[], bool], timeout: float, what: str = "") -> None:
    """Wait (checking every 10 ms) until ``condition()`` holds; fail after ``timeout``."""
    try:
        with anyio.fail_after(timeout):
            while not condition():  # noqa: ASYNC110 - a plain predicate, no event
                await anyio.sleep(0.01)
    except TimeoutError:
        message = f"timed out after {timeout} s waiting for {what or condition}"
        raise AssertionError(message) from None


def key_time(key: str) -> datetime:
    """The UTC instant of an interval tick key (``...Z``)."""
    return datetime.strptime(key, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
