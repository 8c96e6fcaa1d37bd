"""A qtasks app with the workflow tests' tasks, on Redis (broker and storage on one server) or
on RabbitMQ with a Redis storage; in process, or as a worker subprocess.

Run as ``python workflow_app.py`` to serve until SIGTERM; settings come from environment
variables: ``QT_BACKEND`` (``redis`` or ``rabbitmq``), ``QT_REDIS``, ``QT_RABBITMQ``,
``QT_PREFIX``, ``QT_QUEUE``, ``QT_LEASE``, ``QT_CONCURRENCY``, ``QT_LEDGER`` and ``QT_PROBE``
(``1``: the :class:`CopyProbe` of the test of a step published twice). Every execution
appends ``<task> <argument> <pid>`` to the ledger, opened with ``O_APPEND`` so the lines
survive a SIGKILL of the worker, and every ``qtasks_task_enqueued`` the process fires
``enqueued <uuid> <pid>``, and every delivery of a message delivered before (a lost holder's,
a broker's restart) ``redelivered <uuid>:<attempt> <pid>``.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from qtasks import AsyncQueueTasks, QueueConfig, hookimpl
from qtasks.components import Broker, Delivery
from qtasks.memory import _Signal
from qtasks.messages import Message
from qtasks.record import TaskRecord
from qtasks.workflows.plan import GENERATION
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

HERE = Path(__file__).parent


def build(
    backend: str,
    redis_url: str,
    prefix: str,
    *,
    rabbitmq_url: str = "",
    queue: str = "wf",
    lease: float = 30.0,
    concurrency: int = 16,
    ledger: str | None = None,
    probe: bool = False,
) -> AsyncQueueTasks:
    """An app with the tasks below; its storage is Redis under ``prefix``, its broker Redis
    (the same server) or RabbitMQ (``queue``); with ``probe`` (and a ``ledger``), a
    :class:`CopyProbe`."""
    broker: Broker
    if backend == "redis":
        broker = RedisBroker(redis_url, prefix=prefix, queue=queue)
    else:
        from qtasks_rabbitmq import RabbitMQBroker

        broker = RabbitMQBroker(rabbitmq_url, queue=queue)
    app = AsyncQueueTasks(
        "workflow-tests",
        broker=broker,
        storage=RedisStorage(redis_url, prefix=prefix),
        global_config=RedisGlobalConfig(redis_url, prefix=prefix),
        config=QueueConfig(
            lease=lease,
            max_tasks_process=concurrency,
            prefetch=concurrency,
            heartbeat_interval=0.5,
            shutdown_grace=1.0,
            retry=0,
        ),
    )

    def note(task: str, value: Any) -> None:
        if ledger:
            fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{task} {value} {os.getpid()}\n".encode())
            finally:
                os.close(fd)

    if ledger:

        class Enqueued:
            """Notes every ``qtasks_task_enqueued`` this process fires: ``enqueued <uuid>``,
            and every delivery it receives of a message delivered before:
            ``redelivered <uuid>:<attempt>``."""

            @hookimpl
            def qtasks_task_enqueued(self, record: TaskRecord) -> None:
                note("enqueued", record.uuid)

            @hookimpl
            def qtasks_broker_message_received(self, delivery: Delivery) -> None:
                if delivery.attempt > 1:
                    note("redelivered", f"{delivery.id}:{delivery.attempt}")

        app.add_plugin(Enqueued())

    @app.task
    def add(a: int, b: int) -> int:
        note("add", a + b)
        return a + b

    @app.task
    def double(x: int) -> int:
        note("double", x)
        return 2 * x

    @app.task
    def total(xs: list[int]) -> int:
        note("total", len(xs))
        return sum(xs)

    @app.task
    def fail(x: int) -> int:
        note("fail", x)
        raise ValueError(f"bad {x}")

    @app.task
    def on_error(workflow: str) -> str:
        note("on_error", workflow)
        return workflow

    @app.task
    async def slow(x: int, seconds: float) -> int:
        note("slow", x)
        await anyio.sleep(seconds)
        return x

    @app.task
    async def noop(x: int) -> int:
        return x

    copies = CopyProbe(app, ledger, note) if probe and ledger else None

    @app.task
    async def gated(x: int) -> int:
        note("gated", x)
        if copies is not None:
            await copies.both_begun()
        return x

    return app


class CopyProbe:
    """Test-only, in a worker: stages the RabbitMQ gap of issue 19 around the task ``gated``.

    - Right after this process fired ``qtasks_task_enqueued`` for a ``gated`` step (the
      settle step published it and RabbitMQ confirmed it; the member that opened its gate is
      not acked yet), the process SIGKILLs itself; once for every worker (a marker file).
    - A delivery of a ``gated`` step is noted ``copy <uuid>:<generation>``. Its first copy
      (no publish generation) waits at the worker, before it is begun, until a later copy
      runs here: that copy comes from the redelivered member publishing the step again.
    - ``gated``'s run waits (the run :meth:`both_begun` holds) until both copies reached the
      storage's begin, so the first copy reaches begin while the step runs."""

    def __init__(self, app: AsyncQueueTasks, ledger: str, note: Any) -> None:
        self._mark = f"{ledger}.killed"
        self._note = note
        self._running = False
        self._begun: list[str] = []
        self._changed = _Signal()
        self._watch_begins(app.storage)
        app.add_plugin(self)

    def _watch_begins(self, storage: Any) -> None:
        plain_begin, plain_many = storage.begin, storage.begin_many

        async def begin(record: TaskRecord, *, generation: int = 0) -> TaskRecord:
            got: TaskRecord = await plain_begin(record, generation=generation)
            self._began([record])
            return got

        async def begin_many(records: list[TaskRecord]) -> list[TaskRecord]:
            got: list[TaskRecord] = await plain_many(records)
            self._began(records)
            return got

        storage.begin, storage.begin_many = begin, begin_many

    def _began(self, records: list[TaskRecord]) -> None:
        self._begun += [r.uuid for r in records if r.task_name == "gated"]
        self._changed.fire()

    @hookimpl
    def qtasks_task_enqueued(self, record: TaskRecord) -> None:
        if record.task_name != "gated":
            return
        try:
            os.close(os.open(self._mark, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)

    @hookimpl
    async def qtasks_worker_task_received(self, message: Message) -> None:
        if message.task_name != "gated":
            return
        generation = message.headers.get(GENERATION, 0)
        self._note("copy", f"{message.uuid}:{generation}")
        if not generation:
            with anyio.fail_after(30):
                while not self._running:
                    await self._changed.wait(None)

    async def both_begun(self) -> None:
        """In ``gated``'s run: wait until two copies of the step reached begin here."""
        self._running = True
        self._changed.fire()
        with anyio.fail_after(30):
            while len(self._begun) < 2:
                await self._changed.wait(None)


class WorkerProcess:
    """``workflow_app.py`` serving in its own process group; output goes to a log file."""

    def __init__(self, tmp: Path, name: str, env: dict[str, str]) -> None:
        self.log = tmp / f"{name}.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "workflow_app.py")],
                env={
                    **os.environ,
                    **env,
                    "PYTHONPATH": os.pathsep.join(
                        filter(None, [str(HERE), os.environ.get("PYTHONPATH")])
                    ),
                },
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the worker."""
        os.killpg(self.proc.pid, 9)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def tracebacks(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if "Traceback" in line]


async def kill_while_running(
    app: AsyncQueueTasks, workflow: str, workers: Workers, kills: int, pause: tuple[float, float]
) -> int:
    """Until ``workflow`` ended: SIGKILL a random live worker after a random pause (seconds
    in ``pause``) and start a fresh one, at most ``kills`` times; return how many."""
    rng = random.Random()
    done = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = await app.get_workflow(workflow)
        assert state is not None
        if state.done:
            break
        await anyio.sleep(rng.uniform(*pause))
        alive = [p for p in workers.procs if p.proc.poll() is None]
        if done < kills and alive:
            rng.choice(alive).kill()
            done += 1
            workers.start(1)
    return done


def ledger_lines(path: Path) -> list[tuple[str, str]]:
    """``(task, value)`` of every execution noted in the ledger."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [(line.split()[0], line.split()[1]) for line in lines]


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    env = os.environ
    app = build(
        env["QT_BACKEND"],
        env["QT_REDIS"],
        env["QT_PREFIX"],
        rabbitmq_url=env.get("QT_RABBITMQ", ""),
        queue=env.get("QT_QUEUE", "wf"),
        lease=float(env.get("QT_LEASE", "30")),
        concurrency=int(env.get("QT_CONCURRENCY", "16")),
        ledger=env.get("QT_LEDGER"),
        probe=env.get("QT_PROBE") == "1",
    )
    if env.get("QT_PROBE") == "1":  # the worker's note of a stale copy it dropped
        logging.getLogger("qtasks.worker").setLevel(logging.INFO)
    app.run_forever()


if __name__ == "__main__":
    main()


class Workers:
    """Worker processes of one test on one backend, and the environment they share."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.env = env
        self.ledger = tmp / "ledger.txt"
        self.env["QT_LEDGER"] = str(self.ledger)
        self.procs: list[WorkerProcess] = []
        self._made = 0

    def start(self, count: int = 1) -> list[WorkerProcess]:
        started = []
        for _ in range(count):
            self._made += 1
            started.append(WorkerProcess(self.tmp, f"worker{self._made}", self.env))
        self.procs += started
        return started

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()

    def tracebacks(self) -> list[str]:
        return [line for proc in self.procs for line in proc.tracebacks()]

    def ran(self, task: str) -> list[str]:
        """The values noted by each execution of ``task``, in the order they ran."""
        return [value for name, value in ledger_lines(self.ledger) if name == task]
