"""QTasks' app-wide calls: ``app.ping()`` and ``app.flush_all()``."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from qtasks.errors import ComponentError, ComponentNotStartedError, QTasksError

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks

log = logging.getLogger("qtasks")
KINDS = ("broker", "storage", "global_config")


async def ping(app: AsyncQueueTasks, server: bool = True) -> bool:
    """``server=True``: whether a worker of ``app`` is alive (its heartbeat is in the
    GlobalConfig; QTasks checked its one "main" key). ``server=False``: whether the components
    answer. A component that cannot be reached gives ``False``, not an error. Fires
    ``qtasks_app_pinged``."""
    try:
        if not app.started:
            await app.start()
        workers = await app.global_config.workers()
        await app.broker.stats()
    except (QTasksError, OSError) as exc:
        log.warning("ping of app %r failed: %s", app.name, exc)
        alive = False
    else:
        alive = bool(workers) or not server
    await app.hooks.notify("qtasks_app_pinged", app=app, alive=alive)
    return alive


async def flush_all(app: AsyncQueueTasks) -> dict[str, int]:
    """Delete everything ``app``'s components hold: queued messages, dead letters, records,
    GlobalConfig values (only this app's queue and prefix on a shared server). Returns how many
    items (keys) each lost; fires ``qtasks_app_flushed``.

    Guarded: nothing in qtasks calls it (no setting or start-up path does); it refuses while
    ``app`` serves tasks, and raises :class:`~qtasks.errors.ComponentError` before deleting
    anything when a component cannot flush (naming it)."""
    if _serving(app):
        raise ComponentError(
            f"app {app.name!r} is serving tasks: flush_all would delete the messages and "
            "records of running tasks; stop the worker first"
        )
    if not app.started:
        await app.start()
    missing = [k for k in KINDS if not callable(getattr(getattr(app, k), "flush", None))]
    if missing:
        names = ", ".join(f"{k} {type(getattr(app, k)).__name__}" for k in missing)
        raise ComponentError(f"flush_all: cannot flush {names} (it has no flush method)")
    counts = {kind: int(await getattr(app, kind).flush()) for kind in KINDS}
    await app.hooks.notify("qtasks_app_flushed", app=app, counts=counts)
    return counts


def _serving(app: AsyncQueueTasks) -> bool:
    """Whether ``app`` serves tasks here (its ``task_group`` exists only then)."""
    try:
        app.task_group  # noqa: B018 - the property raises when not serving
    except ComponentNotStartedError:
        return False
    return True
