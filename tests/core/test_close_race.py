"""Calls that arrive while an app closes: they are refused with
:class:`ComponentNotStartedError`, or complete on the loop being closed, and never start a
second life of the app (a second event loop of the sync app) in the middle of the close."""

from __future__ import annotations

import threading

import anyio
import anyio.to_thread
import pytest

from qtasks import AsyncQueueTasks, QueueConfig, QueueTasks, TaskStatus, hookimpl
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


def test_a_call_from_another_thread_while_close_stops_the_portal_is_refused() -> None:
    # close() cleared the portal before stopping it: a call from another thread meanwhile
    # made a second portal, a second event loop, and started the app there while the first
    # one was still being closed.
    app = QueueTasks()
    stopping, go = threading.Event(), threading.Event()

    @app.task
    def ok() -> int:
        return 1

    async def lingering() -> None:
        # Cancelled by close()'s stop of the portal, after the app's aclose(): it holds the
        # stop (the old loop) until the test has made its call.
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                stopping.set()
                await anyio.to_thread.run_sync(go.wait, WAIT)

    assert app.add_task("ok").status is TaskStatus.NEW  # a first call starts it
    app.portal.start_task_soon(lingering)
    closer = threading.Thread(target=app.close, name="closer")
    closer.start()
    try:
        assert stopping.wait(WAIT)
        with pytest.raises(ComponentNotStartedError, match="is closing"):
            app.add_task("ok")
        with pytest.raises(ComponentNotStartedError, match="is closing"):
            app.get("no-such-task")
        portals = [t for t in threading.enumerate() if t.name == "qtasks-portal"]
        assert len(portals) == 1  # the old loop's only
        # A second close meanwhile returns once the first one has stopped the loop.
        after_second: list[bool] = []

        def close_again() -> None:
            app.close()
            after_second.append(portals[0].is_alive())

        second = threading.Thread(target=close_again, name="second closer")
        second.start()
    finally:
        go.set()
    closer.join(WAIT)
    second.join(WAIT)
    assert not closer.is_alive() and not second.is_alive()
    assert after_second == [False]
    assert not portals[0].is_alive()
    # Closed (close() returned): the next call starts it again, in a new portal.
    with app:
        assert app.add_task("ok", timeout=WAIT).returning == 1
    app.close()
