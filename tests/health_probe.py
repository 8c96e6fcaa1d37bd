"""Asking a worker's health probe (:mod:`qtasks.health`) over a real TCP connection, as
Kubernetes does: one request, the answer read until the probe closes the connection."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import anyio
import pytest

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks.components import Broker


async def ask(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as it is; the status code, the headers and the body of the answer."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request)
        data = b""
        with anyio.fail_after(10):
            while True:
                try:
                    data += await stream.receive()
                except anyio.EndOfStream:
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status.split()[1]), headers, body


async def probe(port: int, path: str, method: str = "GET") -> tuple[int, Any]:
    """``method path`` on the probe: the status code and the JSON body (``None`` if empty)."""
    code, _, body = await ask(port, f"{method} {path} HTTP/1.1\r\nHost: probe\r\n\r\n".encode())
    return code, json.loads(body) if body else None


async def until(port: int, path: str, code: int, within: float) -> Any:
    """Ask ``path`` until it answers ``code`` (each answer waited for, a short pause between
    asks); its JSON body. Fails with the last answer after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        got, body = await probe(port, path)
        if got == code:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} answered {got} {body}, not {code}, for {within:g} s")
        await anyio.sleep(0.05)


def probed_app(broker: Broker, stall_limit: float) -> AsyncQueueTasks:
    """An app on ``broker`` (its storage in memory) whose worker serves the probe on a free
    port (``app.worker.health_port`` while it serves), with a task ``noop`` returning
    ``"done"``."""
    app = AsyncQueueTasks(
        broker=broker,
        config=QueueConfig(health_port=0, health_stall_limit=stall_limit, shutdown_grace=1.0),
    )

    @app.task(name="noop")
    async def noop() -> str:
        return "done"

    return app


async def probe_port(app: AsyncQueueTasks, within: float) -> int:
    """The port of the probe of ``app``'s worker once it listens (``health_port`` 0 picks
    it), which ``app.serve()`` does before its components start; fails after ``within``."""
    with anyio.fail_after(within):
        while app.worker.health_port is None:  # noqa: ASYNC110 - set by the worker, no event
            await anyio.sleep(0.02)
    return app.worker.health_port


def assert_port_free(port: int) -> None:
    """Nothing listens on loopback ``port`` any more: a listener of our own binds it (with
    ``SO_REUSEADDR``, as the probe's own, so the closed probe's connections in TIME_WAIT do
    not count), and nobody else answered a connection before."""
    with socket.socket() as client:
        assert client.connect_ex(("127.0.0.1", port)) != 0, f"something listens on {port}"
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()


async def serve_until_it_gives_up(app: AsyncQueueTasks, error: type[Exception], match: str) -> int:
    """``app.serve()`` until it raises ``error`` (its message matching ``match``) as its
    ``start_timeout`` passes, its probe found alive meanwhile; the probe's port."""
    ports: list[int] = []

    async def watch() -> None:
        ports.append(await probe_port(app, 10))
        assert (await probe(ports[0], "/livez"))[0] == 200

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            with pytest.raises(error, match=match):
                await app.serve()
    assert app.worker.health_port is None
    return ports[0]
