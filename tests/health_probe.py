"""Asking a worker's health probe (:mod:`qtasks.health`) over a real TCP connection, as
Kubernetes does: one request, the answer read until the probe closes the connection."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio

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
