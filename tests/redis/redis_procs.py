"""Real processes for the reliability tests: worker subprocesses and a test-owned redis-server."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio

# Test-owned servers live in tests/redis_server.py (the timer tests use them too); the tests
# here import them from this module as before.
from redis_server import RedisServer as RedisServer
from redis_server import free_port as free_port
from redis_server import start_server as start_server
from skips import unavailable as unavailable

from qtasks.components import BrokerStats

HERE = Path(__file__).parent
APP = HERE / "redis_worker_app.py"

PROBLEMS = ("Traceback", "never retrieved", "was destroyed but it is pending", "CRITICAL")
"""What must never be in a worker's log: an unhandled exception in any form."""


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
            # Kept after HERE: a checkout other than the installed one (a worktree) put its
            # packages there, and the worker must run that code.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
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


class Workers:
    """Worker processes of one configuration, named ``w0``, ``w1``... in the order they start:
    the supervisor of a test whose task kills the worker that runs it (``suicide``)."""

    def __init__(self, url: str, prefix: str, tmp: Path, **options: Any) -> None:
        """``options``: those of :class:`Worker` but ``name``, the same for every worker."""
        self._args = (url, prefix, tmp)
        self._options = options
        self.started: list[Worker] = []
        """Every worker started, the dead ones too."""

    def start(self) -> Worker:
        """One more worker."""
        made = Worker(*self._args, name=f"w{len(self.started)}", **self._options)
        self.started.append(made)
        return made

    def replace_dead(self, live: list[Worker]) -> int:
        """Start a worker in the place of each of ``live`` that has exited; how many."""
        replaced = 0
        for at, worker in enumerate(live):
            if worker.proc.poll() is not None:
                live[at] = self.start()
                replaced += 1
        return replaced


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


async def settled(app: Any, seconds: float = 5) -> BrokerStats:
    """The app's broker stats once nothing is in flight (or at the deadline).

    A waiter is woken by the final save, and the worker acks right after it: this waits for
    that ack instead of racing it."""
    with anyio.move_on_after(seconds):
        while (await app.broker.stats()).in_flight:  # noqa: ASYNC110 - a remote count
            await anyio.sleep(0.02)
    stats: BrokerStats = await app.broker.stats()
    return stats


class Seen(logging.Handler):
    """Sets ``event`` when a log record's message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.WARNING)
        self.text = text
        self.event = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()
