"""Calls that arrive while an app closes: they are refused with
:class:`ComponentNotStartedError`, or complete on the loop being closed, and never start a
second life of the app (a second event loop of the sync app) in the middle of the close."""

from __future__ import annotations

import anyio
import pytest

from qtasks import AsyncQueueTasks, QueueConfig, TaskStatus, hookimpl
from qtasks.errors import ComponentNotStartedError

WAIT = 10


@pytest.mark.anyio
async def test_an_enqueue_while_the_app_closes_is_refused_not_started_again() -> None:
    # The components were stopped (``_stack`` cleared) before the hooks and their own stops
    # awaited: an add_task meanwhile started the app again, components and all, in the
    # middle of its close.
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"]))
    stopping, go = anyio.Event(), anyio.Event()

    @app.task
    async def ok() -> int:
        return 1

    class Linger:
        @hookimpl
        async def qtasks_app_stopping(self) -> None:
            stopping.set()
            await go.wait()

    app.add_plugin(Linger())
    assert (await app.add_task("ok")).status is TaskStatus.NEW  # a first call starts it
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(app.aclose)
            await stopping.wait()
            try:
                with pytest.raises(ComponentNotStartedError, match="'QueueTasks' is closing"):
                    await app.add_task("ok")
                with pytest.raises(ComponentNotStartedError, match="is closing"):
                    await app.get("no-such-task")
            finally:
                go.set()  # the hook is shielded from the failure's cancel: let it end
    assert not app.started
    # Closed (the close returned): the next call starts it again, as documented.
    assert (await app.add_task("ok")).status is TaskStatus.NEW
    assert app.started
    stopping, go = anyio.Event(), anyio.Event()
    go.set()
    await app.aclose()
