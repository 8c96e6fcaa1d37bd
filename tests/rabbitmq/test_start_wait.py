"""F9 on RabbitMQ: a worker whose RabbitMQ is not up yet waits for it through the same core
path as on Redis (one warning per back-off step, the password masked) and a stop ends the
wait; refused credentials are not waited on."""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import AsyncExitStack
from urllib.parse import urlsplit

import anyio
import pytest
from faultproxy import FaultProxy
from loopback_servers import (
    server_that_answers_in_plain_text,
    tls_server_with_an_untrusted_certificate,
)
from start_wait_logs import Caught

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks.errors import CredentialsRefusedError
from qtasks_rabbitmq import RabbitMQBroker

from .conftest import URL, delete_topology, rabbitmqctl

pytestmark = pytest.mark.anyio

SECRET = "s3cret-amqp-pw"


def closed_port() -> int:
    """A loopback port nothing listens on (the shared RabbitMQ is left alone)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_a_worker_whose_rabbitmq_is_not_up_waits_one_warning_per_step(
    caught: Caught,
) -> None:
    app = AsyncQueueTasks(
        broker=RabbitMQBroker(f"amqp://guest:{SECRET}@127.0.0.1:{closed_port()}/")
    )
    began = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(app.serve)
        with anyio.fail_after(10):
            while len(caught.attempts()) < 5:  # noqa: ASYNC110 - log records of another task
                await anyio.sleep(0.02)
        waited = time.monotonic() - began
        assert not app.started
        asked = time.monotonic()
        app.stop()
    assert time.monotonic() - asked < 1
    # 0.1, 0.2, 0.4, 0.8 s (jittered down by at most a quarter) between the five: not a spin.
    assert waited >= 0.75 * (0.1 + 0.2 + 0.4 + 0.8)
    for message in caught.attempts():
        assert message.startswith("broker RabbitMQBroker cannot start: cannot connect to RabbitMQ")
        assert "guest:***@127.0.0.1" in message
    assert all(SECRET not in m for m in caught.messages)


async def test_refused_rabbitmq_credentials_are_not_waited_on(
    rabbitmq_url: str, caught: Caught
) -> None:
    url = rabbitmq_url.replace("guest:guest@", f"guest:{SECRET}@")
    app = AsyncQueueTasks(broker=RabbitMQBroker(url), config=QueueConfig())
    with anyio.fail_after(5), pytest.raises(CredentialsRefusedError) as info:
        await app.serve()
    assert SECRET not in str(info.value)
    # The server's reason is shown: the class name ProbableAuthenticationError is not the
    # name of a secret whose value follows (it was shown as "ProbableAuthenticationError: ***").
    assert "ProbableAuthenticationError: ACCESS_REFUSED" in str(info.value), info.value
    assert caught.attempts() == []


async def refused_at_once(url: str, caught: Caught) -> str:
    """The message of the :class:`CredentialsRefusedError` a worker serving ``url`` fails
    with, at once: no attempt waited on, the password not shown."""
    app = AsyncQueueTasks(broker=RabbitMQBroker(url), config=QueueConfig())
    with anyio.fail_after(10), pytest.raises(CredentialsRefusedError) as info:
        await app.serve()
    message = str(info.value)
    assert SECRET not in message
    assert caught.attempts() == []
    return message


async def test_a_tls_certificate_that_does_not_verify_is_not_waited_on(caught: Caught) -> None:
    """``amqps://`` to a server whose certificate does not verify: the check fails the same
    way on every attempt, so the worker fails at once saying so (it was waited on, one
    warning per attempt, as for a server that is down)."""
    with tls_server_with_an_untrusted_certificate() as port:
        message = await refused_at_once(f"amqps://guest:{SECRET}@127.0.0.1:{port}/", caught)
    assert "the TLS connection failed its checks" in message, message
    assert "certificate verify failed" in message, message


async def test_a_server_that_is_not_rabbitmq_is_not_waited_on(caught: Caught) -> None:
    """``amqp://`` to a port where another protocol's server answers the protocol header with
    its own bytes and closes (a protected-mode or full Redis says ``-DENIED``/``-ERR``, an
    HTTP server ``400``): the same answer comes on every attempt, yet the worker waited for
    ever, each warning saying it cannot connect ("Server connection unexpectedly closed");
    failed at once now, saying what is wrong, as redis:// to RabbitMQ's port does."""
    with server_that_answers_in_plain_text() as port:
        message = await refused_at_once(f"amqp://guest:{SECRET}@127.0.0.1:{port}/", caught)
    assert message == (
        "cannot connect to RabbitMQ at "
        f"amqp://guest:***@127.0.0.1:{port}/?heartbeat=30: the server there does not answer "
        "as RabbitMQ does (check the URL's host and port): it answered in another protocol "
        "and closed the connection"
    ), message


