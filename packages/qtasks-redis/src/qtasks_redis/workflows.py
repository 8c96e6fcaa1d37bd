"""The Redis storage's :class:`~qtasks.components.WorkflowStore` calls (keys and scripts in
:mod:`qtasks_redis.workflow_lua`)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from qtasks.components import GateMessage
from qtasks.errors import StorageConnectionError
from qtasks.record import TaskRecord
from qtasks.workflows.plan import failure
from qtasks_redis import storage_lua
from qtasks_redis import workflow_lua as lua
from qtasks_redis.connection import RedisTarget
from qtasks_redis.connection import guarded as _guarded

if TYPE_CHECKING:
    from qtasks_redis.storage import RedisStorage

T = TypeVar("T")

CHUNK = 1000
"""Records (or feeds) written per pipeline or script call."""


async def guarded(target: RedisTarget, call: Awaitable[T]) -> T:
    return await _guarded(target, call, StorageConnectionError)


def workflow_keys(storage: RedisStorage, workflow: str) -> list[str]:
    """Keys c, m, n, b, a of ``workflow`` (see :mod:`qtasks_redis.workflow_lua`)."""
    return [f"{storage.key_tag}:f:{workflow}:{kind}" for kind in "cmnba"]


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
    # The records last: the workflow's first, so a member never exists without it.
    await add_many(storage, [workflow, *members])


async def add_many(storage: RedisStorage, records: Sequence[TaskRecord]) -> None:
    """The storage's SAVE (replacing) of every record, one pipeline per :data:`CHUNK`."""
    client = storage._require()
    await guarded(storage.target, client.script_load(storage_lua.SAVE.source))
    for start in range(0, len(records), CHUNK):
        pipe = client.pipeline(transaction=False)
        for record in records[start : start + CHUNK]:
            rkeys, rargs = storage._save_call(record, None, "1")
            pipe.evalsha(storage_lua.SAVE.sha, len(rkeys), *rkeys, *rargs)
        await guarded(storage.target, pipe.execute())


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
