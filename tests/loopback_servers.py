"""Loopback servers that are not what a client expects, for the start-wait tests of Redis
and RabbitMQ: one whose TLS certificate is self-signed (tests/redis/untrusted_tls.pem, for
127.0.0.1), so a client that checks certificates refuses it (a configuration error, not an
outage); one that answers in plain text; one that accepts and never answers."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

UNTRUSTED_PEM = Path(__file__).parent / "redis" / "untrusted_tls.pem"
"""A self-signed certificate and its key, for 127.0.0.1 and localhost (valid to 2126)."""


@contextmanager
def loopback_server(
    handle: Callable[[socket.socket], None], *, keep: bool = False
) -> Iterator[int]:
    """A loopback server (its port) whose thread gives each connection to ``handle`` (an
    ``OSError`` there, the client leaving, is what the tests provoke: ignored), then closes
    it; with ``keep``, leaves it open, silent, until the server ends."""
    done = threading.Event()
    kept: list[socket.socket] = []

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:  # closed at exit
                return
            conn.settimeout(5)
            try:
                handle(conn)
            except OSError:
                pass
            if keep:
                kept.append(conn)
            else:
                conn.close()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.settimeout(0.1)
        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield sock.getsockname()[1]
        finally:
            done.set()
            thread.join(5)
            for conn in kept:
                conn.close()


@contextmanager
def tls_server_with_an_untrusted_certificate() -> Iterator[int]:
    """A loopback TLS server (its port) whose certificate is self-signed: a client that checks
    certificates (``rediss://``, ``amqps://`` by default) refuses it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(UNTRUSTED_PEM)
    with loopback_server(lambda conn: context.wrap_socket(conn, server_side=True).close()) as port:
        yield port


@contextmanager
def server_that_answers_in_plain_text() -> Iterator[int]:
    """A loopback server (its port) that answers whatever comes with a line of plain text, as
    a proxy or another service in front of the port would: no TLS."""

    def answer(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(b"-ERR not what this port speaks\r\n")

    with loopback_server(answer) as port:
        yield port


@contextmanager
def server_of_another_protocol() -> Iterator[int]:
    """A loopback server (its port) that answers whatever comes with AMQP's protocol header,
    as RabbitMQ does on its port: a ``redis://`` URL with the wrong port."""

    def answer(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(b"AMQP\x00\x00\x09\x01")

    with loopback_server(answer) as port:
        yield port


@contextmanager
def socket_that_never_answers() -> Iterator[tuple[int, threading.Event]]:
    """A loopback server (its port) that accepts connections and never replies; the event is
    set once a client connected."""
    connected = threading.Event()
    with loopback_server(lambda conn: connected.set(), keep=True) as port:
        yield port, connected