async def test_a_start_cancelled_after_connecting_closes_its_connection(
    rabbitmq_url: str, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop that cancels an attempt under way (qtasks.waiting) after the connection was
    made, while the topology is declared: the connection is closed, not left open with its
    heartbeats beside a worker that never started."""
    from contextlib import AsyncExitStack

    from qtasks_rabbitmq import link as link_module

    made: list[object] = []
    declaring = anyio.Event()

    async def hangs(connection: object, *args: object, **kwargs: object) -> None:
        made.append(connection)
        declaring.set()
        await anyio.sleep_forever()

    monkeypatch.setattr(link_module, "declare", hangs)
    broker = RabbitMQBroker(rabbitmq_url, queue=queue_name)
    async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
        tg.start_soon(broker.start, stack, QueueConfig())
        with anyio.fail_after(5):
            await declaring.wait()
        tg.cancel_scope.cancel()
    (connection,) = made
    assert connection.is_closed  # type: ignore[attr-defined]


@pytest.fixture
def user_without_access() -> Iterator[str]:
    """A RabbitMQ user with a password and no permission on any virtual host."""
    name = f"qtasks-test-{uuid.uuid4().hex[:10]}"
    rabbitmqctl("add_user", name, SECRET)
    try:
        yield name
    finally:
        rabbitmqctl("delete_user", name)


@pytest.mark.parametrize("vhost", ["", "qtasks-no-such-vhost"])
async def test_a_virtual_host_refused_or_missing_is_not_waited_on(
    rabbitmq_url: str, user_without_access: str, caught: Caught, vhost: str
) -> None:
    """RabbitMQ answers connection.open with connection.close (530 NOT_ALLOWED) for a virtual
    host the user may not use or that does not exist: refused at once, saying why."""
    if vhost:  # guest, who may use every virtual host that exists
        url = rabbitmq_url + vhost
    else:
        url = rabbitmq_url.replace("guest:guest@", f"{user_without_access}:{SECRET}@")
    app = AsyncQueueTasks(broker=RabbitMQBroker(url), config=QueueConfig())
    with anyio.fail_after(5), pytest.raises(CredentialsRefusedError) as info:
        await app.serve()
    says = f"vhost {vhost} not found" if vhost else "access to vhost '/' refused for user"
    assert f"connection.open refused: NOT_ALLOWED - {says}" in str(info.value)
    assert SECRET not in str(info.value)
    assert caught.attempts() == []


async def test_a_virtual_host_at_its_connection_limit_is_waited_on(
    rabbitmq_url: str, caught: Caught
) -> None:
    """Also a connection.close in answer to connection.open, but one that waiting may mend
    (other connections close, the limit is raised): waited on like an outage."""
    vhost = f"qtasks-test-{uuid.uuid4().hex[:10]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        rabbitmqctl("set_vhost_limits", "-p", vhost, '{"max-connections": 0}')
        app = AsyncQueueTasks(broker=RabbitMQBroker(rabbitmq_url + vhost))
        async with anyio.create_task_group() as tg:
            tg.start_soon(app.serve)
            with anyio.fail_after(10):
                while len(caught.attempts()) < 2:  # noqa: ASYNC110 - log records of another task
                    await anyio.sleep(0.02)
            assert not app.started
            app.stop()
        says = f"connection.open refused: NOT_ALLOWED - access to vhost '{vhost}' refused"
        assert says in caught.attempts()[0]
        assert "connection limit (0) is reached" in caught.attempts()[0]
    finally:
        rabbitmqctl("delete_vhost", vhost)


def aiormq_records(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str, bool]]:
    return [
        (r.levelno, r.getMessage(), r.exc_info is not None)
        for r in caplog.records
        if r.name.startswith("aiormq")
    ]


async def test_a_connection_that_cannot_be_made_or_is_lost_logs_once_per_attempt(
    caught: Caught, caplog: pytest.LogCaptureFixture, queue_name: str
) -> None:
    """aiormq logged each failed attempt again at ERROR (``error when creating transport``)
    beside the worker's warning, and a lost connection with a traceback at WARNING beside the
    link's "lost ... reconnecting": neither is shown now unless aiormq logs at DEBUG, and
    then as DEBUG."""
    for level in (logging.INFO, logging.DEBUG):
        caplog.clear()
        caplog.set_level(level, logger="aiormq")
        caught.messages.clear()
        app = AsyncQueueTasks(
            broker=RabbitMQBroker(f"amqp://guest:guest@127.0.0.1:{closed_port()}/")
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(app.serve)
            with anyio.fail_after(10):
                while len(caught.attempts()) < 2:  # noqa: ASYNC110 - log records of another task
                    await anyio.sleep(0.02)
            app.stop()
        failed = [r for r in aiormq_records(caplog) if "creating transport" in r[1]]
        if level == logging.INFO:
            assert failed == []
        else:
            assert failed and all(r[0] == logging.DEBUG for r in failed), failed

    caplog.clear()
    caplog.set_level(logging.INFO, logger="aiormq")
    server = urlsplit(URL)
    with FaultProxy((server.hostname or "127.0.0.1", server.port or 5672)) as proxy:
        broker = RabbitMQBroker(f"amqp://guest:guest@127.0.0.1:{proxy.port}/", queue=queue_name)
        try:
            async with AsyncExitStack() as stack:
                await broker.start(stack, QueueConfig())
                proxy.reset()
                with anyio.fail_after(10):
                    while not any("lost" in m for m in caught.messages):  # noqa: ASYNC110
                        await anyio.sleep(0.02)
                    proxy.passthrough()
                    while not any("restored" in m for m in caught.messages):  # noqa: ASYNC110
                        await anyio.sleep(0.02)
        finally:
            await delete_topology(queue_name)
    assert aiormq_records(caplog) == []
