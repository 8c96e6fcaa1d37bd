"""RedisStorage's StorageQuery indexes against the real Redis: what the contract suite cannot
see from outside (stale entries pruned, index keys expiring with their records)."""

from __future__ import annotations

import json
import random
import time
from contextlib import AsyncExitStack
from dataclasses import replace

import anyio
import pytest
import redis.asyncio as aioredis
from test_redis_storage import make_storage

from qtasks.components import SCAN_BUDGET, RecordQuery
from qtasks.record import TaskRecord, TaskStatus
from qtasks_redis import storage as redis_storage

pytestmark = pytest.mark.anyio


async def client(stack: AsyncExitStack, url: str) -> aioredis.Redis:
    raw = aioredis.Redis.from_url(url)
    stack.push_async_callback(raw.aclose)
    return raw


def done(rec: TaskRecord, status: TaskStatus = TaskStatus.SUCCESS) -> TaskRecord:
    final = rec.copy()
    final.status = status
    return final


async def test_an_entry_whose_record_is_gone_is_skipped_and_pruned(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    storage = await make_storage(stack, redis_url, prefix)
    raw = await client(stack, redis_url)
    records = [TaskRecord(uuid=uuid, task_name="t") for uuid in ("kept", "lost", "gone")]
    for rec in records:
        await storage.add(rec)
    await storage.save(done(records[2]))
    for uuid in ("lost", "gone"):
        await raw.delete(storage.record_key(uuid))  # evicted, or deleted by hand
    new_index, success_index = storage.index_keys[0], storage.index_keys[2]
    name_index = f"{storage.key_tag}:nf:t"
    assert await raw.zscore(new_index, "lost") is not None
    assert await raw.zscore(name_index, "gone") is not None
    for query in (RecordQuery(), RecordQuery(task_name="t")):
        page = await storage.query(query)
        assert [r.uuid for r in page.records] == ["kept"]
    assert await raw.zscore(new_index, "lost") is None
    assert await raw.zscore(name_index, "gone") is None
    assert await raw.zscore(success_index, "gone") is None
    assert await raw.zscore(new_index, "kept") is not None


async def test_the_name_index_holds_final_records_only(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    storage = await make_storage(stack, redis_url, prefix, result_ttl=30.0)
    raw = await client(stack, redis_url)
    rec = TaskRecord(uuid="u1", task_name="job")
    await storage.add(rec)
    tag = storage.key_tag
    assert not await raw.exists(f"{tag}:nf:job")  # a new record costs no name index write
    listed = await storage.query(RecordQuery(task_name="job"))
    assert [r.uuid for r in listed.records] == ["u1"]
    await storage.save(done(rec))
    assert 0 < await raw.pttl(storage.record_key("u1")) <= 30_000
    assert await raw.zscore(f"{tag}:nf:job", "u1") is not None
    # A deliberate reset (add) takes it out of the final records again.
    await storage.add(rec)
    assert await raw.zscore(f"{tag}:nf:job", "u1") is None
    page = await storage.query(RecordQuery(task_name="job"))
    assert [(r.uuid, r.status) for r in page.records] == [("u1", TaskStatus.NEW)]


async def test_final_writes_prune_the_entries_of_expired_records(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    """Without any query, writes of final records drop the index entries of records that
    expired (some of the writes: one server millisecond in 16), so the indexes stay bounded."""
    storage = await make_storage(stack, redis_url, prefix, result_ttl=0.2)
    raw = await client(stack, redis_url)
    first = TaskRecord(uuid="a", task_name="job")
    await storage.add(first)
    await storage.save(done(first, TaskStatus.ERROR))
    with anyio.fail_after(3):
        while await raw.exists(storage.record_key("a")):  # noqa: ASYNC110 - remote expiry
            await anyio.sleep(0.02)
    error_index, name_index = storage.index_keys[3], f"{storage.key_tag}:nf:job"
    writes = 0
    with anyio.fail_after(10):
        while (
            await raw.zscore(error_index, "a") is not None
            or await raw.zscore(name_index, "a") is not None
        ):
            writes += 1
            later = TaskRecord(uuid=f"b{writes}", task_name="job")
            await storage.add(later)
            await storage.save(done(later, TaskStatus.ERROR))
    assert writes >= 1


async def test_cancel_enters_the_name_index_of_final_records(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    storage = await make_storage(stack, redis_url, prefix)
    raw = await client(stack, redis_url)
    await storage.add(TaskRecord(uuid="c1", task_name="slow", args=[{"deep": [1, 2]}]))
    await storage.cancel("c1", "no longer needed")
    assert await raw.zscore(f"{storage.key_tag}:nf:slow", "c1") is not None
    page = await storage.query(RecordQuery(task_name="slow", status=TaskStatus.CANCEL))
    assert [(r.uuid, r.cancel_reason) for r in page.records] == [("c1", "no longer needed")]


async def test_a_scan_is_bounded_and_resumes_from_its_cursor(
    redis_url: str, prefix: str, stack: AsyncExitStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filter no index serves (a uuid prefix) looks at a bounded number of entries per
    call once its time is up; the cursor carries on from there. Before its time is up it
    goes on while it found nothing, and a whole uuid is looked up."""
    storage = await make_storage(stack, redis_url, prefix)
    needle = TaskRecord(uuid="ffff-needle", task_name="t")
    await storage.add(needle)
    await anyio.sleep(0.005)
    hay = [TaskRecord(uuid=f"a{i:07d}", task_name="t") for i in range(12_000)]
    for start in range(0, len(hay), 500):
        async with anyio.create_task_group() as tg:
            for rec in hay[start : start + 500]:
                tg.start_soon(storage.add, rec)
    whole = await storage.query(RecordQuery(uuid_prefix="ffff-needle"))
    assert [r.uuid for r in whole.records] == ["ffff-needle"]
    started = time.monotonic()
    searched = await storage.query(RecordQuery(uuid_prefix="ffff"))
    if not searched.records:  # the budget ran out first (a slow machine): a cursor says so
        assert searched.cursor is not None
        assert time.monotonic() - started >= SCAN_BUDGET
    else:
        assert [r.uuid for r in searched.records] == ["ffff-needle"]
    # scan_budget=0 ends after the first step (10,000 entries), found or not.
    quick = await storage.query(RecordQuery(uuid_prefix="ffff", scan_budget=0))
    assert quick.records == []
    assert quick.cursor is not None
    rest = RecordQuery(uuid_prefix="ffff", scan_budget=0, cursor=quick.cursor)
    assert [r.uuid for r in (await storage.query(rest)).records] == ["ffff-needle"]
    monkeypatch.setattr(redis_storage, "SCAN_BUDGET", 0.0)
    first = await storage.query(RecordQuery(uuid_prefix="ffff"))
    assert first.records == []
    assert first.cursor is not None
    second = await storage.query(RecordQuery(uuid_prefix="ffff", cursor=first.cursor))
    assert [r.uuid for r in second.records] == ["ffff-needle"]


async def test_records_of_format_1_are_still_read(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    """Records stored before ``started_at`` existed (format 1) read back without it; new
    writes use format 2, which keeps it."""
    storage = await make_storage(stack, redis_url, prefix)
    raw = await client(stack, redis_url)
    old = [1, "old", "job", "new", 0, [1], {"k": "v"}, None, None, None, 1.5, 2.5]
    old += [0, 0, None, None, None, None, None, 0]
    await raw.hset(storage.record_key("old"), mapping={"d": json.dumps(old), "s": "new", "t": ""})
    stored = await storage.get("old")
    assert stored is not None
    assert (stored.task_name, stored.args, stored.created_at, stored.started_at) == (
        "job",
        [1],
        1.5,
        None,
    )
    stored.started_at = 7.25
    await storage.save(stored)
    again = await storage.get("old")
    assert again is not None and again.started_at == 7.25
    written = await raw.hget(storage.record_key("old"), "d")
    assert written is not None and json.loads(written)[0] == 2


async def test_add_many_indexes_what_add_indexes(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    """A batch of new records none of which is stored takes add_many's fast path (one HSET
    each); a batch that meets a stored record goes record by record. Both leave the status
    and parent indexes as add does, and a final record made new again loses its expiry."""
    storage = await make_storage(stack, redis_url, prefix, result_ttl=30.0)
    raw = await client(stack, redis_url)
    fresh = [TaskRecord(uuid=f"f{i}", task_name="t", parent_uuid="p") for i in range(3)]
    await storage.add_many(fresh)
    assert await storage.stats() == {"new": 3}
    children = await storage.query(RecordQuery(parent_uuid="p"))
    assert sorted(r.uuid for r in children.records) == ["f0", "f1", "f2"]
    assert await raw.pttl(f"{storage.key_tag}:np:p") > 0
    assert await storage.save(done(fresh[0])) is True
    assert await raw.pttl(storage.record_key("f0")) > 0
    again = [TaskRecord(uuid="f0", task_name="t"), TaskRecord(uuid="x", task_name="t")]
    await storage.add_many(again)
    assert await storage.stats() == {"new": 4}
    assert await raw.pttl(storage.record_key("f0")) == -1
    assert [await storage.get(r.uuid) for r in again] == again


async def test_a_scan_of_several_indexes_lists_each_record_once_in_order(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    """A uuid prefix scans the union of the status indexes, each read a batch (1,000) at a
    time, what was read and not yet listed kept for the next batch: across batches, ties (the
    records of one bulk write share a millisecond), pages and a time range, every matching
    record is listed once, newest first."""
    storage = await make_storage(stack, redis_url, prefix)
    raw = await client(stack, redis_url)
    # Two keys of more than a batch, uneven and irregular: their batches end at unrelated
    # places.
    statuses = random.Random(7).choices(
        (TaskStatus.NEW, TaskStatus.SUCCESS, TaskStatus.ERROR), weights=(4, 5, 1), k=9_000
    )
    records = [  # one in 7 matches the prefix: a page scans several batches
        TaskRecord(uuid=f"{'q' if i % 7 else 'p'}{i:05d}", task_name="t", status=status)
        for i, status in enumerate(statuses)
    ]
    for start in range(0, len(records), 3_000):
        await storage.add_many(records[start : start + 3_000])
        await anyio.sleep(0.002)
    pipe = raw.pipeline(transaction=False)
    for rec in records:
        pipe.zscore(
            storage.index_keys[[s.value for s in TaskStatus].index(rec.status.value)], rec.uuid
        )
    scores = await pipe.execute()
    assert None not in scores
    every = sorted(zip(scores, (rec.uuid for rec in records), strict=True), reverse=True)
    scored = [(score, uuid) for score, uuid in every if uuid.startswith("p")]
    assert len({score for score, _ in scored}) < len(scored) / 100, "no ties to walk through"

    async def listed(query: RecordQuery) -> list[str]:
        out: list[str] = []
        while True:
            page = await storage.query(query)
            out += [r.uuid for r in page.records]
            if page.cursor is None:
                return out
            query = replace(query, cursor=page.cursor)

    assert await listed(RecordQuery(uuid_prefix="p", limit=300)) == [u for _, u in scored]
    middle = scored[len(scored) // 2][0]
    since = await listed(RecordQuery(uuid_prefix="p", since=middle / 1000, limit=111))
    assert since == [u for s, u in scored if s >= middle]
    until = await listed(RecordQuery(uuid_prefix="p", until=middle / 1000, limit=200))
    assert until == [u for s, u in scored if s < middle]
