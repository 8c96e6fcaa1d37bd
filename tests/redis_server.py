"""A redis-server owned by a test, on a free loopback port: started, killed (SIGKILL) and
started again by the tests that need a server of their own (outages, restarts, settings the
shared server must not get). Lives at the top of tests/ so every test folder imports it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import redis
from skips import unavailable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A redis-server owned by the test, with the AOF on, on a free loopback port."""

    def __init__(
        self,
        tmp: Path,
        *,
        fsync: str = "always",
        extra: list[str] | None = None,
        password: str | None = None,
    ):
        """``password``: the server requires it (``--requirepass``)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed")
        self.binary = binary
        self.dir = tmp
        self.port = free_port()
        self.args = [
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(tmp),
            "--appendonly", "yes", "--appendfsync", fsync, "--save", "",
            "--maxmemory-policy", "noeviction", "--daemonize", "no",
            *(extra or []),
            *(["--requirepass", password] if password is not None else []),
        ]  # fmt: skip
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> None:
        with (self.dir / "redis.log").open("a") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [self.binary, *self.args], stdout=log, stderr=subprocess.STDOUT
            )
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.BusyLoadingError):
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise
                    time.sleep(0.05)  # the server process is starting up
        finally:
            client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_server(tmp: Path, **options: Any) -> RedisServer:
    """A :class:`RedisServer` of the test's own, or :func:`unavailable`."""
    try:
        return RedisServer(tmp, **options)
    except (FileNotFoundError, OSError) as exc:
        unavailable(f"cannot start a redis-server: {exc}")
