"""Scenario F8 of the reliability plan: the RabbitMQ server itself restarts under load.

``rabbitmqctl stop_app`` while worker subprocesses run tasks and producers enqueue, then
``start_app``: every task whose ``add_task`` returned (confirmed) runs to success, an
``add_task`` made while the server is down returns once it is back (its publish waited) or
raises a clear error at its ``publish_timeout``, and the workers, still alive, consume again.

The server is the shared one (tests run serially under CI): the test always starts it again,
and waits until it accepts connections, whatever happened.
"""

from __future__ import annotations

import time
from collections import Counter

import aio_pika
import anyio
import pytest
from workflow_app import WorkerProcess, Workers, build

from qtasks import AsyncQueueTasks
from qtasks.errors import BrokerConnectionError
from qtasks.record import TaskStatus
from qtasks_rabbitmq import RabbitMQBroker
from qtasks_redis import RedisStorage

from .conftest import URL, poll, rabbitmqctl
from .test_end_to_end import consumers_of

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq, pytest.mark.slow, pytest.mark.reliability]

WORKERS = 2
CONCURRENCY = 4
"""Each worker's runners, and the deliveries it holds waiting (``prefetch``)."""
BEFORE = 300
"""Tasks enqueued before the stop: most are still queued, some running, when it comes."""
DURING = 100
"""Tasks the patient producer enqueues from the stop on."""
RUN = 0.1
"""Seconds each task runs."""
DOWN = 5.0
"""Seconds, at least, from the end of ``stop_app`` to ``start_app`` (the plan's 5 s)."""
LINK_LOST = "; reconnecting"
"""The end of the line a worker logs when its link to RabbitMQ is lost."""
RESUME = 10.0
"""The plan's bound on the consumers' resumption after the start."""


def unexpected(line: str) -> bool:
    """A worker's log line showing trouble beyond the restart itself: an error other than
    aiormq's report of the server closing the connection, an exception nobody retrieved."""
    if "never retrieved" in line or "CRITICAL" in line:
        return True
    return line.startswith("ERROR:") and "CONNECTION_FORCED" not in line


def runs(workers: Workers) -> list[tuple[int, int]]:
    """``(task number, worker pid)`` of every run of ``slow``, in the order they began."""
    lines = workers.ledger.read_text().splitlines() if workers.ledger.exists() else []
    return [(int(v), int(pid)) for name, v, pid in map(str.split, lines) if name == "slow"]


def restart_server() -> None:
    """``start_app`` and wait until RabbitMQ accepts connections again."""
    rabbitmqctl("start_app", timeout=120)
    rabbitmqctl("await_startup", timeout=120)


async def accepting() -> bool:
    """Whether RabbitMQ takes an AMQP connection now."""
    try:
        connection = await aio_pika.connect(URL, timeout=1)
    except Exception:
        return False
    await connection.close()
    return True


async def began(workers: Workers, count: int) -> bool:
    return len(runs(workers)) >= count


async def saw_link_lost(procs: list[WorkerProcess]) -> bool:
    """Whether each worker logged that its link to RabbitMQ was lost."""
    return all(LINK_LOST in p.log.read_text() for p in procs)


async def consuming(queue: str) -> bool:
    """Whether RabbitMQ counts every worker's consumer on ``queue``."""
    return await consumers_of(queue) >= WORKERS


async def began_again(workers: Workers, procs: list[WorkerProcess], since: int) -> bool:
    """Whether each of ``procs`` began a task after the first ``since`` runs."""
    return {pid for _, pid in runs(workers)[since:]} == {p.proc.pid for p in procs}


