"""F9 of the reliability plan: a worker started before its Redis waits for it (one warning
per back-off step, the password masked), serves once the server is up, and stops promptly
while waiting; refused credentials and configuration errors fail at once; ``start_timeout``
bounds the wait; an attempt that got halfway (storage connected, broker not) leaves nothing
open."""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
import redis
from loopback_servers import (
    server_of_another_protocol,
    server_that_answers_in_plain_text,
    socket_that_never_answers,
    tls_server_with_an_untrusted_certificate,
)
from redis_procs import Worker, free_port, start_server
from redis_worker_app import build
from start_wait_logs import Caught

from qtasks import AsyncQueueTasks, QueueConfig, QueueTasks, TaskStatus, hookimpl
from qtasks.errors import BrokerConnectionError, ConfigError, CredentialsRefusedError
from qtasks.waiting import START_RETRY_CAP, START_RETRY_FIRST
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

pytestmark = pytest.mark.anyio

PASSWORD = "s3cret-start-pw"
WARNING = re.compile(r"WARNING qtasks: (\w+) (\w+) cannot start: (.*); trying again in")


def most_warnings(seconds: float) -> int:
    """The most warnings the back-off allows in ``seconds`` of waiting (one per attempt):
    pauses of at least 0.75 x 0.1, 0.2, 0.4... s up to the cap, plus the first attempt and
    one for an attempt under way."""
    least_first = 0.75 * START_RETRY_FIRST
    doubling = math.ceil(math.log2(seconds / least_first + 1))
    return 2 + doubling + math.ceil(seconds / (0.75 * START_RETRY_CAP))


def redis_app(url: str, **config: object) -> AsyncQueueTasks:
    return AsyncQueueTasks(
        broker=RedisBroker(url),
        storage=RedisStorage(url),
        global_config=RedisGlobalConfig(url),
        config=QueueConfig().merged(**config),
    )


