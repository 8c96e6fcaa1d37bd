"""Reliability on Redis with real processes: SIGKILLed workers, long tasks, a Redis restart,
10,000 tasks over three workers, poison input."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis
from redis_procs import Worker, Workers, counts, ledger, settled, start_server, wait_workers
from redis_worker_app import build

from qtasks import TaskStatus
from qtasks.components import AttemptLog
from qtasks_redis import RedisBroker
from qtasks_redis.broker_lua import KEY_NAMES

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def test_kill9_mid_task_second_worker_completes_all(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    app = build(redis_url, prefix)
    await app.start()
    a = Worker(redis_url, prefix, tmp_path, lease=1.0, concurrency=4, name="a")
    b: Worker | None = None
    try:
        await wait_workers(app, 1, a)
        tasks = [await app.add_task("slow", i, 0.8) for i in range(12)]
        with anyio.fail_after(10):
            while not counts(a.ledger, "start"):  # noqa: ASYNC110 - the ledger is a file
                await anyio.sleep(0.02)
        a.kill()
        started_by_a = set(counts(a.ledger, "start"))
        assert started_by_a
        b = Worker(redis_url, prefix, tmp_path, lease=1.0, concurrency=4, name="b")
        for i, task in enumerate(tasks):
            done = await app.wait(task.uuid, timeout=30)
            assert (done.status, done.returning) == (TaskStatus.SUCCESS, i)
        starts, ends = counts(a.ledger, "start"), counts(a.ledger, "end")
        for i in range(12):
            assert ends[i] >= 1
            if i in started_by_a:
                assert starts[i] <= 2, (i, starts[i])  # the killed attempt, at most once more
            else:
                assert starts[i] == 1, (i, starts[i])
        assert any(starts[i] == 2 for i in started_by_a), "a killed task was not re-run"
        # Each task a began and b finished keeps a's attempt, as a left it (AttemptLog): a
        # 'process' record of a's worker. (A task a began but had not started yet has one
        # too; a task only b ran has none.)
        storage = app.storage
        assert isinstance(storage, AttemptLog)
        for i, task in enumerate(tasks):
            kept = await storage.attempts(task.uuid)
            final = await app.wait(task.uuid, timeout=1)
            if starts[i] == 2:
                assert len(kept) == 1, (i, kept)
            assert len(kept) <= 1, (i, kept)
            for lost in kept:
                assert (lost.status, lost.attempt, lost.uuid) == (TaskStatus.PROCESS, 1, task.uuid)
                assert lost.worker is not None and lost.worker != final.worker
        # The ack follows the final save (which woke us): give it its moment, then check.
        stats = await settled(app)
        assert (stats.in_flight, stats.ready_by_priority, stats.dead_letters) == (0, {}, 0)
    finally:
        a.stop()
        if b is not None:
            assert b.stop() == 0, b.output()
        await app.aclose()


async def test_task_three_times_longer_than_lease_runs_once(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    app = build(redis_url, prefix)
    await app.start()
    workers = [
        Worker(redis_url, prefix, tmp_path, lease=0.5, concurrency=2, name=f"w{n}")
        for n in range(2)
    ]
    try:
        await wait_workers(app, 2, *workers)
        tasks = [await app.add_task("slow", i, 1.5) for i in range(3)]
        tasks.append(await app.add_task("blocking_slow", 3, 1.5))
        for i, task in enumerate(tasks):
            done = await app.wait(task.uuid, timeout=20)
            assert (done.status, done.returning, done.attempt) == (TaskStatus.SUCCESS, i, 1)
        ledger = workers[0].ledger
        assert counts(ledger, "start") == {0: 1, 1: 1, 2: 1, 3: 1}
        assert counts(ledger, "end") == {0: 1, 1: 1, 2: 1, 3: 1}
    finally:
        for worker in workers:
            assert worker.stop() == 0, worker.output()
        for worker in workers:
            assert "lease" not in worker.output(), worker.output()
        await app.aclose()


async def test_redis_restart_under_load_loses_nothing(prefix: str, tmp_path: Path) -> None:
    server = start_server(tmp_path)
    app = build(server.url, prefix)
    worker: Worker | None = None
    try:
        await app.start()
        worker = Worker(server.url, prefix, tmp_path, lease=2.0, concurrency=10)
        await wait_workers(app, 1, worker)
        acked: dict[str, int] = {}
        unknown = 0
        for i in range(300):
            if i == 100:
                server.kill()
                # Redis stays down until the worker has noticed and logged it.
                with anyio.fail_after(30):
                    while "unreachable" not in worker.output():  # noqa: ASYNC110 - a log file
                        await anyio.sleep(0.05)
                    await anyio.to_thread.run_sync(server.start)
            try:
                task = await app.add_task("noop", i)
            except Exception:
                unknown += 1  # the outcome of this enqueue is unknown: not counted
            else:
                acked[task.uuid] = i
            await anyio.sleep(0.002)  # a steady load, not a burst
        for uuid, i in acked.items():
            done = await app.wait(uuid, timeout=30)
            assert (done.status, done.returning) == (TaskStatus.SUCCESS, i * 2)
        assert worker.proc.poll() is None, "the worker died instead of reconnecting"
        assert len(acked) + unknown == 300
        assert "is back" in worker.output()
    finally:
        if worker is not None:
            assert worker.stop() == 0, worker.output()
        await app.aclose()
        server.close()


async def test_10000_tasks_across_three_workers(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    app = build(redis_url, prefix)
    await app.start()
    workers = [Worker(redis_url, prefix, tmp_path, concurrency=10, name=f"w{n}") for n in range(3)]
    total = 10_000
    uuids: dict[int, str] = {}
    try:
        await wait_workers(app, 3, *workers)

        async def produce(start: int) -> None:
            for i in range(start, total, 20):
                uuids[i] = (await app.add_task("noop", i)).uuid

        with anyio.fail_after(240):
            async with anyio.create_task_group() as tg:
                for start in range(20):
                    tg.start_soon(produce, start)
            while (await app.storage.stats()).get("success", 0) < total:  # noqa: ASYNC110
                await anyio.sleep(0.2)
        assert await app.storage.stats() == {"success": total}
        limiter = anyio.Semaphore(50)

        async def check(i: int) -> None:
            async with limiter:
                record = await app.storage.get(uuids[i])
            assert record is not None
            assert (record.status, record.returning) == (TaskStatus.SUCCESS, i * 2)

        async with anyio.create_task_group() as tg:
            for i in range(total):
                tg.start_soon(check, i)
        ends = counts(workers[0].ledger, "end")
        assert len(ends) == total
        assert max(ends.values()) == 1, "a task ran twice without any fault"
        pids = {pid for _, _, pid in ledger(workers[0].ledger)}
        assert len(pids) == 3, "every worker took a share"
        stats = await settled(app)
        assert (stats.in_flight, stats.ready_by_priority, stats.delayed) == (0, {}, 0)
        assert stats.dead_letters == 0
    finally:
        for worker in workers:
            assert worker.stop() == 0, worker.output()
        await app.aclose()


async def test_poison_written_into_redis_is_dead_lettered(redis_url: str, prefix: str) -> None:
    app = build(redis_url, prefix)
    raw = aioredis.Redis.from_url(redis_url)
    assert isinstance(app.broker, RedisBroker)
    keys = dict(zip(KEY_NAMES, app.broker.keys, strict=True))
    poison = {
        "bad-bytes": b"\xff\xfe\x00not json",
        "unknown-task": json.dumps(
            {"uuid": "unknown-task", "task": "nope", "args": [], "kwargs": {}}
        ).encode(),
        "missing-fields": b'{"uuid": "missing-fields"}',
        "wrong-args": json.dumps(
            {"uuid": "wrong-args", "task": "noop", "args": [1, 2, 3], "kwargs": {}}
        ).encode(),
        # Runnable but for its version (it ran, fields read as version 1's).
        "future-version": json.dumps(
            {"v": 7, "uuid": "future-version", "task": "noop", "args": [1], "kwargs": {}}
        ).encode(),
    }
    try:
        async with app:
            for n, (id, body) in enumerate(poison.items()):
                await raw.hset(keys["body"], id, body)
                await raw.hset(keys["meta"], id, "0")
                await raw.zadd(keys["ready"], {id: n + 1})
                await raw.rpush(keys["notify"], "1")
            # A good message whose stored record is garbage (written by something else).
            unreadable = json.dumps(
                {"uuid": "unreadable-record", "task": "noop", "args": [1], "kwargs": {}}
            ).encode()
            await raw.hset(
                f"{{{prefix}:rec}}:r:unreadable-record", mapping={"d": "{not json", "s": "new"}
            )
            await raw.hset(keys["body"], "unreadable-record", unreadable)
            await raw.hset(keys["meta"], "unreadable-record", "0")
            await raw.zadd(keys["ready"], {"unreadable-record": len(poison) + 1})
            await raw.rpush(keys["notify"], "1")
            poison["unreadable-record"] = unreadable
            good = await app.add_task("noop", 5, timeout=5)
            assert good.returning == 10
            with anyio.fail_after(5):
                while len(await app.broker.dead_letters()) < len(poison):  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            letters = {x.id: x for x in await app.broker.dead_letters()}
            assert set(letters) == set(poison)
            assert "undecodable" in letters["bad-bytes"].reason
            assert letters["bad-bytes"].body == poison["bad-bytes"]
            assert "nope" in letters["unknown-task"].reason
            assert "missing" in letters["missing-fields"].reason
            assert "argument" in letters["wrong-args"].reason
            assert letters["future-version"].reason == (
                "undecodable message: unsupported message version 7 (this qtasks reads version 1)"
            )
            assert letters["future-version"].body == poison["future-version"]
            assert "record unreadable" in letters["unreadable-record"].reason
            again = await app.add_task("noop", 6, timeout=5)
            assert again.returning == 12
    finally:
        await raw.aclose()


@pytest.mark.reliability
async def test_a_task_that_kills_its_worker_takes_no_innocent_with_it(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """A task that SIGKILLs its worker process every time it runs, among 300 no-op tasks, on
    two workers (concurrency 5, lease 1 s, max_deliveries 3) that a supervisor (the test)
    restarts when they die. The poison runs exactly max_deliveries times and is dead-lettered
    with the delivery-limit reason; every other task succeeds and none is dead-lettered.

    Before suspects were claimed alone, the messages a killed worker held came back with the
    poison when their leases ran out, were claimed with it in one batch, and died with it
    each time: a few innocents were dead-lettered beside it in every run."""
    limit, n, poison = 3, 300, 1_000_000
    settings: dict[str, object] = {"max_deliveries": limit}
    app = build(redis_url, prefix, lease=1.0, max_deliveries=limit)
    await app.start()
    workers = Workers(redis_url, prefix, tmp_path, lease=1.0, concurrency=5, config=settings)
    restarts = 0
    live = [workers.start(), workers.start()]
    try:
        await wait_workers(app, 2, *live)
        # In one publish, the poison among the first: claimed in a batch with others.
        signatures = [app.signature("noop", (i,)) for i in range(n)]
        signatures.insert(3, app.signature("suicide", (poison,)))
        tasks = await app.add_tasks(signatures)
        bad = tasks.pop(3)
        ledger_path = tmp_path / "ledger.txt"

        async def done() -> bool:
            # Every message ended: succeeded or dead-lettered, the poison at least.
            dead = len(await app.broker.dead_letters())
            return dead > 0 and (await app.storage.stats()).get("success", 0) + dead >= n + 1

        with anyio.fail_after(60):
            while not await done():
                restarts += workers.replace_dead(live)  # killed by the poison: restart it
                await anyio.sleep(0.05)
        runs = counts(ledger_path, "start")[poison]
        letters = await app.broker.dead_letters()
        assert [letter.id for letter in letters] == [bad.uuid], [
            (letter.id, letter.reason) for letter in letters
        ]
        assert "delivery limit" in letters[0].reason, letters[0].reason
        assert runs == limit, f"the poison ran {runs} times"
        assert restarts >= limit - 1
        ended = counts(ledger_path, "end")
        assert set(ended) == set(range(n)), "a task never ran to its end"
        for task in tasks:
            record = await app.storage.get(task.uuid)
            assert record is not None and record.status is TaskStatus.SUCCESS, record
        stats = await settled(app)
        assert (stats.in_flight, stats.ready_by_priority, stats.dead_letters) == (0, {}, 1)
    finally:
        for proc in live:
            proc.stop()
        await app.aclose()
    for proc in live:
        assert not proc.problems(), proc.output()
