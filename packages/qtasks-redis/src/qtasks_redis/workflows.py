"""The Redis storage's :class:`~qtasks.components.WorkflowStore` calls (keys and scripts in
:mod:`qtasks_redis.workflow_lua`)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from qtasks.components import GateMessage
from qtasks.errors import StorageConnectionError
from qtasks.record import TaskRecord, TaskStatus
from qtasks.workflows.plan import failure
from qtasks_redis import workflow_lua as lua
from qtasks_redis.connection import RedisTarget
from qtasks_redis.failures import guarded as _guarded

if TYPE_CHECKING:
    from qtasks_redis.storage import RedisStorage

T = TypeVar("T")

CHUNK = 1000
"""Records (or feeds) written per pipeline or script call."""


async def guarded(target: RedisTarget, call: Awaitable[T]) -> T:
    return await _guarded(target, call, StorageConnectionError)


def workflow_keys(storage: RedisStorage, workflow: str, kinds: str = "cmnba") -> list[str]:
    """Keys of ``workflow`` (default c, m, n, b, a; see :mod:`qtasks_redis.workflow_lua`)."""
    return [f"{storage.key_tag}:f:{workflow}:{kind}" for kind in kinds]


def index_key(storage: RedisStorage) -> str:
    """The ZSET of every workflow: id -> µs created (see :mod:`qtasks_redis.workflow_lua`)."""
    return f"{storage.key_tag}:wf"


def error_text(record: TaskRecord) -> str:
    """The workflow error a failing member ``record`` would write ('' for a success)."""
    return "" if record.status.value == "success" else failure(record)


async def add_workflow(
    storage: RedisStorage,
    workflow: TaskRecord,
    members: Sequence[TaskRecord],
    gates: dict[str, tuple[int, list[GateMessage]]],
    feeds: dict[str, str],
) -> None:
    client = storage._require()
    target = storage.target
    keys = workflow_keys(storage, workflow.uuid)
    args: list[Any] = [workflow.kwargs.get("on_error") or "", len(gates)]
    bodies: list[Any] = []
    for name, (count, messages) in gates.items():
        listed = [[m.id, m.priority, int(m.delay * 1000)] for m in messages]
        args += (name, count, json.dumps(listed))
        for m in messages:
            bodies += (m.id, m.body)
    args += bodies
    args.append("|")
    args += list(feeds)
    await guarded(target, lua.ADD_GATES(client, keys, args))
    pairs = list(feeds.items())
    for start in range(0, len(pairs), CHUNK):
        flat = [item for pair in pairs[start : start + CHUNK] for item in pair]
        await guarded(target, lua.ADD_FEEDS(client, keys[2:3], flat))
    # The records last: the workflow's first, so a member never exists without it; listed
    # once its record exists (a listing, and each workflow added, forgets entries whose
    # record is gone).
    await add_many(storage, [workflow, *members])
    created = int(workflow.created_at * 1_000_000)
    entry = (storage.key_tag, workflow.uuid, created, storage.ttl_ms)
    await guarded(target, lua.INDEX(client, [index_key(storage)], entry))


async def cancel_workflow(storage: RedisStorage, workflow: str, reason: str) -> TaskRecord | None:
    record = await storage.cancel(workflow, reason)
    if record is not None and record.status is TaskStatus.CANCEL:
        # After the record turned final: a member settling from now on only reads them.
        await storage._run(lua.CANCEL_FLOW, workflow, storage.key_tag, storage.ttl_ms, workflow)
    return record


async def failed_member(storage: RedisStorage, workflow: str) -> str | None:
    """Who opened the ``error`` gate (``o`` expires with the workflow's record)."""
    (opened,) = workflow_keys(storage, workflow, "o")
    uuid = await guarded(storage.target, storage._require().hget(opened, "error"))
    return uuid.decode() if isinstance(uuid, bytes) else uuid


async def newest(storage: RedisStorage, limit: int) -> list[TaskRecord]:
    """The newest ``limit`` workflow records; entries of expired ones are removed as met,
    reading at most :data:`_LIST_BATCHES` batches."""
    client, key = storage._require(), index_key(storage)
    out: list[TaskRecord] = []
    start, batch = 0, max(limit, 100)
    for _ in range(_LIST_BATCHES):
        page: Awaitable[Any] = client.zrevrange(key, start, start + batch - 1)
        ids = [i.decode() for i in await guarded(storage.target, page)]
        if not ids:
            break
        records = await storage.get_many(ids)
        gone = [uuid for uuid, record in zip(ids, records, strict=True) if record is None]
        out += [r for r in records if r is not None][: limit - len(out)]
        if gone:
            await guarded(storage.target, client.zrem(key, *gone))
        if len(out) == limit or len(ids) < batch:
            break
        start += batch - len(gone)
    return out


_LIST_BATCHES = 10


async def add_many(storage: RedisStorage, records: Sequence[TaskRecord]) -> None:
    """The storage's SAVE (replacing) of every record: one script call per :data:`CHUNK`
    (:data:`~qtasks_redis.workflow_lua.ADD_MANY`)."""
    for start in range(0, len(records), CHUNK):
        chunk = records[start : start + CHUNK]
        args: list[Any] = [storage.key_tag]
        for record in chunk:
            args += storage._save_args(record, None, "1")
        await storage._run(lua.ADD_MANY, chunk[0].uuid, *args)


async def member_done(storage: RedisStorage, record: TaskRecord) -> list[GateMessage]:
    assert record.workflow is not None
    args = (
        storage.key_tag,
        storage.ttl_ms,
        record.workflow,
        record.uuid,
        record.status.value,
        error_text(record),
    )
    reply = await storage._run(lua.MEMBER_DONE, record.uuid, *args)
    return [
        GateMessage(reply[i].decode(), reply[i + 1], int(reply[i + 2]), int(reply[i + 3]) / 1000)
        for i in range(0, len(reply), 4)
    ]


async def republish(storage: RedisStorage, uuids: Sequence[str]) -> list[int]:
    """:data:`~qtasks_redis.workflow_lua.REPUBLISH` of the records of ``uuids``, one call per
    :data:`CHUNK`."""
    out: list[int] = []
    client = storage._require()
    for start in range(0, len(uuids), CHUNK):
        keys = [storage.record_key(uuid) for uuid in uuids[start : start + CHUNK]]
        reply = await guarded(storage.target, lua.REPUBLISH(client, keys, (), len(keys)))
        out += [int(g) for g in reply]
    return out
