"""The worker's health probe (``/livez``, ``/readyz``: qtasks.health) with the in-memory
components, asked over real TCP connections."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import pytest
from health_probe import (
    ask,
    assert_port_free,
    probe,
    probe_port,
    serve_until_it_gives_up,
    until,
)

from qtasks import AsyncQueueTasks, QueueConfig, hookimpl
from qtasks.components import ConsumeHealth, EarlyProbe
from qtasks.errors import ConfigError
from qtasks.memory import MemoryBroker

pytestmark = pytest.mark.anyio


class StallingBroker(MemoryBroker):
    """The in-memory broker, told how long its consumer has been stalled (the Redis and
    RabbitMQ tests stall a real one through a fault proxy)."""

    stalled = 0.0

    def consume_stalled(self) -> float:
        return self.stalled


class Unreachable(MemoryBroker):
    """The in-memory broker, whose start fails as a broker's does while its server cannot be
    reached (the Redis tests wait for a real one), until ``reachable`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.reachable = False
        self.attempts = 0

    async def start(self, stack: AsyncExitStack, config: QueueConfig) -> None:
        self.attempts += 1
        if not self.reachable:
            raise ConnectionError("cannot reach the broker's server (a test's)")
        await super().start(stack, config)


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


async def test_the_probe_answers_while_the_worker_waits_for_its_servers() -> None:
    """``serve`` (as ``run_forever`` and ``qtasks run``) listens before the components' start
    wait: alive (200) and not ready (503) while it waits, ready once they started; closed
    with the app."""
    broker = Unreachable()
    app = AsyncQueueTasks(
        broker=broker, config=QueueConfig(health_port=0, start_timeout=60.0, shutdown_grace=1.0)
    )
    assert isinstance(app.worker, EarlyProbe)
    async with anyio.create_task_group() as tg:
        tg.start_soon(app.serve)
        port = await probe_port(app, 10)
        with anyio.fail_after(10):
            while broker.attempts < 2:  # noqa: ASYNC110 - a failed start has no event
                await anyio.sleep(0.02)
        assert not app.started
        code, body = await probe(port, "/livez")
        assert (code, body["status"], body["state"]) == (200, "starting", "starting"), body
        assert body["consume_stalled"] == 0.0  # not asked before its start: none consumes
        code, body = await probe(port, "/readyz")
        assert (code, body["status"], body["state"]) == (503, "starting", "starting"), body
        broker.reachable = True
        body = await until(port, "/readyz", 200, 15)  # the next attempt, within its pause
        assert (body["state"], app.worker.health_port) == ("serving", port)
        app.stop()
    assert app.worker.health_port is None
    assert_port_free(port)


async def test_a_worker_that_gives_up_waiting_closes_its_probe() -> None:
    app = AsyncQueueTasks(broker=Unreachable(), config=QueueConfig(health_port=0, start_timeout=1))
    assert_port_free(await serve_until_it_gives_up(app, ConnectionError, "cannot reach"))


async def test_a_taken_port_fails_serve_before_the_wait() -> None:
    """A port taken is a configuration error: raised at once, not after ``start_timeout``."""
    broker = Unreachable()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = AsyncQueueTasks(
            broker=broker, config=QueueConfig(health_port=port, start_timeout=None)
        )
        with anyio.fail_after(10), pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
            await app.serve()
    assert broker.attempts == 0