async def test_a_server_restart_under_load_loses_no_confirmed_task(
    workers: Workers, redis_url: str, prefix: str, queue_name: str
) -> None:
    """2 worker subprocesses (concurrency 4, lease 2 s), 300 tasks of 0.1 s enqueued; once 40
    have begun, ``stop_app``. From the stop a patient producer (``publish_timeout`` 30 s)
    enqueues 100 more and a hasty one (1 s) enqueues until the server is back; ``start_app``
    5 s after the stop ended. Every ``add_task`` that returned ends ``success`` with its
    result, and ran (ledger); runs begun twice stay within what was in flight. A hasty
    ``add_task`` that raised says so clearly, without the password, and a task it said was
    not written never runs. Deliveries come again after the restart with attempt 2: on a
    classic queue that count comes only from RabbitMQ's ``redelivered`` flag. Within 10 s of
    the server taking connections again, RabbitMQ counts both workers' consumers and each
    worker begins tasks; both are alive at the end, with no traceback nor unexpected error
    in their logs."""
    workers.env["QT_CONCURRENCY"] = str(CONCURRENCY)
    procs = workers.start(WORKERS)
    app = build("rabbitmq", redis_url, prefix, rabbitmq_url=URL, queue=queue_name)
    # A producer whose publishes give up after 1 s: while the server is down they raise.
    hasty = AsyncQueueTasks(
        broker=RabbitMQBroker(URL, queue=queue_name, publish_timeout=1.0),
        storage=RedisStorage(redis_url, prefix=prefix),
    )
    confirmed: dict[int, str] = {}  # task number -> uuid, for every add_task that returned
    refused: dict[int, BrokerConnectionError] = {}
    stopped = False
    started_at = 0.0
    try:
        await hasty.start()
        for i in range(BEFORE):
            confirmed[i] = (await app.add_task("slow", i, RUN)).uuid
        await poll(lambda: began(workers, 40), 60)  # the load is on: the stop comes mid-run

        back = anyio.Event()

        async def patient() -> None:
            # From the stop on: the first publishes wait for the server (publish_timeout
            # 30 s), then go on.
            for i in range(BEFORE, BEFORE + DURING):
                confirmed[i] = (await app.add_task("slow", i, RUN)).uuid

        async def impatient() -> None:
            i = 10_000
            while not back.is_set():
                try:
                    confirmed[i] = (await hasty.add_task("slow", i, RUN)).uuid
                except BrokerConnectionError as exc:
                    refused[i] = exc
                i += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(patient)
            stopped = True
            stop_at = time.monotonic()
            await anyio.to_thread.run_sync(rabbitmqctl, "stop_app")
            down_at = time.monotonic()
            tg.start_soon(impatient)
            await poll(lambda: saw_link_lost(procs), 30)
            await anyio.sleep(max(DOWN - (time.monotonic() - down_at), 0))
            before_start = len(runs(workers))
            start_at = time.monotonic()

            async def start() -> None:
                nonlocal stopped, started_at
                await anyio.to_thread.run_sync(restart_server)
                stopped, started_at = False, time.monotonic()

            tg.start_soon(start)
            # Measured from when the server takes connections again (``start_app`` returns
            # seconds later, once its boot is over).
            await poll(accepting, 120, every=0.02)
            up_at = time.monotonic()
            back.set()
            # The consumers resume: RabbitMQ counts them, and each worker begins tasks again.
            with anyio.fail_after(RESUME):
                await poll(lambda: consuming(queue_name), RESUME)
                await poll(lambda: began_again(workers, procs, before_start), RESUME)
            resumed = time.monotonic() - up_at

        with anyio.fail_after(120):
            ended = {i: await app.wait(uuid, timeout=None) for i, uuid in confirmed.items()}
    finally:
        if stopped:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(restart_server)
        await hasty.aclose()
        await app.aclose()
    counts = Counter(i for i, _ in runs(workers))
    lost = [i for i, task in ended.items() if task.status is not TaskStatus.SUCCESS]
    assert lost == [], f"{len(lost)} confirmed tasks did not succeed"
    assert all(task.returning == i for i, task in ended.items())
    assert set(confirmed) <= set(counts)
    duplicates = sum(n - 1 for n in counts.values())
    # Only work in flight at the stop runs again: what each worker was running when its
    # lease pass found the deliveries' channel gone (it cancels those runs), and the patient
    # producer's publish whose confirm the stop cut (published again after the restart).
    assert duplicates <= WORKERS * CONCURRENCY + 1, counts.most_common(10)
    assert refused, "no add_task made while the server was down raised"
    for i, exc in refused.items():
        assert "cannot publish" in str(exc) and "RabbitMQ" in str(exc), exc
        assert "guest:guest" not in str(exc), "the error shows the password"
        if "it was not written" in str(exc):
            assert i not in counts, f"task {i} ran, though its add_task said it was not written"
    redelivered = workers.ran("redelivered")
    assert redelivered, "no delivery came again after the restart"
    assert all(p.proc.poll() is None for p in procs), "a worker exited"
    assert workers.tracebacks() == []
    errors = [line for p in procs for line in p.log.read_text().splitlines() if unexpected(line)]
    assert errors == []
    print(
        f"F8: stop_app took {down_at - stop_at:.1f} s, down {start_at - down_at:.1f} s, "
        f"connections taken {up_at - start_at:.1f} s after start_app began, which took "
        f"{started_at - start_at:.1f} s; consumers resumed {resumed:.1f} s after that, "
        f"{len(confirmed)} confirmed, {len(refused)} refused, {duplicates} duplicates, "
        f"{len(redelivered)} redelivered; a refusal: {next(iter(refused.values()))}"
    )
