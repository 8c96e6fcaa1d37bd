"""A new lane connection makes one round trip of its own before any caller's command goes out
on it (review r16 #1, #2): a full server's greeting is not taken for a command's reply, and a
server that accepted but does not answer never gets a retried command in its backlog."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis_procs import start_server

from qtasks_redis import RedisTarget
from qtasks_redis.connection import Script
from qtasks_redis.failures import outage
from qtasks_redis.lane import lane_for

pytestmark = pytest.mark.anyio


def _until(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    """Poll ``condition`` (a callable) until it is true, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


async def test_a_full_server_is_an_outage_not_the_reply_to_a_command(tmp_path: Path) -> None:
    """A server at maxclients writes ``-ERR max number of clients reached`` on accept and
    closes: the lane's call fails with ``ConnectionError`` (an outage the worker rides out),
    as redis-py's does, not with a ``ResponseError`` taken as the call's reply."""
    server = start_server(tmp_path)
    admin = redis.Redis(port=server.port)
    hogs: list[socket.socket] = []
    key = f"qt-full-{uuid.uuid4().hex[:8]}"
    lane = lane_for(RedisTarget.parse(server.url), {"redis_retries": 0})
    assert lane is not None
    try:
        admin.config_set("maxclients", 2)
        hogs.append(socket.create_connection(("127.0.0.1", server.port)))
        _until(lambda: len(admin.client_list()) == 2, "the server to be full")
        with anyio.fail_after(10), pytest.raises(RedisConnectionError) as caught:
            await lane.command("INCR", key)
        assert outage(caught.value)
        assert "max number of clients" in str(caught.value)
        for hog in hogs:
            hog.close()
        hogs.clear()
        _until(lambda: len(admin.client_list()) == 1, "a free slot")
        with anyio.fail_after(10):
            assert await lane.command("INCR", key) == 1
    finally:
        lane.close()
        for hog in hogs:
            hog.close()
        admin.close()
        server.close()


async def test_a_call_retried_against_a_stalled_server_runs_once(tmp_path: Path) -> None:
    """The server stops answering (SIGSTOP: the kernel still accepts connections): one INCR
    times out and is retried on new connections. Each new connection's handshake times out,
    so the INCR is never written on one: when the server resumes it runs once, not once per
    try (before, db 0 without a password sent nothing before the caller's command)."""
    server = start_server(tmp_path)
    assert server.proc is not None
    key = f"qt-stall-{uuid.uuid4().hex[:8]}"
    options = {
        "redis_socket_timeout": 0.5,
        "redis_connect_timeout": 0.5,
        "redis_retries": 3,
        "redis_retry_cap": 0.05,
    }
    lane = lane_for(RedisTarget.parse(server.url), options)
    assert lane is not None
    admin = redis.Redis(port=server.port)
    try:
        await lane.check()
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            with anyio.fail_after(30), pytest.raises(RedisTimeoutError):
                await lane.command("INCR", key)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        lane.close()
        # Every connection the lane made was queued before admin's: once admin has its reply,
        # the server accepted them all; once they are gone, it read each to its end.
        admin.ping()
        _until(lambda: len(admin.client_list()) == 1, "the lane's connections to be read")
        assert admin.get(key) == b"1"
    finally:
        lane.close()
        admin.close()
        server.close()


async def test_a_user_refused_client_id_blocks_without_an_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL user that may not run ``CLIENT ID`` (review r16 #5): the blocking calls work,
    their connections have no id (no ``CLIENT UNBLOCK``: a block ends by its own timeout),
    the refusal is logged once and ``CLIENT ID`` is not asked again (before, its
    ``NoPermissionError`` failed every blocking call: the consumer died, ``app.wait`` raised
    it)."""
    caplog.set_level(logging.WARNING, logger="qtasks.redis")
    server = start_server(tmp_path)
    admin = redis.Redis(port=server.port)
    admin.acl_setuser(
        "noid",
        enabled=True,
        reset=True,
        passwords=["+pw"],
        keys=["*"],
        channels=["*"],
        categories=["+@all"],
        commands=["-client|id"],
    )
    script = Script("return 1")
    key = f"qt-noid-{uuid.uuid4().hex[:8]}"
    lane = lane_for(RedisTarget.parse(f"redis://noid:pw@127.0.0.1:{server.port}/0"), {})
    assert lane is not None
    try:
        await lane.check()
        with anyio.fail_after(20):
            for _ in range(3):
                admin.rpush(key, "x")
                assert await lane.blocking(1, ("BLPOP", key, 1)) == [[key.encode(), b"x"]]
                assert (
                    await lane.block_then_script(
                        0.05, ("BLPOP", key, 0.1), script, [], [], orphan=print
                    )
                    == 1
                )
            async with anyio.create_task_group() as tg:  # three at once: two new connections
                for _ in range(3):
                    tg.start_soon(lane.blocking, 0.1, ("BLPOP", f"{key}:none", 0.1))
        assert len(lane._idle) == 3
        assert all(conn.client_id is None for conn in lane._idle)
        # Refused once; not asked on the blocking connections opened after.
        stats = admin.info("commandstats")["cmdstat_client|id"]
        assert stats["rejected_calls"] == 1
    finally:
        lane.close()
        admin.close()
        server.close()
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert [r.getMessage().split(" (")[0] for r in refused] == [
        "CLIENT ID refused by the server's ACL: delayed messages may start up to 1/hz late"
    ]
