"""One replica for the Redis timer test: a worker process serving an app with one
every-second timer. Prints ``ready`` once serving and one JSON line per tick it enqueued.
:func:`build` makes the same app for a test's in-process replicas.

Usage: ``python redis_replica.py <redis url> <prefix>``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from qtasks import AsyncQueueTasks, QueueConfig, hookimpl
from qtasks.messages import Message
from qtasks.record import TaskRecord
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage
from qtasks_timer import AsyncTimer
from qtasks_timer.timer import HEADER


class Report:
    """Prints every tick this process enqueued (after the broker accepted it)."""

    def __init__(self) -> None:
        self.pending: dict[str, Any] = {}

    @hookimpl
    def qtasks_component_started(self, kind: str) -> None:
        if kind == "worker":
            print("ready", flush=True)

    @hookimpl(trylast=True)
    def qtasks_task_enqueue(self, message: Message) -> None:
        if HEADER in message.headers:
            self.pending[message.uuid] = message.headers[HEADER]

    @hookimpl
    def qtasks_task_enqueued(self, record: TaskRecord) -> None:
        info = self.pending.pop(record.uuid, None)
        if info is not None:
            print(json.dumps({"pid": os.getpid(), **info}), flush=True)


def build(
    url: str,
    prefix: str,
    *,
    clock: Callable[[], datetime] | None = None,
    claims: type[RedisGlobalConfig] = RedisGlobalConfig,
    **extra: Any,
) -> tuple[AsyncQueueTasks, AsyncTimer]:
    """The replica's app (everything on Redis at ``url``, ``extra`` its Redis options, its
    GlobalConfig a ``claims``) and its timer (on ``clock``, the wall clock's by default): task
    ``beat`` every second."""
    config = QueueConfig(
        broker_url=url,
        storage_url=url,
        global_config_url=url,
        extra={"redis_prefix": prefix, **extra},
        shutdown_grace=2.0,
    )
    app = AsyncQueueTasks(
        prefix,
        broker=RedisBroker.from_config(config),
        storage=RedisStorage.from_config(config),
        global_config=claims.from_config(config),
        config=config,
    )

    @app.task
    async def beat() -> None:
        return None

    timer = AsyncTimer(app) if clock is None else AsyncTimer(app, clock=clock)
    timer.add_task("beat", trigger=timedelta(seconds=1))
    return app, timer


def main(url: str, prefix: str) -> None:
    app, _ = build(url, prefix)
    app.add_plugin(Report())
    app.run_forever()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
