"""Real processes for the reliability tests: worker subprocesses and a test-owned redis-server."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, NoReturn

import anyio
import pytest
import redis

from qtasks.components import BrokerStats

HERE = Path(__file__).parent
APP = HERE / "redis_worker_app.py"

PROBLEMS = ("Traceback", "never retrieved", "was destroyed but it is pending", "CRITICAL")
"""What must never be in a worker's log: an unhandled exception in any form."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Worker:
    """``redis_worker_app.py`` serving in its own process group; output goes to a log file."""

    def __init__(
        self,
        url: str,
        prefix: str,
        tmp: Path,
        *,
        lease: float = 30.0,
        concurrency: int = 10,
        name: str = "w",
        config: dict[str, Any] | None = None,
    ) -> None:
        """``config``: further QueueConfig fields for the worker's app (``QT_CONFIG``)."""
        self.name = name
        self.log = tmp / f"{name}.log"
        self.ledger = tmp / "ledger.txt"
        env = {
            **os.environ,
            "QT_URL": url,
            "QT_PREFIX": prefix,
            "QT_LEASE": str(lease),
            "QT_CONCURRENCY": str(concurrency),
            "QT_LEDGER": str(self.ledger),
            "QT_CONFIG": json.dumps(config or {}),
            "PYTHONPATH": str(HERE),
        }
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(APP)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the worker."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM and wait; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text()

    def problems(self, allowed: tuple[str, ...] = ()) -> list[str]:
        """Lines of the log that show an unhandled exception (:data:`PROBLEMS`), except lines
        containing one of ``allowed``."""
        return [
            line
            for line in self.output().splitlines()
            if any(p in line for p in PROBLEMS) and not any(a in line for a in allowed)
        ]


async def wait_workers(app: Any, n: int, *workers: Worker) -> None:
    """Until ``n`` workers have sent a heartbeat through ``app``'s global config (they are
    serving: their consumers claim from then on); fails at once if one of ``workers`` exited."""
    with anyio.fail_after(20):
        while len(await app.global_config.workers()) < n:
            for worker in workers:
                assert worker.proc.poll() is None, worker.output()
            await anyio.sleep(0.05)


def ledger(path: Path) -> list[tuple[str, int, int]]:
    """``(event, task number, pid)`` lines of the ledger."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        event, number, pid = line.split()
        out.append((event, int(number), int(pid)))
    return out


def counts(path: Path, event: str) -> Counter[int]:
    return Counter(number for ev, number, _ in ledger(path) if ev == event)


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


async def settled(app: Any, seconds: float = 5) -> BrokerStats:
    """The app's broker stats once nothing is in flight (or at the deadline).

    A waiter is woken by the final save, and the worker acks right after it: this waits for
    that ack instead of racing it."""
    with anyio.move_on_after(seconds):
        while (await app.broker.stats()).in_flight:  # noqa: ASYNC110 - a remote count
            await anyio.sleep(0.02)
    stats: BrokerStats = await app.broker.stats()
    return stats


def unavailable(reason: str) -> NoReturn:
    """A test-owned redis-server could not start: skip locally, fail under ``CI`` (where
    redis-server is installed, so not starting is a real failure)."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: this test must run)")
    pytest.skip(reason)


def start_server(tmp: Path, **options: Any) -> RedisServer:
    """A :class:`RedisServer` of the test's own, or :func:`unavailable`."""
    try:
        return RedisServer(tmp, **options)
    except (FileNotFoundError, OSError) as exc:
        unavailable(f"cannot start a redis-server: {exc}")


class Seen(logging.Handler):
    """Sets ``event`` when a log record's message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.WARNING)
        self.text = text
        self.event = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()
