"""The fast lane (qtasks_redis.lane): pipelined commands, blocking calls, salvaged replies,
timeouts, and the pure-Python reply parser."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio
from fault_fixtures import FaultRig
from redis.exceptions import AuthenticationError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis_procs import start_server

from qtasks.config import QueueConfig
from qtasks.messages import Envelope
from qtasks_redis import RedisBroker, RedisTarget
from qtasks_redis.connection import Script
from qtasks_redis.lane import Lane, PyReader, lane_for, pack

pytestmark = pytest.mark.anyio


def test_lane_for_plain_and_tls_targets_without_other_options() -> None:
    assert lane_for(RedisTarget.parse("redis://127.0.0.1:6379/3"), {}) is not None
    assert lane_for(RedisTarget.parse("unix:///tmp/redis.sock?db=2"), {}) is not None
    # TLS (tests/redis/test_redis_tls.py serves through it), with redis-py's ssl_* options;
    # a context redis-py cannot make (no such CA file) is left to redis-py, which says why.
    assert lane_for(RedisTarget.parse("rediss://127.0.0.1:6379/0"), {}) is not None
    assert lane_for(RedisTarget.parse("rediss://h:6379/0?ssl_cert_reqs=none"), {}) is not None
    assert lane_for(RedisTarget.parse("rediss://h:6379/0?ssl_ca_certs=/no/such.pem"), {}) is None
    assert lane_for(RedisTarget.parse("rediss://h:6379/0?socket_timeout=3"), {}) is None
    assert lane_for(RedisTarget.parse("redis+cluster://127.0.0.1:7000"), {}) is None
    assert lane_for(RedisTarget.parse("redis://h:6379/0?ssl_cert_reqs=none"), {}) is None
    assert lane_for(RedisTarget.parse("redis://h:6379/0"), {"redis_fast_lane": False}) is None


async def test_concurrent_commands_share_one_connection(lane: Lane, key: str) -> None:
    try:
        replies: list[Any] = [None] * 200

        async def incr(i: int) -> None:
            replies[i] = await lane.command("INCR", key)

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(incr, i)
        # Each caller got its own reply (matched in order), and all 200 ran.
        assert sorted(replies) == list(range(1, 201))
        assert await lane.command("GET", key) == b"200"
        clients = await lane.command("CLIENT", "LIST")
        assert isinstance(clients, bytes)
    finally:
        await lane.command("DEL", key)


async def test_an_idle_callers_request_is_written_at_once(lane: Lane, key: str) -> None:
    """The first request of a turn of the loop goes out in the call (a turn sooner than
    waiting for the turn's end); those that follow in the same turn are joined and leave
    together in one write."""
    conn = await lane._connection()
    transport = conn._transport
    assert transport is not None
    writes: list[bytes] = []
    write = transport.write

    def recording(data: Any) -> None:
        writes.append(bytes(data))
        write(data)

    transport.write = recording  # type: ignore[method-assign]
    try:
        first = conn.send_one(pack(("INCR", key)))
        assert len(writes) == 1  # before any await
        rest = [conn.send_one(pack(("INCR", key))) for _ in range(3)]
        assert len(writes) == 1
        assert [await f for f in (first, *rest)] == [1, 2, 3, 4]
        assert len(writes) == 2 and writes[1] == pack(("INCR", key)) * 3
        # A later turn: at once again.
        last = conn.send_one(pack(("INCR", key)))
        assert len(writes) == 3
        assert await last == 5
    finally:
        transport.write = write  # type: ignore[method-assign]
        await lane.command("DEL", key)


async def test_errors_are_redis_py_classes(lane: Lane, key: str) -> None:
    await lane.command("SET", key, "text")
    try:
        with pytest.raises(ResponseError):
            await lane.command("INCR", key)
        with pytest.raises(NoScriptError):
            await lane.command("EVALSHA", "0" * 40, 0)
        # The connection is still in step after error replies.
        assert await lane.command("GET", key) == b"text"
        # A script unknown to the server is loaded by EVAL.
        script = Script(f"return '{uuid.uuid4().hex}' .. KEYS[1]")
        assert (await lane.script(script, ["k"], [])).endswith(b"k")
    finally:
        await lane.command("DEL", key)


async def test_cancelled_blocking_call_salvages_the_script_reply(lane: Lane, key: str) -> None:
    """The caller is cancelled while BLPOP blocks: the BLPOP is cut short, the script that
    was queued behind it still runs, and its reply reaches ``orphan``."""
    # A script the server does not know yet: the first (woken) call falls back to EVAL.
    script = Script(f"-- {uuid.uuid4().hex}\nreturn redis.call('INCR', KEYS[1])")
    salvaged: list[Any] = []
    counter = f"{key}:n"
    try:
        await lane.command("RPUSH", key, "x")
        with anyio.fail_after(5):
            reply = await lane.block_then_script(
                30, ("BLPOP", key, 30), script, [counter], [], orphan=salvaged.append
            )
        assert reply == 1
        await lane.command("DEL", counter)
        with anyio.fail_after(5):
            with anyio.move_on_after(0.3) as scope:
                await lane.block_then_script(
                    30, ("BLPOP", key, 30), script, [counter], [], orphan=salvaged.append
                )
        assert scope.cancelled_caught
        assert salvaged == [1]
        assert await lane.command("GET", counter) == b"1"
        # Woken normally, the script's reply is returned.
        await lane.command("RPUSH", key, "x")
        with anyio.fail_after(5):
            reply = await lane.block_then_script(
                30, ("BLPOP", key, 30), script, [counter], [], orphan=salvaged.append
            )
        assert reply == 2
        assert salvaged == [1]
    finally:
        await lane.command("DEL", key, counter)


async def test_idle_consumer_wakes_and_stops_promptly(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    broker = RedisBroker(redis_url, prefix=prefix, queue="q")
    await broker.start(stack, QueueConfig())

    async def publish_later() -> None:
        await anyio.sleep(0.3)  # the consumer is blocked by now
        await broker.publish(Envelope("a", b"x"))

    with anyio.fail_after(3):
        async with broker.consume(prefetch=1) as it, anyio.create_task_group() as tg:
            tg.start_soon(publish_later)
            delivery = await it.__anext__()
            assert delivery.id == "a"
            assert await delivery.ack()
    # Leaving while blocked (the idle wait is up to 5 s) is not held up by the BLPOP, and
    # leaves nothing in flight.
    with anyio.fail_after(2):
        async with broker.consume(prefetch=1) as it:
            with anyio.move_on_after(0.3):
                await it.__anext__()
    stats = await broker.stats()
    assert (stats.in_flight, stats.ready_by_priority) == (0, {})


async def test_unanswered_command_times_out() -> None:
    """A server that accepts but never answers: the watchdog aborts within the timeout."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        mute = lane_for(
            RedisTarget.parse(f"redis://127.0.0.1:{port}/0"),
            {"redis_socket_timeout": 0.5, "redis_retries": 0},
        )
        assert mute is not None
        with anyio.fail_after(5), pytest.raises(RedisTimeoutError):
            await mute.command("PING")
        mute.close()
    finally:
        server.close()


