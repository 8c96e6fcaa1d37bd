"""The fault proxy itself (tests/faultproxy.py), against a private redis-server: each mode does
what the reliability tests rely on."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from fault_fixtures import FaultRig
from faultproxy import FaultProxy
from redis.backoff import NoBackoff
from redis.retry import Retry


def client(port: int, timeout: float = 2.0) -> redis.Redis:
    """A client that does not retry: each command shows what the proxy did to it."""
    return redis.Redis(
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def round_trip(conn: redis.Redis) -> float:
    start = time.monotonic()
    assert conn.ping()
    return time.monotonic() - start


def test_pass_forwards_and_counts(rig: FaultRig) -> None:
    conn = client(rig.proxy.port)
    try:
        conn.set("k", b"x" * 100_000)
        assert conn.get("k") == b"x" * 100_000
        stats = rig.proxy.stats
        assert (stats.connections, stats.active) == (1, 1)
        assert stats.bytes_up > 100_000 and stats.bytes_down > 100_000
        assert stats.held == 0
    finally:
        conn.close()


def test_latency_delays_each_way_without_serializing(rig: FaultRig) -> None:
    conn = client(rig.proxy.port)
    try:
        base = min(round_trip(conn) for _ in range(3))
        rig.proxy.latency(0.1)
        slow = [round_trip(conn) for _ in range(3)]
        # 0.1 s each way: every round trip costs at least 2x the set value.
        assert min(slow) >= 0.2, slow
        assert max(slow) < 0.2 + base + 0.3, slow
        # 50 commands in one pipeline (many chunks in flight) still cost one delayed round trip,
        # and come back in order.
        pipe = conn.pipeline(transaction=False)
        for i in range(50):
            pipe.echo(str(i))
        start = time.monotonic()
        assert pipe.execute() == [str(i).encode() for i in range(50)]
        assert time.monotonic() - start < 0.6
        rig.proxy.passthrough()
        assert round_trip(conn) < 0.1
    finally:
        conn.close()


def test_latency_keeps_throughput_with_many_chunks_in_flight(rig: FaultRig) -> None:
    """Twenty commands sent 10 ms apart (separate chunks) through 0.1 s each way: all replies
    are back about one delayed round trip after the last was sent, not 20 round trips."""
    rig.proxy.latency(0.1)
    with socket.create_connection(("127.0.0.1", rig.proxy.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.monotonic()
        for i in range(20):
            time.sleep(0.01)  # pacing, so that the commands leave as separate chunks
            sock.sendall(b"ECHO %d\r\n" % i)
        last_sent = time.monotonic()
        expected = b"".join(b"$%d\r\n%d\r\n" % (len(str(i)), i) for i in range(20))
        received = b""
        while len(received) < len(expected):
            received += sock.recv(65536)
        done = time.monotonic()
    assert received == expected  # in order, nothing lost
    assert done - last_sent >= 0.2  # the last command's round trip was delayed both ways
    assert done - start < 1.0, done - start  # a delay paid per chunk would take 20 x 0.2 s


def test_latency_with_jitter_varies_each_chunk_and_keeps_order(rig: FaultRig) -> None:
    """0.1 s give or take 0.05 s each way: round trips spread between 0.1 and 0.3 s (plus
    the machine's own time), and commands sent as separate chunks come back in order."""
    conn = client(rig.proxy.port)
    try:
        assert conn.ping()  # connected (its handshake's round trips) before the latency
        rig.proxy.latency(0.1, jitter=0.05)
        trips = [round_trip(conn) for _ in range(12)]
        assert min(trips) >= 0.1, trips
        assert max(trips) < 0.3 + 0.3, trips
        assert max(trips) - min(trips) > 0.01, f"no jitter: {trips}"
    finally:
        conn.close()
    with socket.create_connection(("127.0.0.1", rig.proxy.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(20):
            time.sleep(0.005)  # pacing, so that the commands leave as separate chunks
            sock.sendall(b"ECHO %d\r\n" % i)
        expected = b"".join(b"$%d\r\n%d\r\n" % (len(str(i)), i) for i in range(20))
        received = b""
        while len(received) < len(expected):
            received += sock.recv(65536)
    assert received == expected  # a short draw behind a long one waited for it


def test_blackhole_times_out_and_pass_restores(rig: FaultRig) -> None:
    conn = client(rig.proxy.port, timeout=0.5)
    try:
        assert conn.ping()
        rig.proxy.blackhole()
        with pytest.raises(redis.TimeoutError):
            conn.ping()
        assert rig.proxy.stats.held > 0
        # A new connection is accepted but gets nothing either.
        fresh = client(rig.proxy.port, timeout=0.5)
        with pytest.raises(redis.TimeoutError):
            fresh.ping()
        fresh.close()
        rig.proxy.passthrough()
        # redis-py drops a connection that timed out and reconnects for the next command.
        assert conn.ping()
    finally:
        conn.close()


def test_reset_breaks_open_and_new_connections(rig: FaultRig) -> None:
    conn = client(rig.proxy.port)
    try:
        assert conn.ping()
        rig.proxy.reset()
        assert rig.proxy.stats.resets == 1
        with pytest.raises(redis.ConnectionError):
            conn.ping()
        fresh = client(rig.proxy.port)
        with pytest.raises(redis.ConnectionError):
            fresh.ping()
        fresh.close()
        assert rig.proxy.stats.active == 0
        rig.proxy.passthrough()
        assert conn.ping()
    finally:
        conn.close()


def test_upstream_down_resets_the_client(tmp_path: Path) -> None:
    # Nothing listens on the upstream port: the client's connection is reset, the proxy lives.
    with FaultProxy(("127.0.0.1", 1)) as proxy:
        conn = client(proxy.port)
        with pytest.raises(redis.ConnectionError):
            conn.ping()
        conn.close()
        assert proxy.stats.connections == 1


def test_runs_as_a_program(rig: FaultRig) -> None:
    here = Path(__file__).parent.parent / "faultproxy.py"
    proc = subprocess.Popen(
        [sys.executable, str(here), "--listen", "127.0.0.1:0",
         "--upstream", f"127.0.0.1:{rig.server.port}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        port = int(proc.stdout.readline())
        conn = client(port, timeout=0.5)
        assert conn.ping()

        def command(line: str) -> str:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
            return proc.stdout.readline().strip()

        assert command("blackhole") == "ok"
        with pytest.raises(redis.TimeoutError):
            conn.ping()
        assert command("latency 0.05") == "ok"
        assert round_trip(conn) >= 0.1
        assert command("nonsense").startswith("error")
        assert '"connections": 2' in command("stats")
        conn.close()
    finally:
        proc.stdin.close()  # end of input ends the program
        assert proc.wait(10) == 0


def test_blackhole_holds_bytes_and_delivers_them_in_order_when_it_heals(rig: FaultRig) -> None:
    """A partition delays a live stream, it never cuts bytes out of its middle (which would
    desynchronise client and server): what was sent meanwhile arrives, in order, afterwards."""
    with socket.create_connection(("127.0.0.1", rig.proxy.port), timeout=5) as sock:
        sock.sendall(b"PING\r\n")
        assert sock.recv(64) == b"+PONG\r\n"
        rig.proxy.blackhole()
        sock.sendall(b"ECHO one\r\nECHO two\r\n")
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(64)  # nothing comes back while partitioned
        rig.proxy.passthrough()
        sock.settimeout(5)
        expected = b"$3\r\none\r\n$3\r\ntwo\r\n"
        received = b""
        while len(received) < len(expected):
            received += sock.recv(64)
        assert received == expected


def test_slice_delivers_every_byte_in_order_in_pieces(rig: FaultRig) -> None:
    """1-byte pieces: a 2,000-byte value comes back whole, over many reads (the client met the
    reply cut at many places), and redis-py's parser still reads it."""
    rig.proxy.slice(1, 0.0005)
    value = bytes(range(256)) * 8
    with socket.create_connection(("127.0.0.1", rig.proxy.port), timeout=5) as sock:
        command = b"*2\r\n$4\r\nECHO\r\n$%d\r\n%s\r\n" % (len(value), value)
        sock.sendall(command)
        expected = b"$%d\r\n%s\r\n" % (len(value), value)
        received, reads = b"", 0
        while len(received) < len(expected):
            received += sock.recv(65536)
            reads += 1
    assert received == expected
    assert reads > 10, reads
    conn = client(rig.proxy.port, timeout=10)
    try:
        conn.set("k", value)
        assert conn.get("k") == value
    finally:
        conn.close()


def test_close_after_cuts_each_connection_at_its_byte_budget(rig: FaultRig) -> None:
    """Budget 10 bytes exactly: of a 15-byte command the server gets 10 (a cut frame it never
    answers), and the client's connection is reset; a new connection gets a budget afresh."""
    rig.proxy.close_after(10, 10)
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", rig.proxy.port), timeout=5) as sock:
            sock.sendall(b"ECHO abcdefgh\r\n")  # 15 bytes
            # The server never answers the cut command: the first thing that comes is the RST.
            with pytest.raises(ConnectionResetError):
                sock.recv(64)
    assert rig.proxy.stats.cut == 2
    assert rig.proxy.stats.bytes_up == 20 and rig.proxy.stats.bytes_down == 0
    rig.proxy.passthrough()
    conn = client(rig.proxy.port)
    try:
        assert conn.ping()
    finally:
        conn.close()


def test_close_after_replies_only_cuts_inside_a_reply_of_an_applied_command(
    rig: FaultRig,
) -> None:
    """``replies_only``, budget 10: the commands all reach the server (which runs them), the
    second reply is cut after its first 3 bytes, then the connection is reset."""
    rig.proxy.close_after(10, 10, replies_only=True)
    with socket.create_connection(("127.0.0.1", rig.proxy.port), timeout=5) as sock:
        sock.sendall(b"PING\r\n")
        assert sock.recv(64) == b"+PONG\r\n"  # 7 bytes of 10
        sock.sendall(b"INCR applied\r\n")
        assert sock.recv(64) == b":1\r"  # 3 bytes of its 4 (one write: one read)
        with pytest.raises(ConnectionResetError):
            sock.recv(64)
    assert rig.proxy.stats.cut == 1
    rig.proxy.passthrough()
    conn = client(rig.proxy.port)
    try:
        assert conn.get("applied") == b"1"  # the command whose reply was cut did run
    finally:
        conn.close()
