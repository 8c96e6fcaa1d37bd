"""qtasks.loop: the event loops qtasks makes time their waits to the microsecond (asyncio's
epoll waits are whole milliseconds, rounded up), and are only made where they should be."""

from __future__ import annotations

import asyncio
import select
import selectors
import socket
from collections.abc import Iterator
from typing import Any

import pytest

import qtasks.loop
from qtasks import AsyncQueueTasks, QueueConfig
from qtasks.loop import loop_options, new_event_loop
from qtasks.starter import SignalStarter

pytestmark = pytest.mark.skipif(
    not hasattr(selectors, "EpollSelector"), reason="epoll is Linux-only; elsewhere nothing changes"
)


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The timeouts given to select(), which still does the waiting."""
    seen: list[float] = []
    real = select.select

    def spy(r: Any, w: Any, x: Any, timeout: float) -> Any:
        seen.append(timeout)
        return real(r, w, x, timeout)

    monkeypatch.setattr(qtasks.loop.select, "select", spy)  # type: ignore[attr-defined]  # the module qtasks.loop imports
    return seen


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_a_timed_wait_is_not_rounded_to_milliseconds(
    waits: list[float], pair: tuple[socket.socket, socket.socket]
) -> None:
    selector = qtasks.loop.PreciseEpollSelector()
    try:
        selector.register(pair[0], selectors.EVENT_READ)
        assert selector.select(0.0032) == []  # nothing to read: waited out the timeout
        assert waits == [0.0032]  # as given, not epoll's ceil to 4 ms
        pair[1].send(b"x")
        [(key, events)] = selector.select(5.0)  # returns at once: the event is there
        assert (key.fileobj, events) == (pair[0], selectors.EVENT_READ)
        waits.clear()
        assert len(selector.select(0)) == 1  # polls: no select() wait
        assert waits == []
    finally:
        selector.close()


def test_the_loop_runs_timers_and_io(waits: list[float]) -> None:
    loop = new_event_loop()
    try:
        assert isinstance(loop._selector, qtasks.loop.PreciseEpollSelector)  # type: ignore[attr-defined]

        mine, theirs = socket.socketpair()

        async def main() -> bytes:
            await asyncio.sleep(0.003)
            reader, writer = await asyncio.open_connection(sock=mine)
            asyncio.get_running_loop().call_later(0.002, theirs.send, b"ok")
            try:
                return await reader.readexactly(2)
            finally:
                writer.close()
                theirs.close()

        assert loop.run_until_complete(main()) == b"ok"
        assert any(0 < t <= 0.003 for t in waits)  # the sleep was timed by select()
    finally:
        loop.close()


def test_loop_options() -> None:
    assert loop_options("asyncio") == {"loop_factory": new_event_loop}
    assert loop_options("trio") == {}

    def mine() -> asyncio.AbstractEventLoop:
        return asyncio.new_event_loop()

    assert loop_options("asyncio", mine) == {"loop_factory": mine}


def test_another_installed_policy_is_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    class Custom(asyncio.DefaultEventLoopPolicy):
        pass

    monkeypatch.setattr(asyncio, "get_event_loop_policy", Custom)
    assert loop_options("asyncio") == {}


def test_run_forever_runs_on_the_precise_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    async def serve(self: SignalStarter, app: AsyncQueueTasks) -> None:
        seen["selector"] = type(asyncio.get_running_loop()._selector)  # type: ignore[attr-defined]

    monkeypatch.setattr(SignalStarter, "serve", serve)
    AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"])).run_forever()
    assert seen["selector"] is qtasks.loop.PreciseEpollSelector