REPLIES = [
    b"+OK\r\n",
    b"-ERR wrong\r\n",
    b":-42\r\n",
    b"$5\r\nhe\r\nl\r\n",
    b"$-1\r\n",
    b"*-1\r\n",
    b"*0\r\n",
    b"*3\r\n$1\r\na\r\n*2\r\n:1\r\n$0\r\n\r\n$-1\r\n",
]


def test_python_parser_matches_hiredis() -> None:
    hiredis = pytest.importorskip("hiredis")
    stream = b"".join(REPLIES)
    ours, theirs = PyReader(), hiredis.Reader()
    got_ours: list[Any] = []
    got_theirs: list[Any] = []
    # Fed a byte at a time: every partial reply must wait for the rest.
    for byte in stream:
        ours.feed(bytes([byte]))
        theirs.feed(bytes([byte]))
        while (reply := ours.gets()) is not False:
            got_ours.append(reply)
        while (reply := theirs.gets()) is not False:
            got_theirs.append(reply)
    assert len(got_ours) == len(got_theirs) == len(REPLIES)
    for mine, reference in zip(got_ours, got_theirs, strict=True):
        if isinstance(reference, Exception):
            assert str(mine) == str(reference)
        else:
            assert mine == reference


def test_pack() -> None:
    assert pack(("SET", b"k\r\n", 5, 1.5)) == (
        b"*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$1\r\n5\r\n$3\r\n1.5\r\n"
    )
    with pytest.raises(TypeError):
        pack((None,))


