"""The fast lane ends a consumer's block at its deadline with ``CLIENT UNBLOCK``
(:meth:`qtasks_redis.lane.Lane.block_then_script`): on time, only when the block ends at a
deadline, never through a connection to what may be another server, and not at all (logged
once) when the server's ACL refuses it."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest
import redis

from qtasks.config import QueueConfig
from qtasks.messages import Envelope
from qtasks_redis import RedisBroker, RedisTarget
from qtasks_redis.connection import Script
from qtasks_redis.lane import Lane, lane_for

pytestmark = pytest.mark.anyio

RETURN_1 = Script("return 1")


async def test_a_block_ends_at_its_time_not_at_the_servers_tick(lane: Lane, key: str) -> None:
    """``block_then_script`` ends the block itself when ``block`` has passed (Redis would end
    a blocking command's timeout only at its next ``hz`` tick): here the BLPOP's own timeout
    is 30 s, so only the lane's timer can end it. The connection is reused once the server
    answered that ``CLIENT UNBLOCK`` (it must not cut a later block short)."""
    script = Script("return redis.call('INCR', KEYS[1])")
    counter = f"{key}:n"
    salvaged: list[Any] = []
    try:
        with anyio.fail_after(5):
            reply = await lane.block_then_script(
                0.05, ("BLPOP", key, 30), script, [counter], [], orphan=salvaged.append
            )
            assert reply == 1
            while not lane._idle:  # noqa: ASYNC110 - the keep waits for the UNBLOCK reply
                await anyio.sleep(0.001)
        (conn,) = lane._idle
        assert conn.unblocking is None and conn.lost is None
        # Reused: woken by a push, not by a stale CLIENT UNBLOCK.
        async with anyio.create_task_group() as tg:

            async def push_when_blocked() -> None:
                with anyio.fail_after(5):
                    listed = ("CLIENT", "LIST", "ID", conn.client_id)
                    while b"cmd=blpop" not in await lane.command(*listed):  # noqa: ASYNC110
                        await anyio.sleep(0.001)  # the server's state, asked
                await lane.command("SET", counter, 10)
                await lane.command("RPUSH", key, "x")

            tg.start_soon(push_when_blocked)
            with anyio.fail_after(5):
                reply = await lane.block_then_script(
                    30, ("BLPOP", key, 30), script, [counter], [], orphan=salvaged.append
                )
        assert reply == 11
        assert lane._idle == [conn] and not salvaged
    finally:
        await lane.command("DEL", key, counter)


async def test_a_cold_lanes_first_block_ends_at_its_time(redis_url: str, key: str) -> None:
    """A lane whose first command is a block: the main connection (through which the timer's
    ``CLIENT UNBLOCK`` goes) is made before the blocking one, so that block too ends at its
    time (here the BLPOP's own timeout is 30 s)."""
    cold = lane_for(RedisTarget.parse(redis_url), {})
    assert cold is not None
    salvaged: list[Any] = []
    try:
        with anyio.fail_after(5):
            assert await cold.block_then_script(
                0.05, ("BLPOP", key, 30), RETURN_1, [], [], orphan=salvaged.append
            )
    finally:
        cold.close()
    assert not salvaged


async def test_a_block_that_is_not_exact_arms_no_timer(lane: Lane, key: str) -> None:
    """``exact=False`` (a bound that is not due at a moment, like the broker's idle safety
    wake): no timer and no ``CLIENT UNBLOCK``, the command's own timeout ends the block."""
    salvaged: list[Any] = []
    start = time.monotonic()
    with anyio.fail_after(5):
        reply = await lane.block_then_script(
            0.01, ("BLPOP", key, 0.3), RETURN_1, [], [], orphan=salvaged.append, exact=False
        )
    assert reply == 1 and not salvaged
    assert time.monotonic() - start >= 0.29, "the block was cut short"


async def test_the_broker_ends_only_a_deadline_on_time(
    redis_url: str, prefix: str, stack: AsyncExitStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle consumer's block up to the idle bound (nothing due) is not ``exact``; its block
    until a delayed message's eta is."""
    broker = RedisBroker(redis_url, prefix=prefix, queue="q", lease=1.0)
    await broker.start(stack, QueueConfig())
    lane = broker._require()
    assert isinstance(lane, Lane)
    blocks: list[bool] = []
    idle = anyio.Event()
    real = lane.block_then_script

    async def recording(*args: Any, exact: bool, **kwargs: Any) -> Any:
        blocks.append(exact)
        if not exact:
            idle.set()
        return await real(*args, exact=exact, **kwargs)

    monkeypatch.setattr(lane, "block_then_script", recording)

    async def publish_when_idle() -> None:
        await idle.wait()
        await broker.publish(Envelope("a", b"x", eta=time.time() + 0.2))

    with anyio.fail_after(5):
        async with broker.consume(prefetch=1) as it, anyio.create_task_group() as tg:
            tg.start_soon(publish_when_idle)
            delivery = await it.__anext__()
            assert delivery.id == "a"
            assert await delivery.ack()
    # Idle first (woken by the publish), then blocked until the eta.
    assert blocks[0] is False and blocks[-1] is True


async def test_no_unblock_goes_through_a_main_connection_newer_than_the_block(
    lane: Lane, key: str
) -> None:
    """Client ids are numbered per server: once the main connection was made again (after a
    failover behind the same address it may reach another server), no ``CLIENT UNBLOCK`` is
    sent through it for a block on an older connection (the command's own timeout ends the
    block), and that older connection is not reused."""
    salvaged: list[Any] = []
    await lane.command("RPUSH", key, "x")
    with anyio.fail_after(5):  # leaves a blocking connection made after the main one
        assert await lane.block_then_script(
            5, ("BLPOP", key, 5), RETURN_1, [], [], orphan=salvaged.append
        )
    (older,) = lane._idle

    async def remake_main() -> None:  # runs once the block below waits on ``older``
        assert lane._main is not None
        lane._main.close()
        await lane.check()

    start = time.monotonic()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(remake_main)
            assert await lane.block_then_script(
                0.5, ("BLPOP", key, 1), RETURN_1, [], [], orphan=salvaged.append
            )
    assert time.monotonic() - start >= 0.99, "a CLIENT UNBLOCK cut the block short"
    assert lane._idle == [older]
    # The next block takes a new connection, whose block the timer does end.
    with anyio.fail_after(5):
        assert await lane.block_then_script(
            0.05, ("BLPOP", key, 30), RETURN_1, [], [], orphan=salvaged.append
        )
    assert older.lost is not None and not salvaged


@pytest.fixture
def no_admin_url(redis_url: str) -> Iterator[str]:
    """A URL for a Redis user of this test's own without ``@dangerous`` (a common hardening,
    which takes ``CLIENT UNBLOCK``), deleted afterwards."""
    user, password = f"qt-test-noadmin-{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    admin = redis.Redis.from_url(redis_url)
    admin.acl_setuser(
        user,
        enabled=True,
        reset=True,
        passwords=[f"+{password}"],
        keys=["*"],
        channels=["*"],
        categories=["+@all", "-@dangerous"],
    )
    try:
        parts = urlsplit(redis_url)
        yield parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port}").geturl()
    finally:
        admin.acl_deluser(user)
        admin.close()


async def test_an_unblock_the_acl_refuses_keeps_the_connection(
    no_admin_url: str, key: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``NOPERM`` is an error reply: the server got the ``CLIENT UNBLOCK`` and will never act
    on it, so the blocking connection is kept (not one per block). The refusal is logged
    once, and later blocks arm no timer (their command's own timeout ends them)."""
    caplog.set_level(logging.WARNING, logger="qtasks.redis")
    made = lane_for(RedisTarget.parse(no_admin_url), {})
    assert made is not None
    opened = 0
    real_open = made._open

    async def counting_open(*, blocking: bool = False) -> Any:
        nonlocal opened
        opened += blocking
        return await real_open(blocking=blocking)

    monkeypatch.setattr(made, "_open", counting_open)
    salvaged: list[Any] = []
    try:
        await made.check()
        with anyio.fail_after(20):
            for _ in range(10):
                # The timer's UNBLOCK (at 10 ms) is refused long before the BLPOP's timeout.
                assert await made.block_then_script(
                    0.01, ("BLPOP", key, 0.2), RETURN_1, [], [], orphan=salvaged.append
                )
    finally:
        made.close()
    assert opened == 1 and not salvaged
    refused = [r for r in caplog.records if "CLIENT UNBLOCK refused" in r.getMessage()]
    assert len(refused) == 1
    assert refused[0].levelno == logging.WARNING
    assert "refused by the server's ACL" in refused[0].getMessage()
