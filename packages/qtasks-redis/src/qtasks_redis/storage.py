"""The Redis storage: task records with fenced writes, woken waiters and live steps.

Over ~500 lines: the storage's Python side around its Lua scripts (record encoding,
waiters, steps, queries); the scripts are in ``storage_lua``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import operator
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import fields
from typing import Any, Self, TypeVar, cast

import anyio
import anyio.abc
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from qtasks import stopping
from qtasks.components import SCAN_BUDGET, GateMessage, RecordPage, RecordQuery
from qtasks.config import QueueConfig
from qtasks.errors import (
    InvalidQueryError,
    SerializationError,
    StorageConnectionError,
    TaskTimeoutError,
)
from qtasks.messages import json_decoder, strict_json_encoder
from qtasks.record import TaskRecord, TaskStatus
from qtasks.steps import StepsRestarted
from qtasks_redis import storage_lua as lua
from qtasks_redis import workflows
from qtasks_redis.connection import (
    DEFAULT_URL,
    Client,
    RedisTarget,
    Script,
    SharedClient,
    check_options,
    common_options,
    delete_matching,
    glob_escape,
)
from qtasks_redis.failures import guarded as _guarded
from qtasks_redis.lane import Lane
from qtasks_redis.union import IndexUnion
from qtasks_redis.watch import key_watch

_FIELDS = tuple(f.name for f in fields(TaskRecord))
_FIELD_SET = frozenset(_FIELDS)
_V1 = (
    "uuid",
    "task_name",
    "status",
    "priority",
    "args",
    "kwargs",
    "returning",
    "traceback",
    "error",
    "created_at",
    "updated_at",
    "attempt",
    "retries",
    "eta",
    "parent_uuid",
    "cancel_reason",
    "worker",
    "token",
    "steps",
)
"""Fields of a stored record (``d``), format 1: the JSON array ``[1, <these values>]``.
Positional, so encoding and decoding skip the names (about half the cost of a JSON object);
the order is fixed here, not taken from :class:`TaskRecord`, so the stored format changes only
on purpose (a new format gets a new number; objects, the earlier format, are still read)."""
_V1_STATUS = _V1.index("status")
_V2 = (*_V1, "started_at", "workflow")
"""Format 2, ``[2, <these values>]``: format 1, ``started_at`` (for qtasks-web's timings) and
``workflow`` (the workflow a task is a member of); format 1 is still read, without them.
``workflow`` stays last: the workflow scripts read it as the array's last element."""
_V2_GET = operator.attrgetter(*_V2)
_V2_POSITIONAL = _V2 == _FIELDS
_LAYOUTS = {1: _V1, 2: _V2}
RECORD_KEYS = 3
"""Keys of one record (rec, wake, steps) at the head of every script's keys; the status
indexes after them are the same for every record."""
_RECORD_FIELDS = ("d", "s", "t", "cr", "u", "n", "a", "w", "e", "b")
"""Hash fields read back into a record, in :meth:`RedisStorage._record`'s order (scripts
return the first eight; ``e``, the error written when a message is dead-lettered, and ``b``,
when the run it ended began, are read by :meth:`RedisStorage.get` and waiters)."""
_PROCESS = b"process"
"""A running record's status, as stored."""
_DEAD_LETTER = b"dead-letter"
"""The token of a record a dead letter ended, as stored (``qtasks.poison.DEAD_LETTER_TOKEN``,
which the claim scripts write too)."""
_BLOCK_CAP = 10.0
"""Longest single block before the record is read again (a safety net, not a poll)."""


T = TypeVar("T")


async def guarded(target: RedisTarget, call: Awaitable[T]) -> T:
    """:func:`qtasks_redis.connection.guarded`, raising :class:`StorageConnectionError`."""
    return await _guarded(target, call, StorageConnectionError)


_BATCH = 1000
"""Most records or deliveries in one batched script call."""
_SCAN = 10_000
"""Most index entries one :meth:`RedisStorage.query` call looks at once it found a record
(until then it goes on for its scan budget)."""
_TOP = "r:top"
"""The cursor of a page that starts at the newest entry: after a first page filled by the
record whose whole uuid the prefix is."""
_SCORE = re.compile(r"-?[0-9]+(\.[0-9]+)?(e[-+][0-9]+)?", re.ASCII)
"""A cursor's score, as ``repr`` writes a finite float."""
_FINAL_STATUSES = frozenset(status.value for status in TaskStatus if status.final)


def _field(flat: list[bytes], name: bytes) -> bytes:
    """The value of ``name`` in a stream entry's flat field list (``XRANGE``'s reply)."""
    for i in range(0, len(flat) - 1, 2):
        if flat[i] == name:
            return flat[i + 1]
    return b""


_FINAL_BYTES = frozenset(status.encode() for status in _FINAL_STATUSES)
_WAIT_CONNECTIONS = 16
"""Waits of one lane that block on connections of their own (``redis_wait_connections``)."""
_FEED_IDLE = 5.0
"""Seconds the cancel feed waits for a message before it looks again (no round trip)."""

log = logging.getLogger("qtasks.redis.storage")

_encode_json = strict_json_encoder()
_loads = json_decoder()


def _dumps(value: Any) -> str:
    try:
        return _encode_json(value)
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"cannot store as JSON: {exc}") from exc