async def test_lane_keeps_order_under_asyncio_gather(lane: Lane, key: str) -> None:
    try:
        results = await asyncio.gather(*(lane.command("RPUSH", key, i) for i in range(50)))
        assert results == list(range(1, 51))
    finally:
        await lane.command("DEL", key)


async def unretrieved(caplog: pytest.LogCaptureFixture) -> list[str]:
    """asyncio's reports of exceptions nobody retrieved (made when a future is collected)."""
    for _ in range(3):  # let the loop drop its last references (closed transports' callbacks)
        await asyncio.sleep(0)
    gc.collect()
    return [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_reset_while_blocked_leaves_no_unretrieved_error(
    rig: FaultRig, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 14 item 3: the connection of a block-then-script is reset; the caller gets the
    ConnectionError and the script's reply future, failed by the same reset, is not left for
    asyncio to report."""
    proxied = lane_for(RedisTarget.parse(rig.proxied_url), {})
    assert proxied is not None
    script = Script("return 1")
    caplog.set_level(logging.ERROR, logger="asyncio")
    try:

        async def reset_once_blocked() -> None:
            # Once the BLPOP blocks in Redis (the connection is set up, the script queued).
            direct = redis.asyncio.Redis(port=rig.server.port)
            try:
                with anyio.fail_after(5):
                    while not (await direct.info("clients"))["blocked_clients"]:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
            finally:
                await direct.aclose()
            rig.proxy.reset()

        for commands in ("block_then_script", "blocking"):
            rig.proxy.passthrough()
            await proxied.command("PING")  # reconnected after the last reset
            failed = False
            async with anyio.create_task_group() as tg:
                tg.start_soon(reset_once_blocked)
                try:
                    with anyio.fail_after(5):
                        if commands == "blocking":
                            await proxied.blocking(30, ("BLPOP", "k", 30), ("PING",))
                        else:
                            await proxied.block_then_script(
                                30, ("BLPOP", "k", 30), script, ["x"], [], orphan=print
                            )
                except RedisConnectionError:
                    failed = True
            assert failed, commands
            assert await unretrieved(caplog) == [], commands
    finally:
        proxied.close()


async def test_failed_auth_leaves_no_unretrieved_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong password fails AUTH, and SELECT after it (NOAUTH): one error is raised, the
    other is not left for asyncio to report."""
    server = start_server(tmp_path)
    caplog.set_level(logging.ERROR, logger="asyncio")
    try:
        admin = redis.Redis(port=server.port)
        admin.config_set("requirepass", "secret")
        admin.close()
        wrong = lane_for(RedisTarget.parse(f"redis://:nope@127.0.0.1:{server.port}/1"), {})
        assert wrong is not None
        with pytest.raises(AuthenticationError):
            await wrong.check()
        wrong.close()
        assert await unretrieved(caplog) == []
    finally:
        server.close()


# --- review findings: cancellation and closing -----------------------------------------------


async def test_a_caller_cancelled_while_writes_wait_cancels_only_its_own_wait(
    tmp_path: Path,
) -> None:
    """Callers that find the connection's write buffer full all wait for the same "writable"
    future: one of them cancelled must not cancel the others' waits (before, every caller
    waiting then, and the next one to arrive, got ``CancelledError``)."""
    import os
    import signal

    server = start_server(tmp_path, fsync="no")
    assert server.proc is not None
    server_pid = server.proc.pid
    made = lane_for(RedisTarget.parse(server.url), {})
    assert made is not None
    big = b"x" * 1_000_000
    results: dict[int, Any] = {}
    try:
        await made.check()
        os.kill(server_pid, signal.SIGSTOP)
        async with anyio.create_task_group() as tg:
            scopes: dict[int, anyio.CancelScope] = {}

            async def set_one(i: int) -> None:
                with anyio.CancelScope() as scope:
                    scopes[i] = scope
                    results[i] = await made.command("SET", f"k{i}", big)
                    return
                results[i] = "cancelled"

            i = 0
            with anyio.fail_after(10):  # the kernel's buffers take a few MB first
                while made._main is None or not made._main.paused:
                    tg.start_soon(set_one, i)
                    i += 1
                    await anyio.wait_all_tasks_blocked()
            waiting = list(range(i, i + 4))  # these find the connection paused
            for j in waiting:
                tg.start_soon(set_one, j)
            await anyio.wait_all_tasks_blocked()
            scopes[waiting[1]].cancel()
            await anyio.wait_all_tasks_blocked()
            os.kill(server_pid, signal.SIGCONT)
        assert results[waiting[1]] == "cancelled"
        assert all(results[j] == b"OK" for j in range(i + 4) if j != waiting[1]), results
    finally:
        os.kill(server_pid, signal.SIGCONT)
        made.close()
        server.close()


async def test_a_script_reply_arriving_as_the_caller_is_cancelled_reaches_orphan(
    lane: Lane, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim's reply completes in the very turn its caller is cancelled: it is handed to
    ``orphan`` all the same (before, only a reply still pending was; this one was lost, its
    message left to its lease)."""
    from qtasks_redis import lane as lane_module

    script = Script("return redis.call('RPOP', KEYS[1])")
    work, wake = f"{key}:work", f"{key}:wake"
    salvaged: list[Any] = []
    sent = lane_module._Conn.send
    caller: list[asyncio.Task[Any]] = []

    def send(conn: Any, packed: bytes, count: int = 1, block: float = 0.0) -> Any:
        futures = sent(conn, packed, count, block)
        if b"BLPOP" in packed:  # then the script: the caller is cancelled as its reply lands
            futures[1].add_done_callback(lambda _: caller[0].cancel())
        return futures

    await lane.script(script, [f"{key}:none"], [])  # the server knows it: EVALSHA succeeds
    await lane.command("RPUSH", work, "job")
    monkeypatch.setattr(lane_module._Conn, "send", send)
    try:
        caller.append(
            asyncio.ensure_future(
                lane.block_then_script(
                    5, ("BLPOP", wake, 5), script, [work], [], orphan=salvaged.append
                )
            )
        )
        await lane.command("RPUSH", wake, "1")
        with anyio.fail_after(5), pytest.raises(asyncio.CancelledError):
            await caller[0]
    finally:
        monkeypatch.undo()
    assert salvaged == [b"job"]  # popped by the script, and not lost
    await lane.command("DEL", work, wake)


async def test_closing_the_lane_while_it_connects_leaves_no_connection_open(
    tmp_path: Path,
) -> None:
    """``close()`` while the connection is being set up (its ``SELECT`` unanswered: the
    server is stopped): the opener's connection is closed, not kept as the lane's (before,
    the command went on over a connection nobody would close)."""
    import os
    import signal

    server = start_server(tmp_path, fsync="no")
    assert server.proc is not None
    server_pid = server.proc.pid
    made = lane_for(RedisTarget.parse(f"redis://127.0.0.1:{server.port}/1"), {"redis_retries": 0})
    assert made is not None
    outcome: list[BaseException | bytes] = []
    try:
        os.kill(server_pid, signal.SIGSTOP)
        async with anyio.create_task_group() as tg:

            async def ping() -> None:
                try:
                    outcome.append(await made.command("PING"))
                except RedisConnectionError as exc:
                    outcome.append(exc)

            tg.start_soon(ping)
            await anyio.wait_all_tasks_blocked()  # the opener waits for the server
            assert made._opening is not None and not made._opening.done()
            made.close()
            os.kill(server_pid, signal.SIGCONT)
        assert isinstance(outcome[0], RedisConnectionError), outcome
        assert made._main is None
    finally:
        os.kill(server_pid, signal.SIGCONT)
        server.close()
