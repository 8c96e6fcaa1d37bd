"""An app whose records stay in its own memory while its broker is shared with other processes.

``QueueTasks(broker=RabbitMQBroker(...))`` (QTasks' form: its brokers kept records in Redis by
default) leaves the app with the in-memory storage it makes itself. A worker in another process
runs the task and records it in *its* memory: the producer's wait could only time out (or,
with no timeout, never return). So waiting there raises :class:`~qtasks.errors.ConfigError`
at once, saying what to write, and a worker serving that way logs a warning when it starts.
An app that serves in the same process, or that was given a storage (even an in-memory one,
shared with another app of the process), is left alone.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from qtasks.errors import ConfigError, TaskTimeoutError

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks

log = logging.getLogger("qtasks")


def _records_stay_here(app: AsyncQueueTasks) -> bool:
    """The app made its own in-memory storage, and its broker is shared across processes."""
    return app.own_memory_storage and not getattr(app.broker, "local", False)


def _advice(app: AsyncQueueTasks) -> str:
    return (
        f"app {app.name!r} keeps its task records in this process's memory (no storage= was "
        f"given, and {type(app.broker).__name__} stores no records), while its broker is "
        "shared with other processes: a worker of another process records a task it runs in "
        "its own memory. Give the app a shared storage, e.g. "
        "storage=qtasks_redis.RedisStorage('redis://HOST:6379/0') (QTasks kept records in "
        "Redis by default)"
    )


def check_waitable(app: AsyncQueueTasks, doing: str) -> None:
    """Raise :class:`ConfigError` when waiting for a result here could only time out: the
    app records nothing of the tasks other processes run, and no worker serves in this
    process."""
    if _records_stay_here(app) and not app.serving:
        raise ConfigError(
            f"{doing}: {_advice(app)}, or run the worker in this process (async with app:, "
            "with app:, app.run_forever())"
        )


def warn_if_serving_alone(app: AsyncQueueTasks) -> None:
    """Log a warning when a worker starts serving tasks whose records nobody else can read."""
    if _records_stay_here(app):
        log.warning("%s; other processes cannot see the results of its tasks", _advice(app))


def explained(app: AsyncQueueTasks, exc: TaskTimeoutError) -> TaskTimeoutError:
    """``exc``, saying why when nothing could have run the task: the app's broker is one of
    this process's memory (the in-memory one) and nothing consumes it, as when a script waits
    for a result without ``with app:`` around it, which would only ever time out."""
    from qtasks.memory import MemoryBroker  # the memory package imports the app's modules

    broker = app.broker
    # Not a test harness's own TaskTimeoutError subclass, which says more.
    if type(exc) is TaskTimeoutError and isinstance(broker, MemoryBroker) and not broker.consumers:
        return TaskTimeoutError(
            exc.uuid,
            exc.timeout,
            f": no worker serves {type(broker).__name__} (process memory), so nothing ran "
            "it; serve in this process (with app:, async with app:, app.run_forever())",
            what=exc.what,
        )
    return exc
