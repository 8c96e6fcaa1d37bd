"""The worker's health probe (``/livez``, ``/readyz``: qtasks.health) with the in-memory
components, asked over real TCP connections."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from health_probe import ask, probe, until

from qtasks import AsyncQueueTasks, QueueConfig, hookimpl
from qtasks.components import ConsumeHealth
from qtasks.errors import ConfigError
from qtasks.memory import MemoryBroker

pytestmark = pytest.mark.anyio


class StallingBroker(MemoryBroker):
    """The in-memory broker, told how long its consumer has been stalled (the Redis and
    RabbitMQ tests stall a real one through a fault proxy)."""

    stalled = 0.0

    def consume_stalled(self) -> float:
        return self.stalled


class Served:
    """A serving app, its probe's port, and its ``hold`` task's events."""

    def __init__(self, app: AsyncQueueTasks) -> None:
        self.app = app
        self.started = anyio.Event()
        self.release = anyio.Event()
        self.port = 0


class Beats:
    """Sets ``stalled`` when a heartbeat says the consumer is stalled."""

    name = "beats"

    def __init__(self) -> None:
        self.stalled = anyio.Event()

    @hookimpl
    def qtasks_global_config_status(self, worker_id: str, info: dict[str, Any]) -> None:
        if info["consume_stalled"] == 2.5:
            self.stalled.set()


@asynccontextmanager
async def serving(**config: Any) -> AsyncIterator[Served]:
    broker = config.pop("broker", None)
    plugin = config.pop("plugin", None)
    app = AsyncQueueTasks(
        broker=broker,
        config=QueueConfig(health_port=0, heartbeat_interval=0.2, **config),
    )
    if plugin is not None:
        app.add_plugin(plugin)
    served = Served(app)

    @app.task(name="hold")
    async def hold() -> None:
        served.started.set()
        await served.release.wait()

    try:
        async with app:
            assert app.worker.health_port is not None
            served.port = app.worker.health_port
            try:
                yield served
            finally:
                served.release.set()  # before the worker's stop waits for it
        assert app.worker.health_port is None  # closed with the worker's run
    finally:
        await app.aclose()


async def test_a_serving_worker_is_live_and_ready() -> None:
    async with serving() as served:
        app, port = served.app, served.port
        for path in ("/livez", "/readyz"):
            code, body = await probe(port, path)
            assert code == 200, body
            assert body == {
                "status": "ok",
                "state": "serving",
                "consume_stalled": 0.0,
                "stall_limit": 60.0,
                "running": 0,
                "waiting": 0,
                "worker": app.worker.id,
            }
        code, headers, raw = await ask(port, b"HEAD /readyz HTTP/1.1\r\n\r\n")
        assert (code, raw) == (200, b"")
        assert headers["Content-Type"] == "application/json"
        assert headers["Cache-Control"] == "no-store"
        code, body = await probe(port, "/livez?verbose=1")  # a query is ignored
        assert code == 200
        record = await app.add_task("hold")
        await served.started.wait()
        code, body = await probe(port, "/readyz")
        assert (code, body["running"]) == (200, 1), record


async def test_the_probe_is_served_by_qtasks_run_options() -> None:
    """``health_port`` 0 picks a free port; a port taken fails the worker's start, saying
    which setting and address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        app = AsyncQueueTasks(config=QueueConfig(health_port=taken.getsockname()[1]))
        with pytest.raises(ConfigError, match=r"health_port: cannot listen on 127\.0\.0\.1:\d+"):
            async with app:
                pass
        await app.aclose()
    bads: tuple[Any, ...] = (-1, 65536, "8080", True)
    for bad in bads:
        with pytest.raises(ConfigError, match="health_port"):
            QueueConfig(health_port=bad)
    for bad_limit in (0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="health_stall_limit"):
            QueueConfig(health_stall_limit=bad_limit)


async def test_a_stalled_consumer_fails_both_probes_and_shows_in_the_heartbeat() -> None:
    broker = StallingBroker()
    assert isinstance(broker, ConsumeHealth)
    beats = Beats()
    async with serving(broker=broker, health_stall_limit=2.0, plugin=beats) as served:
        app, port = served.app, served.port
        broker.stalled = 1.5  # trying, within the limit
        code, body = await probe(port, "/livez")
        assert (code, body["status"], body["consume_stalled"]) == (200, "ok", 1.5)
        broker.stalled = 2.5
        for path in ("/livez", "/readyz"):
            code, body = await probe(port, path)
            assert code == 503, (path, body)
            assert body["status"] == "stalled"
            assert body["consume_stalled"] == 2.5
            assert body["stall_limit"] == 2.0
        with anyio.fail_after(10):
            await beats.stalled.wait()  # the next heartbeat says so
        workers = await app.global_config.workers()
        assert workers[app.worker.id]["consume_stalled"] == 2.5
        broker.stalled = 0.0
        assert (await probe(port, "/livez"))[0] == 200


async def test_a_stopping_worker_is_live_and_not_ready() -> None:
    async with serving(shutdown_grace=30.0) as served:
        app, port = served.app, served.port
        await app.add_task("hold")
        await served.started.wait()
        app.worker.stop()  # a SIGTERM: the running task gets its grace
        body = await until(port, "/readyz", 503, 10)
        assert (body["status"], body["state"], body["running"]) == ("stopping", "stopping", 1)
        code, body = await probe(port, "/livez")
        assert (code, body["state"]) == (200, "stopping")


async def test_bad_requests_get_an_answer_and_the_probe_goes_on() -> None:
    async with serving() as served:
        port = served.port
        code, body = await probe(port, "/nope")
        assert code == 404 and "/livez" in body["error"]
        code, headers, _ = await ask(port, b"POST /livez HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert (code, headers["Allow"]) == (405, "GET, HEAD")
        assert (await ask(port, b"hello there\r\n\r\n"))[0] == 400
        assert (await ask(port, b"\r\n\r\n"))[0] == 400
        assert (await ask(port, b"GET /livez HTTP/2\r\n\r\n"))[0] == 400
        assert (await ask(port, b"GET /livez HTTP/1.1\r\nX: " + b"a" * 9000))[0] == 431
        # A client that connects and says nothing holds its own connection only.
        async with await anyio.connect_tcp("127.0.0.1", port) as silent:
            assert (await probe(port, "/livez"))[0] == 200
            await silent.send(b"GET /li")
            assert (await probe(port, "/readyz"))[0] == 200
        async with await anyio.connect_tcp("127.0.0.1", port):
            pass  # a connection closed before a request
        assert (await probe(port, "/livez"))[0] == 200


async def test_a_failing_broker_check_answers_500_and_the_worker_serves_on() -> None:
    class Broken(MemoryBroker):
        def consume_stalled(self) -> float:
            raise RuntimeError("bug in a broker")

    async with serving(broker=Broken()) as served:
        app, port = served.app, served.port
        code, body = await probe(port, "/livez")
        assert code == 500 and "failed" in body["error"]
        assert (await probe(port, "/nope"))[0] == 404
        served.release.set()
        assert (await app.add_task("hold", timeout=10)).status.value == "success"


async def test_without_health_port_nothing_is_served() -> None:
    app = AsyncQueueTasks()
    async with app:
        assert app.worker.health_port is None
    await app.aclose()