class RedisStorage:
    """A Redis-backed :class:`~qtasks.components.Storage`.

    Keys are ``{<prefix>:rec}:<kind>:<uuid>``: one hash tag for all of them, so the fenced save
    can update the per-status index in the same atomic script (on a cluster, records live in one
    slot). Final records, their steps and wake-up lists expire after ``result_ttl``.
    """

    default_url = DEFAULT_URL
    """The address used when no URL is given (logged by the configuration)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str = "qtasks",
        cluster: bool = False,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.target = RedisTarget.parse(url, cluster=cluster)
        self.prefix = prefix
        self._tag = f"{{{prefix}:rec}}"
        self._options = check_options(dict(options or {}))
        self._index_keys = tuple(f"{self._tag}:i:{status}" for status in lua.STATUSES)
        self._channel = f"{self._tag}:cancels"
        self._ttl_ms: str = ""
        self._shared = SharedClient(self.target, "RedisStorage")
        self._wait_connections = _WAIT_CONNECTIONS

    @classmethod
    def from_config(cls, config: QueueConfig) -> Self:
        """Built from ``config.storage_url`` and ``config.extra`` (``redis_prefix``,
        ``redis_cluster`` and client options ``redis_*``)."""
        return cls(config.storage_url, **common_options(config.extra))

    def __repr__(self) -> str:
        return f"RedisStorage({self.target.where}, prefix={self.prefix!r})"

    async def start(self, stack: AsyncExitStack, config: QueueConfig) -> None:
        ttl = config.result_ttl
        self._ttl_ms = "" if ttl is None else str(max(int(ttl * 1000), 1))
        options = {**config.extra, **self._options}
        await self._shared.acquire(stack, options)  # checks them (the app's extra is new here)
        self._wait_connections = int(options.get("redis_wait_connections", _WAIT_CONNECTIONS))

    def _require(self) -> Client:
        """The redis-py client (blocking reads of steps; every path when there is no lane)."""
        return self._shared.get()

    async def flush(self) -> int:
        """Delete every record, step and index of this prefix; return how many keys (for
        ``app.flush_all``)."""
        return await delete_matching(self.target, self._require(), glob_escape(self._tag) + ":*")

    @property
    def index_keys(self) -> tuple[str, ...]:
        """Keys of the per-status indexes (new, process, success, error, cancel, retry,
        expired)."""
        return self._index_keys

    @property
    def key_tag(self) -> str:
        """The hash tag of every key: a task's keys are ``<tag>:r:<uuid>`` (record),
        ``<tag>:w:<uuid>`` (wake-ups) and ``<tag>:s:<uuid>`` (steps)."""
        return self._tag

    @property
    def ttl_ms(self) -> str:
        """``result_ttl`` in milliseconds as the scripts take it (``""`` for none); set at
        start."""
        return self._ttl_ms

    def record_key(self, uuid: str) -> str:
        """Key of the hash that holds the record of ``uuid``."""
        return f"{self._tag}:r:{uuid}"

    def decode_record(self, fields: list[bytes | None]) -> TaskRecord | None:
        """A record from its hash fields ``[d, s, t, cr, u, n, a, w]`` as the scripts return
        them; ``None`` when there is none. Raises :class:`SerializationError` when invalid."""
        return self._record(fields)

    def _keys(self, uuid: str) -> tuple[str, ...]:
        tag = self._tag
        return (f"{tag}:r:{uuid}", f"{tag}:w:{uuid}", f"{tag}:s:{uuid}", *self._index_keys)

    async def _run(self, script: Script, uuid: str, *args: Any) -> Any:
        keys = self._keys(uuid)
        return await guarded(self.target, script(self._shared.fast(), keys, args, RECORD_KEYS))

    @staticmethod
    def _record(fields: list[bytes | None]) -> TaskRecord | None:
        """Rebuild from ``[d, s, t, cr, u, n, a, w]`` (and ``e``, ``b`` when given), applying
        the fields that override ``d``."""
        data, status, token, reason, updated, steps, attempt, worker = fields[:8]
        if data is None:
            return None
        try:
            stored = _loads(data.decode())
            if type(stored) is list and stored and stored[0] in _LAYOUTS:
                values = stored[1:]
                values[_V1_STATUS] = TaskStatus(
                    status.decode() if status is not None else values[_V1_STATUS]
                )
                record = (
                    TaskRecord(*values)
                    if _V2_POSITIONAL and len(values) == len(_V2)
                    else TaskRecord(**dict(zip(_LAYOUTS[stored[0]], values, strict=True)))
                )
            else:  # the earlier format: a JSON object of the fields
                named = {k: v for k, v in stored.items() if k in _FIELD_SET}
                named["status"] = TaskStatus(
                    status.decode() if status is not None else named.get("status", "new")
                )
                record = TaskRecord(**named)
        except (TypeError, ValueError, AttributeError, IndexError) as exc:
            raise SerializationError(f"stored task record is not valid: {exc}") from exc
        try:
            # The fields a script writes beside 'd' ('a' from a message's attempt): one
            # that does not read is an invalid record too, not an error of the caller's
            # (a claim's reply that raised it stopped the worker's consumer).
            if reason is not None:
                record.cancel_reason = reason.decode()
            if updated is not None:
                record.updated_at = float(updated)
                if status == _PROCESS:
                    # The run under way began when it was begun ('u'); 'd' may still hold the
                    # started_at of the run a retry ended.
                    record.started_at = record.updated_at
            if steps is not None:
                record.steps = int(steps)
            if attempt is not None:
                record.attempt = int(attempt)
            if len(fields) > 8 and fields[8] is not None:
                record.error = fields[8].decode()
                # A claim dead-lettered it over a run that began and was lost with its worker:
                # when that run began (its 'u' as begun). Read with 'e' only; a later save (a
                # requeue's reset too) deletes both.
                if len(fields) > 9 and fields[9] is not None and token == _DEAD_LETTER:
                    record.started_at = float(fields[9])
            if worker is not None:
                record.worker = worker.decode()
            record.token = token.decode() if token else None
        except (TypeError, ValueError, AttributeError) as exc:
            raise SerializationError(f"stored task record is not valid: {exc}") from exc
        return record

    @staticmethod
    def _encode(record: TaskRecord) -> str:
        """``d`` of ``record``: format 2 (see ``_V2``), not ``to_dict()``, which deep-copies
        every value and names every field."""
        values: list[Any] = [2, *_V2_GET(record)]
        values[_V1_STATUS + 1] = record.status.value
        return _dumps(values)

    def _save_call(
        self, record: TaskRecord, fence: str | None, force: str
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Keys and arguments of the SAVE script for ``record`` (also run folded into a broker
        script, see :mod:`qtasks_redis.shared_lua`). ``force``: ``"1"`` replace, ``"0"``
        fenced/final checks, ``"n"`` only when no record is stored."""
        return self._keys(record.uuid), self._save_args(record, fence, force)

    def _save_args(self, record: TaskRecord, fence: str | None, force: str) -> tuple[str, ...]:
        """The arguments of :meth:`_save_call`, for the scripts that save many records (their
        keys are the first record's)."""
        return (
            record.uuid,
            self._encode(record),
            record.status.value,
            record.token or "",
            "0" if fence is None else "1",
            fence or "",
            force,
            self._ttl_ms,
            record.task_name,
            record.parent_uuid or "",
        )

    async def _save(self, record: TaskRecord, fence: str | None, force: str) -> bool:
        keys, args = self._save_call(record, fence, force)
        reply = await guarded(self.target, lua.SAVE(self._shared.fast(), keys, args, RECORD_KEYS))
        return bool(reply == 1)

    async def add(self, record: TaskRecord, *, replace: bool = True) -> None:
        await self._save(record, None, "1" if replace else "n")

    async def get(self, uuid: str) -> TaskRecord | None:
        key = f"{self._tag}:r:{uuid}"
        client = self._shared.fast()
        call = (
            client.command("HMGET", key, *_RECORD_FIELDS)
            if isinstance(client, Lane)
            else client.hmget(key, _RECORD_FIELDS)
        )
        fields: Any = await guarded(self.target, call)
        return self._record(fields)

    async def get_many(self, uuids: Sequence[str]) -> list[TaskRecord | None]:
        """See :class:`qtasks.components.WorkflowStore`: one pipeline per 1,000 records."""
        client = self._require()
        out: list[TaskRecord | None] = []
        for start in range(0, len(uuids), 1000):
            pipe = client.pipeline(transaction=False)
            for uuid in uuids[start : start + 1000]:
                pipe.hmget(f"{self._tag}:r:{uuid}", _RECORD_FIELDS)
            replies = await guarded(self.target, pipe.execute())
            out += [self._record(fields) for fields in replies]
        return out

    async def add_many(self, records: Sequence[TaskRecord]) -> None:
        """See :class:`qtasks.components.BulkAdd`: one pipeline per 1,000 records."""
        await workflows.add_many(self, records)

    async def add_workflow(
        self,
        workflow: TaskRecord,
        members: Sequence[TaskRecord],
        gates: dict[str, tuple[int, list[GateMessage]]],
        feeds: dict[str, str],
    ) -> None:
        """See :class:`qtasks.components.WorkflowStore` and :mod:`qtasks_redis.workflows`."""
        await workflows.add_workflow(self, workflow, members, gates, feeds)

    async def member_done(self, record: TaskRecord) -> list[GateMessage]:
        """See :class:`qtasks.components.WorkflowStore`: one script."""
        return await workflows.member_done(self, record)

    async def republish(self, uuids: Sequence[str]) -> list[int]:
        """See :class:`qtasks.components.WorkflowStore`: one script per 1,000 records."""
        return await workflows.republish(self, uuids)

    async def cancel_workflow(self, workflow: str, reason: str) -> TaskRecord | None:
        """See :class:`qtasks.components.WorkflowStore`: the storage's cancel, then one
        ``DEL`` of the workflow's keys."""
        return await workflows.cancel_workflow(self, workflow, reason)

    async def failed_member(self, workflow: str) -> str | None:
        """See :class:`qtasks.components.WorkflowStore`: the opener of its ``error`` gate."""
        return await workflows.failed_member(self, workflow)

    async def workflows(self, limit: int = 20) -> list[TaskRecord]:
        """See :class:`qtasks.components.WorkflowStore`: the ``<tag>:wf`` index, a batch at a
        time (one round trip for the ids, one for their records)."""
        return await workflows.newest(self, limit)

    async def begin(self, record: TaskRecord, *, generation: int = 0) -> TaskRecord:
        # The record's JSON is sent only when none is stored (rare: the producer stores one).
        args = [record.uuid, "", record.token or "", record.attempt, record.worker or ""]
        if generation:
            args.append(generation)
        fields = await self._run(lua.BEGIN, record.uuid, *args)
        if fields is None:
            args[1] = self._encode(record)
            fields = await self._run(lua.BEGIN, record.uuid, *args)
        begun = self._record(fields)
        if begun is None:  # pragma: no cover - the script always leaves a record
            raise SerializationError(f"task record {record.uuid} vanished while starting")
        return begun

    async def attempts(self, uuid: str) -> list[TaskRecord]:
        """See :class:`qtasks.components.AttemptLog`: the list ``<tag>:at:<uuid>`` the begin
        scripts write (one ``LRANGE``)."""
        items: Any = await guarded(
            self.target, self._require().lrange(f"{self._tag}:at:{uuid}", 0, -1)
        )
        out: list[TaskRecord] = []
        for item in items:
            try:
                fields = [v.encode() if isinstance(v, str) else None for v in json.loads(item)]
                record = self._record(fields)
            except (ValueError, TypeError, SerializationError):
                log.warning("an attempt of %s is not a valid record; skipped", uuid)
                continue
            if record is not None:
                out.append(record)
        return out

    async def begin_many(self, records: Sequence[TaskRecord]) -> list[TaskRecord]:
        """See :class:`qtasks.components.BeginMany`: one script per 1,000 records (and one
        :meth:`begin` more for each of them that has no stored record, which is rare)."""
        out: list[TaskRecord] = []
        for start in range(0, len(records), _BATCH):
            chunk = records[start : start + _BATCH]
            keys = [f"{self._tag}:r:{record.uuid}" for record in chunk]
            args: list[Any] = []
            for record in chunk:
                args += [record.uuid, record.token or "", record.attempt, record.worker or ""]
            call = lua.BEGIN_MANY(self._shared.fast(), [*keys, *self._index_keys], args, len(keys))
            reply = await guarded(self.target, call)
            for i, record in enumerate(chunk):
                begun = self._record(reply[8 * i : 8 * i + 8])
                out.append(begun if begun is not None else await self.begin(record))
        return out

    async def save(self, record: TaskRecord, *, fence: str | None = None) -> bool:
        return await self._save(record, fence, "0")

    async def cancel(self, uuid: str, reason: str) -> TaskRecord | None:
        done = await self.cancel_from(uuid, reason)
        return None if done is None else done[0]

    async def cancel_from(self, uuid: str, reason: str) -> tuple[TaskRecord, TaskStatus] | None:
        """See :class:`qtasks.components.CancelFrom`: the status before is read in the same
        script."""
        fields = await self._run(lua.CANCEL, uuid, uuid, reason, self._ttl_ms, self._channel)
        record = None if fields is None else self._record(fields[:8])
        if record is None:
            return None
        prior = fields[8]  # none for a record stored without its status field: unknown
        return record, TaskStatus(prior.decode()) if prior else record.status

    async def cancelled(self, uuids: Sequence[str]) -> dict[str, str]:
        """See :class:`qtasks.components.CancelCheck`: one script per 1,000 records."""
        out: dict[str, str] = {}
        for start in range(0, len(uuids), _BATCH):
            chunk = uuids[start : start + _BATCH]
            keys = [f"{self._tag}:r:{uuid}" for uuid in chunk]
            call = lua.CANCELLED(self._shared.fast(), keys, (), len(keys))
            reply = await guarded(self.target, call)
            for i in range(0, len(reply), 2):
                uuid = chunk[int(reply[i]) - 1]
                if reply[i + 1]:
                    out[uuid] = reply[i + 1].decode()
                    continue
                # No ``cr``: the cancel was stored by save() (the worker's own cancel), so
                # its reason is in the record itself; rare, so one more read each.
                stored = await self.get(uuid)
                if stored is not None and stored.status is TaskStatus.CANCEL:
                    out[uuid] = stored.cancel_reason or "cancelled"
        return out

    async def follow_cancels(
        self,
        on_cancel: Callable[[str, str], None],
        *,
        on_live: Callable[[bool], None] | None = None,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """See :class:`qtasks.components.CancelFeed`: Redis pub/sub on ``<tag>:cancels``,
        published by the cancel script itself. Resubscribes after a lost connection (one
        warning per outage). On Redis Cluster there is no feed: cancels reach running tasks
        at their lease renewal."""
        client = self._require()
        if self.target.cluster:
            task_status.started()
            await anyio.sleep_forever()
        started = lost = False
        failures = 0
        while True:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                if on_live is not None:
                    on_live(True)
                if lost:
                    log.warning("cancel feed from Redis at %s is back", self.target.where)
                    lost, failures = False, 0
                if not started:
                    started = True
                    task_status.started()
                while True:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=_FEED_IDLE
                    )
                    if message is not None and message.get("type") == "message":
                        self._feed(message["data"], on_cancel)
            except (RedisError, OSError) as exc:
                if on_live is not None:
                    on_live(False)
                failures += 1
                if not lost:
                    lost = True
                    log.warning(
                        "cancel feed from Redis at %s lost (%s); running tasks learn of "
                        "cancels at their lease renewal until it is back",
                        self.target.where,
                        type(exc).__name__,
                    )
            finally:
                with stopping.shield("closing the cancel feed"):
                    try:
                        await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
                    except (RedisError, OSError):  # pragma: no cover - a dead connection
                        pass
            if not started:
                started = True
                task_status.started()
            await anyio.sleep(min(5.0, 0.1 * 2**failures))

    @staticmethod
    def _feed(data: bytes, on_cancel: Callable[[str, str], None]) -> None:
        try:
            uuid, reason = _loads(data.decode())
        except (ValueError, TypeError, UnicodeDecodeError):
            log.warning("ignored a cancel notice that is not [uuid, reason]: %.80r", data)
            return
        on_cancel(str(uuid), str(reason))

    async def wait(self, uuid: str, timeout: float | None) -> TaskRecord:
        return await self._wait(uuid, timeout, await self.get(uuid))

    async def wait_fresh(self, uuid: str, timeout: float | None) -> TaskRecord:
        """See :class:`qtasks.components.FreshWait`: a record added a moment ago cannot be
        final with its wake-up expired (it lives 2 minutes past the final save), so the
        wait blocks at once, reading the record with the wake-up."""
        return await self._wait(uuid, timeout, None)

    async def _wait(
        self, uuid: str, timeout: float | None, record: TaskRecord | None
    ) -> TaskRecord:
        client = self._require()
        lane = self._shared.lane
        rec, wake = self._keys(uuid)[:2]
        deadline = None if timeout is None else time.monotonic() + timeout
        failures = 0
        while True:
            if record is not None and record.status.final:
                return record
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TaskTimeoutError(uuid, timeout)
            block = _BLOCK_CAP if left is None else min(left, _BLOCK_CAP)
            # The token is moved back onto the same list: every waiter wakes, none consumes it.
            # redis-py types the timeout as int; Redis takes fractional seconds.
            seconds: Any = max(block, 0.001)
            if lane is None:
                await guarded(self.target, client.blmove(wake, wake, seconds, "RIGHT", "LEFT"))
                record = await self.get(uuid)
                continue
            try:
                fields = await self._block(lane, rec, wake, seconds)
            except StorageConnectionError as exc:
                # Lost or refused (a restart, a failover): tried again with the time left,
                # as the lane retries its other calls and redis-py its own.
                failures += 1
                lost = isinstance(exc.__cause__, RedisConnectionError)
                if not lost or not lane.retries_left(failures):
                    raise
                await anyio.sleep(lane.backoff(failures))
                continue
            failures = 0
            record = self._record(fields)

    async def _block(self, lane: Lane, rec: str, wake: str, seconds: Any) -> list[Any]:
        """The record's fields once it may have changed, or ``seconds`` passed. A few waits of
        the lane block on connections of their own; past ``redis_wait_connections`` of them,
        waits share the lane's :class:`~qtasks_redis.watch.KeyWatch` (two connections for
        any number): a returned record that is not final is read again."""
        watch = key_watch(lane)
        if watch.blocking < self._wait_connections or watch.unavailable is not None:
            watch.blocking += 1
            try:
                # Block and read the record in one round trip: the HMGET runs as soon as the
                # BLMOVE returns (Redis answers a connection's commands in order).
                _, fields = await guarded(
                    self.target,
                    lane.blocking(
                        seconds,
                        ("BLMOVE", wake, wake, "RIGHT", "LEFT", seconds),
                        ("HMGET", rec, *_RECORD_FIELDS),
                    ),
                )
                return cast(list[Any], fields)
            finally:
                watch.blocking -= 1
        try:
            event, replies = await guarded(
                self.target, watch.read(wake, [("HMGET", rec, *_RECORD_FIELDS)])
            )
        except ResponseError:
            if watch.unavailable is None:
                raise
            return await self._block(lane, rec, wake, seconds)  # blocks as before
        fields = replies[0]
        try:
            if fields[1] not in _FINAL_BYTES:
                with anyio.move_on_after(seconds):
                    await event.wait()
        finally:
            watch.forget(wake, event)
        return cast(list[Any], fields)

    async def add_step(self, uuid: str, value: Any, *, fence: str | None = None) -> int | None:
        """See :meth:`qtasks.components.Storage.add_step`: fenced, and the restart marked, in
        the script that appends the step (no round trip more)."""
        # The nonce makes a call re-sent after a lost reply a no-op (see ADD_STEP).
        nonce = os.urandom(6).hex()
        index = int(await self._run(lua.ADD_STEP, uuid, _dumps(value), nonce, fence or ""))
        return None if index < 0 else index

    async def steps(self, uuid: str, start: int = 0) -> AsyncIterator[Any]:
        client = self._require()
        stream = self._keys(uuid)[2]
        last = "0-0"
        index = 0
        while True:
            reply = await self._run(lua.FOLLOW, uuid, last)
            final = bool(reply[0])
            entries = [(reply[i], reply[i + 1], reply[i + 2]) for i in range(1, len(reply), 3)]
            while True:
                for entry_id, kind, value in entries:
                    last = entry_id.decode()
                    if kind == b"e":
                        return
                    if kind == b"s":
                        if index >= start:
                            yield json.loads(value)
                        index += 1
                    elif kind == b"r":
                        if index >= start:
                            yield StepsRestarted(int(value))
                        index += 1
                if final:
                    return
                more = await self._next_steps(client, stream, last)
                if more is None:
                    break  # block cap reached: read the record's status again
                entries = more

    async def _next_steps(
        self, client: Client, stream: str, last: str
    ) -> list[tuple[bytes, bytes, bytes]] | None:
        """The entries of ``stream`` after ``last`` once there are some (``[]``: it may
        have changed, read again), or ``None`` after ``_BLOCK_CAP`` seconds without any. A
        few followers of the lane block on a connection of their own (redis-py's
        ``XREAD``); past ``redis_wait_connections`` blocking waits, the rest wait on the
        lane's :class:`~qtasks_redis.watch.KeyWatch`, as result waits do (an ``XADD``
        changes the tracked stream)."""
        lane = self._shared.lane
        watch = None if lane is None else key_watch(lane)
        if watch is None or watch.blocking < self._wait_connections or watch.unavailable:
            if watch is not None:
                watch.blocking += 1
            try:
                read: Any = await guarded(
                    self.target,
                    client.xread({stream: last}, count=100, block=int(_BLOCK_CAP * 1000)),
                )
            finally:
                if watch is not None:
                    watch.blocking -= 1
            if not read:
                return None
            return [
                (entry_id, fields.get(b"k", b""), fields.get(b"v", b""))
                for entry_id, fields in read[0][1]
            ]
        try:
            event, (reply,) = await guarded(
                self.target, watch.read(stream, [("XRANGE", stream, f"({last}", "+", "COUNT", 100)])
            )
        except ResponseError:
            if watch.unavailable is None:
                raise
            return await self._next_steps(client, stream, last)  # blocks as before
        try:
            if not reply:
                with anyio.move_on_after(_BLOCK_CAP) as waited:
                    await event.wait()
                if waited.cancelled_caught:
                    return None
                return []
        finally:
            watch.forget(stream, event)
        return [
            (entry_id, _field(fields, b"k"), _field(fields, b"v")) for entry_id, fields in reply
        ]

    async def stats(self) -> dict[str, int]:
        """See :class:`qtasks.components.Storage`: the sizes of the status indexes, once
        the entries of expired records are trimmed off them: a call per bounded trim
        (``storage_lua.trim``), so a long backlog never blocks the server in one script."""
        while True:
            reply = await self._run(lua.STATS, "", self._ttl_ms)
            if not int(reply[-1]):
                break
        counts = zip(lua.STATUSES, reply[:-1], strict=True)
        return {status: int(n) for status, n in counts if int(n)}

    # --- StorageQuery ---------------------------------------------------------------------

    def _query_keys(self, query: RecordQuery) -> list[str]:
        """The index keys whose union holds every candidate of ``query``: the status
        indexes, the task name's index of final records, or the parent's index of children."""
        if query.parent_uuid is not None:
            return [f"{self._tag}:np:{query.parent_uuid}"]
        live = [
            self._index_keys[lua.STATUSES.index(status.value)]
            for status in TaskStatus
            if not status.final and status.value in lua.STATUSES
        ]
        if query.status is not None:
            if query.status.value not in lua.STATUSES:
                return []
            if query.task_name is not None and query.status.final:
                return [f"{self._tag}:nf:{query.task_name}"]
            return [self._index_keys[lua.STATUSES.index(query.status.value)]]
        if query.task_name is not None:
            return [f"{self._tag}:nf:{query.task_name}", *live]
        return list(self._index_keys)

    async def query(self, query: RecordQuery) -> RecordPage:
        """See :class:`qtasks.components.StorageQuery`: the per-status and per-task-name
        indexes, merged newest first (:class:`~qtasks_redis.union.IndexUnion`), a batch at a
        time (a round trip for the index entries when some key's are used up, one for their
        records); entries whose record expired are removed on the way. The index time is
        the server's, in milliseconds."""
        query = query.checked()
        after = None if query.cursor is None else _parse_cursor(query.cursor)
        keys = self._query_keys(query)
        prefix = query.uuid_prefix or ""
        # The index answers for status, name and time; a uuid prefix is matched on the index
        # entries before any record is read, so a scan reads index entries only.
        residual_name = query.parent_uuid is not None or (
            query.task_name is not None and (query.status is None or not query.status.final)
        )  # records that are not final are found by status, their name checked one by one
        # (children by their parent, their status and name checked one by one)
        if prefix:
            batch = 1000
        elif residual_name or (query.task_name is not None and query.status is not None):
            batch = min(max(4 * query.limit, 200), 1000)
        else:
            batch = query.limit
        found: list[TaskRecord] = []
        if prefix and query.cursor is None:
            exact = await self._exact(prefix, query)
            if exact is not None:
                found.append(exact)
                if len(found) == query.limit:
                    return RecordPage(found, _TOP)
        budget = SCAN_BUDGET if query.scan_budget is None else query.scan_budget
        deadline = time.monotonic() + budget
        scanned = 0
        read = functools.partial(guarded, self.target)
        union = IndexUnion(self._require(), read, keys, query, after, batch)
        while True:
            entries = await union.take(batch)
            if not entries:
                break
            # The record whose whole uuid is the prefix was looked up on the first page.
            wanted = [u for _, u, _ in entries if u.startswith(prefix) and u != prefix]
            stored: dict[str, Any] = {}
            if wanted:
                pipe = self._require().pipeline(transaction=False)
                for uuid in wanted:
                    pipe.hmget(f"{self._tag}:r:{uuid}", _RECORD_FIELDS)
                replies = await guarded(self.target, pipe.execute())
                stored = dict(zip(wanted, replies, strict=True))
            stale: dict[str, list[str]] = {}
            for score, uuid, key in entries:
                scanned += 1
                after = (score, uuid)
                if uuid not in stored:
                    continue
                try:
                    record = self._record(stored[uuid])
                except SerializationError:
                    log.warning("query skipped the record %s: it is not valid", uuid)
                    continue
                if record is None:
                    stale.setdefault(key, []).append(uuid)
                elif (
                    (query.status is None or record.status is query.status)
                    and (query.task_name is None or record.task_name == query.task_name)
                    and (query.parent_uuid is None or record.parent_uuid == query.parent_uuid)
                ):
                    found.append(record)
                    if len(found) == query.limit:
                        break
            if stale:
                pipe = self._require().pipeline(transaction=False)
                for key, uuids in stale.items():
                    pipe.zrem(key, *uuids)
                await guarded(self.target, pipe.execute())
            if len(found) == query.limit or (
                scanned >= _SCAN and (found or time.monotonic() >= deadline)
            ):
                return RecordPage(found, _make_cursor(after))
        return RecordPage(found)

    async def _exact(self, uuid: str, query: RecordQuery) -> TaskRecord | None:
        """The record ``uuid`` when it matches every filter of ``query``; its index time is
        its score in the status indexes (one round trip)."""
        pipe = self._require().pipeline(transaction=False)
        pipe.hmget(f"{self._tag}:r:{uuid}", _RECORD_FIELDS)
        for key in self._index_keys:
            pipe.zscore(key, uuid)
        reply: list[Any] = await guarded(self.target, pipe.execute())
        try:
            record = self._record(reply[0])
        except SerializationError:
            return None
        if record is None or not (
            (query.status is None or record.status is query.status)
            and (query.task_name is None or record.task_name == query.task_name)
            and (query.parent_uuid is None or record.parent_uuid == query.parent_uuid)
        ):
            return None
        if query.since is None and query.until is None:
            return record
        scores = [float(score) for score in reply[1:] if score is not None]
        at = max(scores, default=math.nan)  # ms, compared as the scan compares
        if at != at or (query.since is not None and at < query.since * 1000):
            return None
        return None if query.until is not None and at >= query.until * 1000 else record

    async def count(
        self, status: TaskStatus, since: float | None = None, until: float | None = None
    ) -> int:
        """See :class:`qtasks.components.StorageQuery`: ``ZCOUNT`` of the status index."""
        if status.value not in lua.STATUSES:
            return 0
        key = self._index_keys[lua.STATUSES.index(status.value)]
        call = self._require().zcount(key, _bound(since, low=True), _bound(until, low=False))
        return int(await guarded(self.target, call))


def _bound(value: float | None, *, low: bool) -> str:
    """A ZSET score bound (ms) for a time in seconds: ``since`` inclusive, ``until``
    exclusive."""
    if value is None:
        return "-inf" if low else "+inf"
    return repr(value * 1000) if low else f"({value * 1000!r}"


def _make_cursor(after: tuple[float, str] | None) -> str | None:
    return None if after is None else f"r:{after[0]!r}:{after[1]}"


def _parse_cursor(cursor: str) -> tuple[float, str] | None:
    """The position after which a page starts; ``None`` for the newest (:data:`_TOP`)."""
    if cursor == _TOP:
        return None
    kind, _, rest = cursor.partition(":")
    score, _, uuid = rest.partition(":")
    # Only what _make_cursor writes (repr of a finite float): float() alone also reads "inf",
    # "1_0" and non-ASCII digits ("٣"), none of which a RedisStorage made.
    value = float(score) if _SCORE.fullmatch(score) else math.nan
    if kind != "r" or not uuid or not math.isfinite(value):
        raise InvalidQueryError(f"cursor {cursor!r} was not made by a RedisStorage")
    return value, uuid
