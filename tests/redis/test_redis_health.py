"""The worker's health probe with the Redis broker: a network partition between the worker's
consumer and a real Redis (a fault proxy holding every byte) makes ``/livez`` and ``/readyz``
answer 503 once the consumer's claim is overdue past ``health_stall_limit`` (its own wait for
messages not counted), and 200 again once the partition heals (peers' goal G4: "alive but not
consuming"). A worker started before its Redis answers the probe while it waits: alive, not
ready."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import pytest
from faultproxy import FaultProxy
from health_probe import (
    assert_port_free,
    probe,
    probe_port,
    probed_app,
    serve_until_it_gives_up,
    until,
)
from redis_server import free_port

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks.errors import BrokerConnectionError
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

pytestmark = pytest.mark.anyio


def redis_on(port: int, db: str, prefix: str, **config: object) -> AsyncQueueTasks:
    """An app whose components are all on Redis at loopback ``port`` (``db``: the URL's
    path), its worker's probe on a free port, a task ``noop`` returning ``"done"``."""
    url = f"redis://127.0.0.1:{port}{db}"
    app = AsyncQueueTasks(
        broker=RedisBroker(url, prefix=prefix, queue="health"),
        storage=RedisStorage(url, prefix=prefix),
        global_config=RedisGlobalConfig(url, prefix=prefix),
        config=QueueConfig(health_port=0, shutdown_grace=1.0).merged(**config),
    )

    @app.task(name="noop")
    async def noop() -> str:
        return "done"

    return app


LIMIT = 2.5
"""The stall limit of the tests that only need one."""


@pytest.mark.parametrize(
    ("lease", "limit", "fault"),
    [(1.0, LIMIT, "blackhole"), (2.0, 1.0, "blackhole"), (2.0, 1.0, "reset")],
    ids=["limit-over-the-idle-wait", "limit-under-the-idle-wait", "connections-reset"],
)
async def test_a_partitioned_consumer_fails_the_probe_until_it_heals(
    redis_url: str, redis_prefix: str, lease: float, limit: float, fault: str
) -> None:
    """An idle claim blocks for the lease here (under 5 s): a wait asked for, not a stall, so
    a limit under it does not flap while the worker is idle and healthy, and a partition
    (or connections reset: claims that fail, retried) fails the probe all the same."""
    parts = urlsplit(redis_url)
    with FaultProxy((parts.hostname or "127.0.0.1", parts.port or 6379)) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}{parts.path}"
        app = probed_app(RedisBroker(url, prefix=redis_prefix, queue="health", lease=lease), limit)

        try:
            async with app:
                port = app.worker.health_port
                assert port is not None
                # Idle and healthy: each blocking claim is answered, over more than two.
                most = 0.0
                until_t = time.monotonic() + 2.25 * lease + 0.5
                while time.monotonic() < until_t:
                    code, body = await probe(port, "/livez")
                    assert code == 200, body
                    most = max(most, body["consume_stalled"])
                    await anyio.sleep(0.05)
                assert most < 0.5, most  # answered within its wait and the grace: 0
                proxy.set_mode(fault)
                body = await until(port, "/livez", 503, 20)
                assert body["status"] == "stalled" and body["consume_stalled"] > limit
                code, body = await probe(port, "/readyz")
                assert (code, body["status"]) == (503, "stalled")
                proxy.passthrough()
                body = await until(port, "/readyz", 200, 60)
                assert body["consume_stalled"] < limit
                record = await app.add_task("noop", timeout=30)
                assert record.returning == "done"
        finally:
            await app.aclose()


async def test_the_probe_answers_while_the_worker_waits_for_redis(
    redis_url: str, redis_prefix: str
) -> None:
    """Started before its Redis (nothing listens on its port), a worker served by ``serve``
    (as ``qtasks run``) answers: alive, not ready; ready once Redis is there (a proxy to
    the real server starts listening on that port)."""
    parts = urlsplit(redis_url)
    port = free_port()
    app = redis_on(port, parts.path, redis_prefix, start_timeout=60.0)
    proxy = FaultProxy((parts.hostname or "127.0.0.1", parts.port or 6379), ("127.0.0.1", port))
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(app.serve)
            probe_at = await probe_port(app, 10)
            for path, code in (("/livez", 200), ("/readyz", 503)):
                got, body = await probe(probe_at, path)
                assert (got, body["state"], body["status"]) == (code, "starting", "starting")
            assert not app.started
            proxy.start()
            body = await until(probe_at, "/readyz", 200, 20)  # the next attempt (<= 5 s)
            assert body["state"] == "serving" and body["consume_stalled"] < LIMIT
            record = await app.add_task("noop", timeout=30)
            assert record.returning == "done"
            app.stop()
    finally:
        proxy.close()
    assert_port_free(probe_at)


async def test_a_worker_that_gives_up_on_redis_closes_its_probe(redis_prefix: str) -> None:
    app = redis_on(free_port(), "/0", redis_prefix, start_timeout=1.0)
    port = await serve_until_it_gives_up(app, BrokerConnectionError, "cannot reach Redis")
    assert_port_free(port)


WORKER_APP = """
from qtasks import QueueConfig, QueueTasks

app = QueueTasks(config=QueueConfig(extra={"redis_prefix": PREFIX}))


@app.task
def noop() -> str:
    return "done"
"""


@pytest.mark.timeout(90)
async def test_qtasks_run_answers_the_probe_while_it_waits_for_redis(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """A real ``qtasks run --health-port`` process started before its Redis: its probe is
    answered (alive, not ready) from the first attempt on, ready once Redis is reachable."""
    parts = urlsplit(redis_url)
    redis_port, port = free_port(), free_port()
    url = f"redis://127.0.0.1:{redis_port}{parts.path}"  # nothing listens there yet
    (tmp_path / "tasks.py").write_text(WORKER_APP.replace("PREFIX", repr(redis_prefix)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    env["QTASKS_GLOBAL_CONFIG_URL"] = url
    argv = [sys.executable, "-m", "qtasks", "run", "-A", "tasks:app", "--log-level", "INFO"]
    argv += ["--broker", "redis", "--broker-url", url, "--storage", "redis"]
    argv += ["--storage-url", url, "--global-config", "redis"]
    argv += ["--health-port", str(port), "--start-timeout", "60"]
    proxy = FaultProxy(
        (parts.hostname or "127.0.0.1", parts.port or 6379), ("127.0.0.1", redis_port)
    )
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        proc = await anyio.open_process(
            argv, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        with anyio.fail_after(30):
            while True:
                try:
                    code, body = await probe(port, "/livez")
                    break
                except OSError:  # the process is still importing
                    assert proc.returncode is None, log.read_text()
                    await anyio.sleep(0.05)
        assert (code, body["state"]) == (200, "starting"), body
        assert (await probe(port, "/readyz"))[0] == 503
        assert "cannot start: cannot reach Redis" in log.read_text()  # it was waiting
        proxy.start()
        body = await until(port, "/readyz", 200, 20)
        assert body["state"] == "serving"
        proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            assert await proc.wait() == 0, log.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await proc.aclose()
        proxy.close()
    assert f"health probe on http://127.0.0.1:{port}" in log.read_text()
