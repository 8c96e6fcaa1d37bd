"""The Redis components on a local 3-node Redis Cluster started by the test."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis
from redis_procs import unavailable

from qtasks import AsyncQueueTasks, QueueConfig, TaskStatus
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage
from qtasks_testing.contract import FlowControlContract, GlobalConfigFactory

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        unavailable("redis-server/redis-cli are not installed: cannot start a Redis Cluster")
    tmp = tmp_path_factory.mktemp("cluster")
    ports = [_cluster_port() for _ in range(3)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            node = tmp / str(port)
            node.mkdir()
            procs.append(
                subprocess.Popen(
                    [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node),
                     "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--save", "", "--appendonly", "no"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
        for port in ports:
            _wait_ping(port)
        created = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        if created.returncode != 0:
            unavailable(f"redis-cli --cluster create failed: {created.stdout[-300:]!r}")
        client = redis.Redis(port=ports[0])
        deadline = time.monotonic() + 20
        while client.cluster("info").get("cluster_state") != "ok":
            if time.monotonic() > deadline:
                unavailable("the local Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)  # the nodes are gossiping their slot assignment
        client.close()
        yield f"redis+cluster://127.0.0.1:{ports[0]}"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    while True:
        port = random.randint(20000, 40000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port


def _wait_ping(port: int) -> None:
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    unavailable(f"a cluster node on port {port} did not start")
                time.sleep(0.05)  # the server is starting
    finally:
        client.close()


async def test_enqueue_run_result_ack_on_cluster(cluster_url: str) -> None:
    app = AsyncQueueTasks(
        broker=RedisBroker(cluster_url, queue="cluster"),
        storage=RedisStorage(cluster_url),
        global_config=RedisGlobalConfig(cluster_url),
        config=QueueConfig(heartbeat_interval=0.5),
    )

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task
    async def count(n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield i

    async with app:
        # Record and queue live in different slots: the plain (two-call) path is used.
        assert app.shared_server is None
        done = await app.add_task("add", 2, 3, timeout=10)
        assert (done.status, done.returning) == (TaskStatus.SUCCESS, 5)
        tasks = [await app.add_task("add", i, i, priority=i % 3) for i in range(50)]
        for i, task in enumerate(tasks):
            assert (await app.wait(task.uuid, timeout=10)).returning == 2 * i
        gen = await app.add_task("count", 3)
        assert [s async for s in app.stream(gen.uuid, timeout=10)] == [0, 1, 2]
        stats = await app.broker.stats()
        assert (stats.in_flight, stats.ready_by_priority, stats.delayed) == (0, {}, 0)
        assert app.worker.id in await app.global_config.workers()
        await app.global_config.set("ns", "k", 1)
        assert await app.global_config.get_all("ns") == {"k": 1}
        await app.global_config.clear("ns")
        assert await app.global_config.get_all("ns") == {}


class TestClusterFlowControl(FlowControlContract):
    """Flow-control keys share one hash tag, so every script stays in one slot."""

    @pytest.fixture
    def global_config_factory(self, cluster_url: str) -> GlobalConfigFactory:
        return lambda config: RedisGlobalConfig(cluster_url, prefix="flow")


async def test_flow_control_on_cluster(cluster_url: str) -> None:
    app = AsyncQueueTasks(
        broker=RedisBroker(cluster_url, queue="cluster-flow"),
        storage=RedisStorage(cluster_url, prefix="flow"),
        global_config=RedisGlobalConfig(cluster_url, prefix="flow"),
    )

    @app.task(rate_limit="20/s", concurrency_key="k", max_concurrency=1)
    async def limited(k: str) -> str:
        return k

    async with app:
        tasks = [await app.add_task("limited", k=str(i % 2)) for i in range(6)]
        for task in tasks:
            assert (await app.wait(task.uuid, timeout=10)).status is TaskStatus.SUCCESS
        late = await app.add_task("limited", k="x", delay=0.2, expires=0.05)
        assert (await app.wait(late.uuid, timeout=10)).status is TaskStatus.EXPIRED
        first = await app.add_task("limited", k="y", unique_key="u", delay=5)
        again = await app.add_task("limited", k="y", unique_key="u")
        assert again.uuid == first.uuid
        assert (await app.storage.stats())["expired"] == 1
