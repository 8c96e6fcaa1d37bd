"""Connecting and the components' own keys: a server that refuses the credentials fails
``start()`` at once with a message that says so (and never quotes the password), the right ones
serve (a test-owned redis-server that requires a password); an unreachable URL fails at once; a
component shared by apps that start together connects once; the global config's index keeps no
expired names."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import pytest
from redis.exceptions import BusyLoadingError
from redis_procs import RedisServer, start_server

from qtasks import AsyncQueueTasks, QueueConfig, TaskStatus
from qtasks.errors import BrokerConnectionError, ComponentNotStartedError
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

pytestmark = pytest.mark.anyio

PASSWORD = "s3cret-pw"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    started = start_server(tmp_path, fsync="no", password=PASSWORD)
    yield started
    started.close()


def app_for(url: str) -> AsyncQueueTasks:
    app = AsyncQueueTasks(
        broker=RedisBroker(url),
        storage=RedisStorage(url),
        global_config=RedisGlobalConfig(url),
        # The default retry budget: refused credentials must not spend it.
        config=QueueConfig(max_tasks_process=2),
    )

    @app.task
    async def double(x: int) -> int:
        return x * 2

    return app


@pytest.mark.parametrize(
    "credentials", ["alice:s3cret-pw-typo@", ":wrong-s3cret-pw@", "", "nobody:s3cret-pw@"]
)
async def test_refused_credentials_fail_start_at_once_saying_so(
    server: RedisServer, credentials: str
) -> None:
    """Wrong password, missing password, unknown user: before, redis-py's retries (meant for
    outages) took 4-40 s to give up, and the message said "cannot reach"."""
    app = app_for(f"redis://{credentials}127.0.0.1:{server.port}/0")
    with anyio.fail_after(2), pytest.raises(BrokerConnectionError) as info:
        await app.start()
    text = str(info.value)
    assert text.startswith(f"Redis at 127.0.0.1:{server.port} (db 0) refused the credentials")
    assert "s3cret" not in text
    assert "s3cret" not in repr(info.value.__cause__) + repr(info.value.__context__)
    await app.aclose()


async def test_the_right_credentials_serve(server: RedisServer) -> None:
    app = app_for(f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0")
    async with app:
        done = await app.add_task("double", 21, timeout=5)
    assert (done.status, done.returning) == (TaskStatus.SUCCESS, 42)


async def test_an_unreachable_url_fails_start_at_once(tmp_path: Path) -> None:
    """Nothing listens on the port (a server that was there and is gone): the default retry
    budget is not spent at start either."""
    gone = start_server(tmp_path, fsync="no")
    gone.close()
    app = app_for(gone.url)
    with anyio.fail_after(2), pytest.raises(BrokerConnectionError) as info:
        await app.start()
    assert str(info.value).startswith(f"cannot reach Redis at 127.0.0.1:{gone.port} (db 0)")
    await app.aclose()


async def test_a_component_started_by_two_apps_at_once_connects_once(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two apps sharing one broker start together (``asyncio.gather``): before, both
    connected, the second client replaced the first, and the first was never closed (its
    connections stayed open after both apps stopped)."""
    from qtasks_redis import connection

    opened: list[object] = []
    real_connect = connection.connect

    async def counted(stack: AsyncExitStack, target: object, extra: dict[str, object]) -> object:
        client = await real_connect(stack, target, extra)  # type: ignore[arg-type]
        opened.append(client)
        return client

    monkeypatch.setattr(connection, "connect", counted)
    broker = RedisBroker(redis_url, prefix=prefix)
    first, second = AsyncExitStack(), AsyncExitStack()
    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.start, first, QueueConfig())
        tg.start_soon(broker.start, second, QueueConfig())
    assert len(opened) == 1
    await first.aclose()
    await broker.stats()  # the other app still uses it
    await second.aclose()
    with pytest.raises(ComponentNotStartedError):
        await broker.stats()


class Loading:
    """A stand-in server that answers ``PING`` with ``LOADING`` ``loading`` times (a Redis
    still loading its dataset after a restart), then ``PONG``; ``+OK`` to anything else."""

    def __init__(self, loading: int) -> None:
        self.loading = loading
        self.pings = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                if not line.startswith(b"*"):
                    continue
                parts = []
                for _ in range(int(line[1:])):
                    await reader.readline()  # $<length>
                    parts.append((await reader.readline()).strip().upper())
                if parts[:1] == [b"PING"]:
                    self.pings += 1
                    loading = self.pings <= self.loading
                    writer.write(b"-LOADING Redis is loading\r\n" if loading else b"+PONG\r\n")
                else:
                    writer.write(b"+OK\r\n")
                await writer.drain()
        finally:
            writer.close()


async def test_start_waits_for_a_server_still_loading_its_dataset() -> None:
    """Right after a restart Redis answers LOADING until its dataset is read: start() asks
    again (the probe fails at once only on what no wait mends), up to the connect timeout."""
    from qtasks_redis.connection import RedisTarget, _probe

    for loading, timeout, ready in ((3, 5.0, True), (10**6, 0.3, False)):
        server = Loading(loading)
        listener = await asyncio.start_server(server.serve, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        target = RedisTarget.parse(f"redis://127.0.0.1:{port}/0")
        try:
            with anyio.fail_after(5):
                if ready:
                    await _probe(target, {"redis_connect_timeout": timeout})
                    assert server.pings == loading + 1
                else:
                    started = time.monotonic()
                    with pytest.raises(BusyLoadingError):
                        await _probe(target, {"redis_connect_timeout": timeout})
                    assert time.monotonic() - started >= timeout
        finally:
            listener.close()


async def test_keys_set_with_a_ttl_leave_no_names_behind_in_the_index(
    redis_url: str, prefix: str
) -> None:
    """A timer claims one key per tick, with a TTL: each expired name left its entry in the
    namespace's index (pruned only by get_all), one per tick for ever. A set with a TTL now
    prunes what expired."""
    import redis.asyncio as aioredis

    from qtasks_redis import RedisGlobalConfig

    gc = RedisGlobalConfig(redis_url, prefix=prefix)
    async with AsyncExitStack() as stack:
        await gc.start(stack, QueueConfig())
        for tick in range(50):
            await gc.set("claims", f"tick-{tick}", 1, ttl=0.05)
        with anyio.fail_after(5):
            while await gc.get("claims", "tick-49") is not None:  # noqa: ASYNC110 - a TTL runs out
                await anyio.sleep(0.02)
        await gc.set("claims", "tick-50", 1, ttl=5)
        client = aioredis.from_url(redis_url)
        try:
            idx, _ = gc._names("claims")
            assert await client.zrange(idx, 0, -1) == [b"tick-50"]
        finally:
            await client.aclose()