async def wait_for(condition: Callable[[], bool], seconds: float) -> None:
    """Until ``condition()`` (a log line, a server's client count), failing at the deadline."""
    with anyio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110 - logs and a server's state, not an event
            await anyio.sleep(0.02)


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_worker_started_before_redis_waits_then_serves_within_5_s(
    prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_server(tmp_path, fsync="no", password=PASSWORD)
    server.kill()  # its port is known; nothing listens there until it starts again
    url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
    monkeypatch.setenv("QT_LOG_LEVEL", "INFO")
    began = time.monotonic()
    worker = Worker(url, prefix, tmp_path, concurrency=4)
    app = build(url, prefix)
    try:
        # The scenario: the broker comes up once the worker has tried three times (about
        # 0.3 s of back-off after its start; the plan says up to 10 s). Waited for, not
        # slept: a worker process slow to import on a loaded machine had printed nothing
        # after a fixed 3 s.
        await wait_for(
            lambda: len(WARNING.findall(worker.output())) >= 3 or worker.proc.poll() is not None,
            30,
        )
        assert worker.proc.poll() is None, worker.output()
        await anyio.to_thread.run_sync(server.start)
        up = time.monotonic()
        await app.start()
        tasks = [await app.add_task("noop", i) for i in range(5)]
        for i, task in enumerate(tasks):
            left = 5 - (time.monotonic() - up)
            done = await app.wait(task.uuid, timeout=max(left, 0.01))
            assert (done.status, done.returning) == (TaskStatus.SUCCESS, i * 2)
        assert time.monotonic() - up <= 5
        assert worker.proc.poll() is None, worker.output()
        out = worker.output()
        assert "components started after" in out, out
        warnings = WARNING.findall(out)
        waited = up - began + 5  # at most: the worker stopped trying once it started
        assert 3 <= len(warnings) <= most_warnings(waited), out
        for kind, cls, error in warnings:
            assert (kind, cls) == ("storage", "RedisStorage"), out
            assert error.startswith(f"cannot reach Redis at 127.0.0.1:{server.port} (db 0)")
        assert PASSWORD not in out
        assert worker.problems() == []
    finally:
        code = worker.stop()
        await app.aclose()
        server.close()
    assert code == 0, worker.output()


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_sigterm_while_waiting_ends_the_worker_within_a_second(
    prefix: str, tmp_path: Path
) -> None:
    worker = Worker(f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0", prefix, tmp_path)
    try:
        await wait_for(lambda: len(WARNING.findall(worker.output())) >= 4, 20)
        asked = time.monotonic()
        code = await anyio.to_thread.run_sync(worker.stop, 5)
        assert time.monotonic() - asked < 1.5, worker.output()
    finally:
        worker.kill() if worker.proc.poll() is None else None
    assert code == 0, worker.output()
    assert PASSWORD not in worker.output()
    assert worker.problems() == []


async def test_serve_waits_without_limit_and_a_stop_ends_the_wait(caught: Caught) -> None:
    app = redis_app(f"redis://user:{PASSWORD}@127.0.0.1:{free_port()}/0")
    async with anyio.create_task_group() as tg:
        tg.start_soon(app.serve)
        await wait_for(lambda: len(caught.attempts()) >= 5, 10)
        assert not app.started
        asked = time.monotonic()
        app.stop()
    assert time.monotonic() - asked < 1
    assert not app.started
    assert all(PASSWORD not in m for m in caught.messages)
    for message in caught.attempts():
        assert message.startswith("storage RedisStorage cannot start: cannot reach Redis")


async def test_stop_during_an_attempt_that_hangs_cancels_it(caught: Caught) -> None:
    """A host that accepts and never answers: the attempt would wait for the connect
    timeout (here 30 s); the stop ends it at once."""
    with socket_that_never_answers() as (port, connected):
        app = redis_app(f"redis://127.0.0.1:{port}/0", extra={"redis_connect_timeout": 30.0})
        async with anyio.create_task_group() as tg:
            tg.start_soon(app.serve)
            # The first attempt is under way: connected, waiting on the socket for a reply.
            assert await anyio.to_thread.run_sync(connected.wait, 5.0), "no connection came"
            assert caught.attempts() == []
            asked = time.monotonic()
            app.stop()
        assert time.monotonic() - asked < 1
        assert not app.started


async def test_start_timeout_gives_up_with_the_error(caught: Caught) -> None:
    app = redis_app(f"redis://127.0.0.1:{free_port()}/0", start_timeout=0.8)
    began = time.monotonic()
    with anyio.fail_after(5), pytest.raises(BrokerConnectionError, match="cannot reach Redis"):
        await app.serve()
    assert 0.8 <= time.monotonic() - began < 2
    assert 2 <= len(caught.attempts()) <= most_warnings(0.8)
    assert any("gave up waiting" in m for m in caught.messages)


async def test_start_timeout_0_fails_at_once_as_before(caught: Caught) -> None:
    app = redis_app(f"redis://127.0.0.1:{free_port()}/0", start_timeout=0)
    with anyio.fail_after(2), pytest.raises(BrokerConnectionError, match="cannot reach Redis"):
        await app.serve()
    assert caught.attempts() == []


async def test_refused_credentials_are_not_waited_on(tmp_path: Path, caught: Caught) -> None:
    server = start_server(tmp_path, fsync="no", password=PASSWORD)
    try:
        app = redis_app(f"redis://:wrong-{PASSWORD}@127.0.0.1:{server.port}/0")
        with anyio.fail_after(2), pytest.raises(CredentialsRefusedError) as info:
            await app.serve()
        assert "refused the credentials" in str(info.value)
        assert PASSWORD not in str(info.value)
        assert caught.attempts() == []
    finally:
        server.close()


async def test_a_database_the_server_refuses_is_not_waited_on(
    redis_url: str, caught: Caught
) -> None:
    """A database number past the server's (``databases 16``): an error reply while the
    connection is set up, not an outage; waiting would never mend it."""
    app = redis_app(redis_url.rsplit("/", 1)[0] + "/99")
    with anyio.fail_after(2), pytest.raises(CredentialsRefusedError) as info:
        await app.serve()
    assert "refused the connection's settings" in str(info.value)
    assert "DB index is out of range" in str(info.value)
    assert caught.attempts() == []


async def test_a_server_that_is_not_redis_is_not_waited_on(caught: Caught) -> None:
    """``redis://`` to RabbitMQ's port (a server of another protocol): its reply is not
    Redis's on any attempt, yet the worker waited for ever, each warning saying that it
    "cannot reach Redis" (``InvalidResponse``); failed at once now, saying what is wrong."""
    with server_of_another_protocol() as port:
        app = redis_app(f"redis://:{PASSWORD}@127.0.0.1:{port}/0")
        with anyio.fail_after(5), pytest.raises(CredentialsRefusedError) as info:
            await app.serve()
    message = str(info.value)
    assert message.startswith(
        f"the server at 127.0.0.1:{port} does not answer as Redis does (check the URL's host "
        "and port): InvalidResponse: "
    ), message
    assert PASSWORD not in message
    assert caught.attempts() == []


async def test_a_tls_certificate_that_does_not_verify_is_not_waited_on(caught: Caught) -> None:
    """``rediss://`` to a server whose certificate does not verify: the check fails the same
    way on every attempt, so the worker fails at once with an error that says so."""
    with tls_server_with_an_untrusted_certificate() as port:
        app = redis_app(f"rediss://:{PASSWORD}@127.0.0.1:{port}/0")
        with anyio.fail_after(5), pytest.raises(CredentialsRefusedError) as info:
            await app.serve()
    message = str(info.value)
    assert f"Redis at 127.0.0.1:{port}" in message and "TLS" in message, message
    assert "certificate verify failed" in message, message
    assert PASSWORD not in message
    assert caught.attempts() == []


async def test_a_tls_handshake_answered_in_plain_text_is_not_waited_on(caught: Caught) -> None:
    """``rediss://`` to a port that answers the handshake in plain text
    (``WRONG_VERSION_NUMBER``): no TLS there, on any attempt; failed at once."""
    with server_that_answers_in_plain_text() as port:
        app = redis_app(f"rediss://127.0.0.1:{port}/0")
        with anyio.fail_after(5), pytest.raises(CredentialsRefusedError) as info:
            await app.serve()
    message = str(info.value)
    assert f"TLS connection to Redis at 127.0.0.1:{port}" in message, message
    assert "WRONG_VERSION_NUMBER" in message, message
    assert caught.attempts() == []


async def test_rediss_to_a_server_without_tls_is_not_waited_on(
    tmp_path: Path, caught: Caught
) -> None:
    """``rediss://`` to a plain Redis: the server takes the TLS handshake for a command and
    never answers it, so the client's connect times out as for a server that is down. The
    server is up and answers without TLS: a URL to fix, not an outage to wait for (failed
    after one connect timeout, here 1 s)."""
    server = start_server(tmp_path, fsync="no", password=PASSWORD)
    try:
        app = redis_app(
            f"rediss://:{PASSWORD}@127.0.0.1:{server.port}/0",
            extra={"redis_connect_timeout": 1.0},
        )
        with anyio.fail_after(5), pytest.raises(CredentialsRefusedError) as info:
            await app.serve()
    finally:
        server.close()
    message = str(info.value)
    assert f"Redis at 127.0.0.1:{server.port}" in message, message
    assert "answers without TLS" in message, message
    assert PASSWORD not in message
    assert caught.attempts() == []


async def test_a_configuration_error_is_not_waited_on(caught: Caught) -> None:
    app = redis_app(f"redis://127.0.0.1:{free_port()}/0", extra={"redis_socket_timout": 1.0})
    with anyio.fail_after(2), pytest.raises(ConfigError, match="redis_socket_timout"):
        await app.serve()
    assert caught.attempts() == []


async def test_an_attempt_that_got_halfway_leaves_nothing_open(
    tmp_path: Path, caught: Caught
) -> None:
    """The storage and global config reach their server, the broker does not: each attempt
    closes what it opened before the next, so the reachable server sees no connection pile
    up (it has only the test's own once the wait is stopped)."""
    server = start_server(tmp_path, fsync="no")
    try:
        app = AsyncQueueTasks(
            broker=RedisBroker(f"redis://127.0.0.1:{free_port()}/0"),
            storage=RedisStorage(server.url),
            global_config=RedisGlobalConfig(server.url),
        )
        watcher = redis.Redis(port=server.port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(app.serve)
            await wait_for(lambda: len(caught.attempts()) >= 5, 10)
            app.stop()
        assert all(m.startswith("broker RedisBroker cannot start") for m in caught.attempts())

        def others() -> int:
            return len(watcher.client_list()) - 1  # without the watcher itself

        await wait_for(lambda: others() == 0, 2)
        watcher.close()
    finally:
        server.close()


def test_a_sync_app_run_forever_waits_too_and_stop_ends_it(caught: Caught) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    app = QueueTasks(
        broker=RedisBroker(url), storage=RedisStorage(url), global_config=RedisGlobalConfig(url)
    )
    serving = threading.Thread(target=app.run_forever)
    serving.start()
    try:
        deadline = time.monotonic() + 10
        while len(caught.attempts()) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(caught.attempts()) >= 4
        assert serving.is_alive()
        asked = time.monotonic()
        app.stop()
        serving.join(2)
        assert not serving.is_alive()
        assert time.monotonic() - asked < 1
    finally:
        app.stop()
        serving.join(5)
        app.close()


async def test_a_stop_requested_before_serving_still_starts_and_stops_at_once(
    redis_url: str,
) -> None:
    """The stop is kept for the next run (docs/tasks.md): with Redis up, it starts (the
    components' hooks fire) and stops, rather than being taken for a stop while waiting."""
    app = redis_app(redis_url)
    seen: list[str] = []

    class Watch:
        @hookimpl
        def qtasks_app_started(self, app: AsyncQueueTasks) -> None:
            seen.append("started")

    app.add_plugin(Watch(), "watch")
    app.stop()
    with anyio.fail_after(10):
        await app.serve()
    assert seen == ["started"]
    assert not app.started


async def test_the_app_is_configured_once_per_start_however_many_attempts(
    tmp_path: Path, caught: Caught
) -> None:
    """``qtasks_app_configured`` fires once per start, as ``qtasks_app_started`` does: not
    once per attempt while the worker waits for its Redis; a start after a stop fires it
    again."""
    server = start_server(tmp_path, fsync="no")
    server.kill()  # its port is known; nothing listens there until it starts again
    calls: list[str] = []

    class Lifecycle:
        @hookimpl
        def qtasks_app_configured(self) -> None:
            calls.append("configured")

        @hookimpl
        def qtasks_app_started(self) -> None:
            calls.append("started")

        @hookimpl
        def qtasks_app_stopped(self) -> None:
            calls.append("stopped")

    app = redis_app(f"redis://127.0.0.1:{server.port}/0", plugins_disabled=["*"])
    app.add_plugin(Lifecycle())
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(app.serve)
                await wait_for(lambda: len(caught.attempts()) >= 3, 10)
                assert calls == ["configured"]
                await anyio.to_thread.run_sync(server.start)
                await wait_for(lambda: app.started, 10)
                app.stop()
            assert calls == ["configured", "started", "stopped"]
            async with app:
                pass
        assert calls == ["configured", "started", "stopped"] * 2
    finally:
        server.close()
