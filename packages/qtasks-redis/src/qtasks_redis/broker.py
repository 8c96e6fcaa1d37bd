"""The Redis broker: leases with fencing tokens, priorities, delays and dead letters.

Each state transition is one Lua script (see :mod:`qtasks_redis.broker_lua`), so a message is
always in exactly one place: ready, delayed, in flight, dead, or gone. Idle consumers block on
``BLPOP`` of the queue's notify list, with a timeout bounded by the next delay or lease deadline,
so there is no poll interval on the hot path. Redis ends such a timeout only at its next ``hz``
tick (up to 100 ms late at the default ``hz 10``), so on the fast lane a loop timer ends the
block at the deadline itself (:meth:`~qtasks_redis.lane.Lane.block_then_script`); through
redis-py (TLS, Cluster) a delayed message may still start up to a tick late.

Over ~500 lines: the broker's Python side around its Lua scripts (publish, claim and the
consumer loop, settle calls, dead letters); the scripts are in ``broker_lua`` and
``shared_lua``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any, Self

import anyio
import anyio.lowlevel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError
from redis.exceptions import TimeoutError as RedisTimeoutError

from qtasks import stopping
from qtasks.components import (
    BrokerStats,
    Buried,
    Counting,
    DeadLetter,
    Delivery,
    Ended,
    GlobalConfig,
    Storage,
    alone_from,
)
from qtasks.config import QueueConfig, own_option
from qtasks.errors import BrokerConnectionError, ComponentError, ConfigError, SerializationError
from qtasks.messages import Envelope, new_uuid
from qtasks.record import TaskRecord, TaskStatus
from qtasks_redis import broker_lua as lua
from qtasks_redis import shared_lua, workflow_lua
from qtasks_redis.connection import (
    Client,
    RedisTarget,
    Script,
    SharedClient,
    check_options,
    common_options,
    delete_matching,
    glob_escape,
)
from qtasks_redis.failures import guarded, outage
from qtasks_redis.flow import PUBLISH_NEW_UNIQUE
from qtasks_redis.global_config import RedisGlobalConfig
from qtasks_redis.lane import Lane
from qtasks_redis.storage import RECORD_KEYS, RedisStorage
from qtasks_redis.workflows import error_text

log = logging.getLogger("qtasks.redis")

_IDLE_WAKE_MS = 5000
"""Longest a consumer blocks without re-checking, unless the lease is shorter (a safety net,
not a poll interval)."""
_CLAIM_GRACE = 1.0
"""Seconds a claim's reply may come after the wait it asked Redis for (its block) before its
consumer counts as stalled (:meth:`RedisBroker.consume_stalled`): the round trip, Redis's
``hz`` tick that ends an idle block, a busy event loop reading the reply."""
_BACKOFF_CAP = 5.0
_PUBLISH_BATCH = 1000
"""Most messages published in one script call (see :meth:`RedisBroker.publish_many`)."""
_EXTEND_BATCH = 1000
"""Most deliveries renewed in one script call."""
_SETTLE_SCRIPTS = {
    (False, False): shared_lua.ACK_FINALS,
    (False, True): shared_lua.ACK_FINALS_BEGIN,
    (True, False): workflow_lua.ACK_FINALS_WF,
    (True, True): workflow_lua.ACK_FINALS_WF_BEGIN,
}
"""The settle script by (a workflow member among the tasks, records to begin)."""


_BUILD_YIELD = 100
"""While :meth:`RedisBroker.publish_new_many` builds a call (about 6 us a task), it yields to
the loop every this many tasks: ``add_tasks`` builds a batch's call while the batch before
runs, and that batch's large write is flushed, and its reply read, only when the loop runs
(built in one go, the next call's build held both up by its whole length)."""


_NO_REPLY = object()
"""A claim's reply not read (see ``claim`` in :meth:`RedisBroker._consume`)."""


def _nonce() -> str:
    """The nonce of one enqueue script call (see :data:`~qtasks_redis.shared_lua.PUBLISH_NEW`):
    64 random bits, drawn before the call is packed, so that the call re-sent carries the
    same."""
    return new_uuid()[:16]


class RedisDelivery:
    """One delivery from :class:`RedisBroker`; settle it with ack, nack, requeue or extend."""

    __slots__ = (
        "_attempt",
        "_body",
        "_broker",
        "_id",
        "_lease_until",
        "_owner",
        "_priority",
        "_settled",
        "_token",
        "begun",
    )

    def __init__(
        self,
        broker: RedisBroker,
        owner: dict[str, str],
        id: str,
        body: bytes,
        priority: int,
        attempt: int,
        token: str,
        sent: float | None = None,
    ) -> None:
        """``sent``: when the claim that leased it was sent (``time.monotonic()``), which its
        lease is counted from (the server's starts later): its reply may be read long after,
        the loop stalled meanwhile."""
        self._broker = broker
        self._owner = owner
        self._id = id
        self._body = body
        self._priority = priority
        self._attempt = attempt
        self._token = token
        self._lease_until = (time.monotonic() if sent is None else sent) + broker._lease_ms / 1000
        self._settled: anyio.Event | None = None  # set by its settle: a suspect's consumer waits
        self.begun: TaskRecord | None = None
        """The record as begun with the claim (:meth:`RedisBroker.consume_begun`)."""

    def __repr__(self) -> str:
        return f"RedisDelivery(id={self._id!r}, attempt={self._attempt})"

    @property
    def id(self) -> str:
        return self._id

    @property
    def body(self) -> bytes:
        return self._body

    @property
    def priority(self) -> int:
        return self._priority

    @property
    def attempt(self) -> int:
        return self._attempt

    @property
    def token(self) -> str:
        return self._token

    @property
    def held_until(self) -> float:
        """See :class:`~qtasks.components.LeaseDeadline`: counted from the sending of the
        claim or renewal whose script last set the lease."""
        return self._lease_until

    async def _settle_call(
        self, script: Script, keys: Sequence[str], args: Sequence[Any], dynamic: int = 0
    ) -> Any:
        reply = await self._broker._while_leased((self,), script, keys, args, dynamic)
        self._done()
        return reply

    def _done(self) -> None:
        """Settled (or its lease lost): no longer this consumer's, and the consumer waiting
        for it (a suspect's, see ``RedisBroker._consume``) goes on."""
        self._owner.pop(self._token, None)
        if self._settled is not None:
            self._settled.set()

    async def _settle(self, script: Script, *args: Any) -> bool:
        return bool(
            await self._settle_call(script, self._broker.keys, (self._id, self._token, *args))
        )

    async def ack(self) -> bool:
        return await self._settle(lua.ACK)

    async def nack(self, reason: str) -> bool:
        return await self._settle(lua.NACK, reason, *self._broker._retention)

    async def requeue(
        self, *, delay: float | None = None, body: bytes | None = None, count: Counting = "reset"
    ) -> bool:
        delay_ms = "" if not delay else str(max(int(delay * 1000), 1))
        if body is None:
            return await self._settle(lua.REQUEUE, delay_ms, "0", b"", count)
        return await self._settle(lua.REQUEUE, delay_ms, "1", body, count)

    async def extend(self) -> bool:
        deadline = time.monotonic() + self._broker._lease_ms / 1000
        done = bool(
            await self._broker._run(lua.EXTEND, self._id, self._token, self._broker._lease_ms)
        )
        if done:
            self._lease_until = deadline
        elif self._settled is not None:
            self._settled.set()  # lost: its consumer need not wait for it
        return done


class RedisBroker:
    """A Redis-backed :class:`~qtasks.components.Broker` for one named queue.

    ``url`` is ``redis://[user:password@]host:port/db``, ``rediss://`` for TLS,
    ``unix:///path/to/socket?db=0`` or ``redis+cluster://host:port`` for Redis Cluster. Every key
    is ``{<prefix>:<queue>}:<part>``: one hash tag, so the queue lives in one cluster slot.
    ``lease`` and ``max_deliveries`` win over the configuration's (see
    :class:`~qtasks.components.LeaseLength`, :class:`~qtasks.components.DeliveryLimit`) and are
    checked as those settings are (:class:`~qtasks.errors.ConfigError`).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        queue: str = "default",
        prefix: str = "qtasks",
        lease: float | None = None,
        max_deliveries: int | None = None,
        cluster: bool = False,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.target = RedisTarget.parse(url, cluster=cluster)
        if not queue:
            raise ConfigError(
                f"RedisBroker's queue (extra.redis_queue) must not be empty, got {queue!r}"
            )
        self.queue = queue
        self.prefix = prefix
        self._lease_opt = own_option("lease", lease, "RedisBroker")
        self._max_opt = own_option("max_deliveries", max_deliveries, "RedisBroker")
        self._options = check_options(dict(options or {}))
        tag = f"{{{prefix}:{queue}}}"
        self.keys: tuple[str, ...] = tuple(f"{tag}:{name}" for name in lua.KEY_NAMES)
        self._notify_key = self.keys[lua.KEY_NAMES.index("notify")]
        self._pending_key = f"{tag}:pending"
        """The notices of dead letters not told yet (see ``CLAIM_NOTICED``)."""
        self._pending_keys = (self._pending_key, f"{tag}:pending:at")
        """That hash and when a consumer last took each of its notes (``FORGET_NOTES``)."""
        self._lease_ms = 30_000
        self._max_deliveries = 5
        self._retention: tuple[str, str] = ("", "")
        """``dead_letter_ttl`` in ms and ``max_dead_letters``, as the scripts take them."""
        self._shared = SharedClient(self.target, "RedisBroker")
        self._trying: dict[str, float] = {}
        """By consumer, when its claim still unanswered was due to be answered (monotonic: sent,
        plus the block it asked for, plus :data:`_CLAIM_GRACE`), or when a claim failed if
        sooner; kept through the retries of a failed one (:meth:`consume_stalled`)."""

    @classmethod
    def from_config(cls, config: QueueConfig) -> Self:
        """Built from ``config.broker_url`` and ``config.extra`` (``redis_queue``,
        ``redis_prefix``, ``redis_cluster`` and client options ``redis_*``)."""
        extra = config.extra
        return cls(
            config.broker_url,
            queue=str(extra.get("redis_queue", "default")),
            **common_options(extra),
        )

    def __repr__(self) -> str:
        return f"RedisBroker({self.target.where}, queue={self.queue!r})"

    @property
    def lease(self) -> float:
        """See :class:`~qtasks.components.LeaseLength`: ``lease=``, else ``config.lease``."""
        return self._lease_ms / 1000

    @property
    def max_deliveries(self) -> int:
        """See :class:`~qtasks.components.DeliveryLimit`: ``max_deliveries=``, else
        ``config.max_deliveries``."""
        return self._max_deliveries

    async def start(self, stack: AsyncExitStack, config: QueueConfig) -> None:
        lease = self._lease_opt if self._lease_opt is not None else config.lease
        self._lease_ms = max(int(lease * 1000), 1)
        self._max_deliveries = self._max_opt if self._max_opt is not None else config.max_deliveries
        ttl, cap = config.dead_letter_ttl, config.max_dead_letters
        self._retention = (
            "" if ttl is None else str(max(int(ttl * 1000), 1)),
            "" if cap is None else str(cap),
        )
        options = {**config.extra, **self._options}
        await self._shared.acquire(stack, options)

    def _require(self) -> Client | Lane:
        return self._shared.fast()

    async def _run(self, script: Script, *args: Any) -> Any:
        return await guarded(self.target, script(self._shared.fast(), self.keys, args))

    async def _run_call(
        self, script: Script, keys: Sequence[str], args: Sequence[Any], dynamic: int = 0
    ) -> Any:
        return await guarded(self.target, script(self._shared.fast(), keys, args, dynamic))

    async def _while_leased(
        self,
        deliveries: Sequence[RedisDelivery],
        script: Script,
        keys: Sequence[str],
        args: Sequence[Any],
        dynamic: int,
    ) -> Any:
        """Run a script that settles ``deliveries``. While a lease may still be ours, ride out
        a Redis outage rather than give up: an ack lost here means the task runs again
        elsewhere."""
        failures = 0
        while True:
            try:
                return await self._run_call(script, keys, args, dynamic)
            except BrokerConnectionError:
                failures += 1
                if time.monotonic() >= max(d._lease_until for d in deliveries):
                    raise
                await anyio.sleep(min(_BACKOFF_CAP, 0.1 * 2**failures) * random.random())

    @staticmethod
    def _publish_args(envelope: Envelope) -> tuple[Any, ...]:
        eta = "" if envelope.eta is None else str(int(envelope.eta * 1000))
        return (envelope.id, envelope.body, envelope.priority, eta)

    async def publish(self, envelope: Envelope) -> None:
        await self._run(lua.PUBLISH, *self._publish_args(envelope))

    async def publish_many(self, envelopes: Sequence[Envelope]) -> None:
        """See :class:`qtasks.components.BulkPublish`: one script per 1,000 messages."""
        for start in range(0, len(envelopes), _PUBLISH_BATCH):
            args: list[Any] = []
            for envelope in envelopes[start : start + _PUBLISH_BATCH]:
                args += self._publish_args(envelope)
            await self._run(workflow_lua.PUBLISH_MANY, *args)

    async def publish_new_many(
        self,
        storage: Storage,
        tasks: Sequence[tuple[TaskRecord, Envelope]],
        *,
        after: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """See :class:`qtasks.components.BulkPublishNew`: records and messages of 1,000
        tasks in one script (their name and parent indexed as :meth:`RedisStorage.add`
        does). The first script's call is built and packed before ``after`` is awaited."""
        redis_storage = _redis_storage(storage)
        for start in range(0, len(tasks), _PUBLISH_BATCH):
            send = await self._publish_new_call(
                redis_storage, tasks[start : start + _PUBLISH_BATCH]
            )
            if after is not None:
                await after()
                after = None
            await guarded(self.target, send())
        if after is not None:  # no tasks
            await after()

    async def _publish_new_call(
        self, redis_storage: RedisStorage, tasks: Sequence[tuple[TaskRecord, Envelope]]
    ) -> Callable[[], Awaitable[Any]]:
        """The PUBLISH_NEW_MANY script call of ``tasks`` (at most 1,000), packed (see
        :data:`_BUILD_YIELD`)."""
        encode = redis_storage._encode
        # A nonce per script call: a batch meeting a record of an earlier batch of this
        # call (a uuid given twice) is not taken for a re-sent one.
        args: list[Any] = [redis_storage.key_tag, redis_storage.ttl_ms, _nonce()]
        first = tasks[0][0].uuid
        for i, (record, envelope) in enumerate(tasks):
            if i % _BUILD_YIELD == _BUILD_YIELD - 1:
                await anyio.lowlevel.checkpoint()
            eta = "" if envelope.eta is None else str(int(envelope.eta * 1000))
            args += (
                record.uuid,
                encode(record),
                record.status.value,
                record.token or "",
                record.task_name,
                record.parent_uuid or "",
                envelope.id,
                envelope.body,
                envelope.priority,
                eta,
            )
        keys = (*redis_storage._keys(first), *self.keys)
        return workflow_lua.PUBLISH_NEW_MANY.packed(self._shared.fast(), keys, args, RECORD_KEYS)

    # --- SharedServer: folded storage writes -----------------------------------------------

    def shares_server_with(self, storage: Storage) -> bool:
        """True for a :class:`~qtasks_redis.RedisStorage` on the same server, database and
        credentials, outside Redis Cluster (there a record and its queue live in different
        slots, so they go through the plain protocols)."""
        return (
            isinstance(storage, RedisStorage)
            and not self.target.cluster
            and storage.target.server == self.target.server
        )

    async def publish_new(self, envelope: Envelope, storage: Storage, record: TaskRecord) -> None:
        """Store ``record`` and publish ``envelope`` in one atomic script."""
        keys, args = _redis_storage(storage)._save_call(record, None, "1")
        await self._run_call(
            shared_lua.PUBLISH_NEW,
            (*keys, *self.keys),
            (*args, *self._publish_args(envelope), _nonce()),
            RECORD_KEYS,
        )

    def shares_server_with_config(self, global_config: GlobalConfig) -> bool:
        """True for a :class:`~qtasks_redis.RedisGlobalConfig` on the same server, database and
        credentials, outside Redis Cluster (:class:`~qtasks.components.UniquePublish`)."""
        return (
            isinstance(global_config, RedisGlobalConfig)
            and not self.target.cluster
            and global_config.target.server == self.target.server
        )

    async def publish_new_unique(
        self,
        envelope: Envelope,
        storage: Storage,
        record: TaskRecord,
        global_config: GlobalConfig,
        claim: tuple[str, str, float | None, str | None],
    ) -> str | None:
        """Claim a unique key and, when claimed, store ``record`` and publish ``envelope``, in
        one atomic script; the holder that keeps the key otherwise (nothing written)."""
        if not isinstance(global_config, RedisGlobalConfig):
            raise ComponentError(f"{global_config!r} is not on this broker's server")
        keys, args = _redis_storage(storage)._save_call(record, None, "1")
        reply = await self._run_call(
            PUBLISH_NEW_UNIQUE,
            (*keys, *self.keys),
            (*args, *self._publish_args(envelope), _nonce(), *global_config.unique_args(*claim)),
            RECORD_KEYS,
        )
        return reply.decode() if isinstance(reply, bytes) else None

    async def ack_final(
        self,
        delivery: Delivery,
        storage: Storage,
        record: TaskRecord,
        *,
        enqueued: list[str] | None = None,
    ) -> bool:
        """Save the final ``record`` fenced by the delivery's token and, when accepted or when
        the stored record is already final, ack the delivery, in one atomic script. Returns
        whether the save was accepted."""
        if not isinstance(delivery, RedisDelivery) or delivery._broker is not self:
            raise ComponentError(f"{delivery!r} was not delivered by {self!r}")
        if record.workflow is not None:
            return (await self.ack_finals(storage, [(delivery, record)], enqueued=enqueued))[0]
        keys, args = _redis_storage(storage)._save_call(record, delivery.token, "0")
        reply = await delivery._settle_call(
            shared_lua.ACK_FINAL,
            (*keys, *self.keys),
            (*args, delivery.id, delivery.token),
            RECORD_KEYS,
        )
        return bool(reply == 1)

    async def extend_many(self, deliveries: Sequence[Delivery]) -> list[bool]:
        """Renew every delivery's lease in one script call per 1,000 (see
        :class:`qtasks.components.LeaseBatch`)."""
        held: list[RedisDelivery] = []
        for delivery in deliveries:
            if not isinstance(delivery, RedisDelivery) or delivery._broker is not self:
                raise ComponentError(f"{delivery!r} was not delivered by {self!r}")
            held.append(delivery)
        out: list[bool] = []
        for start in range(0, len(held), _EXTEND_BATCH):
            chunk = held[start : start + _EXTEND_BATCH]
            args: list[Any] = [self._lease_ms]
            for delivery in chunk:
                args += (delivery.id, delivery.token)
            deadline = time.monotonic() + self._lease_ms / 1000
            reply = await self._run(lua.EXTEND_MANY, *args)
            for delivery, renewed in zip(chunk, reply, strict=True):
                if renewed:
                    delivery._lease_until = deadline
                elif delivery._settled is not None:
                    delivery._settled.set()  # lost: its consumer need not wait for it
                out.append(bool(renewed))
        return out

    async def ack_finals(
        self,
        storage: Storage,
        finals: Sequence[tuple[Delivery, TaskRecord]],
        *,
        enqueued: list[str] | None = None,
    ) -> list[bool]:
        """:meth:`ack_final` of every pair in one script call (each pair atomic on its own);
        the workflow script's reply ends with the ids of the next steps it published."""
        if not finals:
            return []
        saved, _ = await self._settle_begin(storage, finals, (), enqueued)
        return saved

    async def ack_finals_begin(
        self,
        storage: Storage,
        finals: Sequence[tuple[Delivery, TaskRecord]],
        begins: Sequence[TaskRecord],
        *,
        enqueued: list[str] | None = None,
    ) -> tuple[list[bool], list[TaskRecord | None]]:
        """See :class:`qtasks.components.SettleBegin`: :meth:`ack_finals`' script followed by
        the storage's begin of each record, in one script call (``None`` for a record none is
        stored of, or one that cannot be read)."""
        if not begins:
            return await self.ack_finals(storage, finals, enqueued=enqueued), []
        return await self._settle_begin(storage, finals, begins, enqueued)

    async def _settle_begin(
        self,
        storage: Storage,
        finals: Sequence[tuple[Delivery, TaskRecord]],
        begins: Sequence[TaskRecord],
        enqueued: list[str] | None,
    ) -> tuple[list[bool], list[TaskRecord | None]]:
        redis_storage = _redis_storage(storage)
        deliveries: list[RedisDelivery] = []
        args: list[Any] = [redis_storage.key_tag]
        if begins:
            args.append(len(begins))
            for claim in begins:
                args += (claim.uuid, claim.token or "", claim.attempt, claim.worker or "")
        first = finals[0][1].uuid if finals else begins[0].uuid
        keys = (*redis_storage._keys(first), *self.keys)
        # Workflow members take the script that continues their workflow in the same step
        # (qtasks_redis.workflow_lua); a batch without any takes the plain one.
        flows = any(record.workflow is not None for _, record in finals)
        for delivery, record in finals:
            if not isinstance(delivery, RedisDelivery) or delivery._broker is not self:
                raise ComponentError(f"{delivery!r} was not delivered by {self!r}")
            args += redis_storage._save_args(record, delivery.token, "0")
            args += (delivery.id, delivery.token)
            if flows:
                args += (record.workflow or "", error_text(record))
            deliveries.append(delivery)
        script = _SETTLE_SCRIPTS[flows, bool(begins)]
        if deliveries:
            reply = await self._while_leased(deliveries, script, keys, args, RECORD_KEYS)
        else:
            reply = await self._run_call(script, keys, args, RECORD_KEYS)
        for delivery in deliveries:
            delivery._done()
        n, end = len(finals), len(finals) + 8 * len(begins)
        if enqueued is not None:
            enqueued += [id.decode() for id in reply[end:]]
        begun: list[TaskRecord | None] = []
        for at in range(n, end, 8):
            try:
                begun.append(redis_storage._record(reply[at : at + 8]))
            except SerializationError:
                begun.append(None)  # the caller begins it alone, which raises
        return [saved == 1 for saved in reply[:n]], begun

    def consume(
        self, *, prefetch: int, wanted: Callable[[], int] | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[RedisDelivery]]:
        """See :meth:`qtasks.components.Broker.consume`: each claim takes up to ``prefetch``
        messages, and up to ``wanted()`` when given."""
        return self._consume(prefetch, lua.CLAIM, self.keys, (), None, None, None, wanted=wanted)

    def consume_noticing(
        self, *, prefetch: int, buried: Buried, wanted: Callable[[], int] | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[RedisDelivery]]:
        """:meth:`consume`, awaiting ``buried(id, reason)`` for each message a claim
        dead-letters past ``max_deliveries`` (see :class:`~qtasks.components.BuryNotice`)."""
        keys = (*self.keys, *self._pending_keys)
        return self._consume(
            prefetch, lua.CLAIM_NOTICED, keys, (), None, None, None, buried, wanted=wanted
        )

    def consume_begun(
        self,
        *,
        prefetch: int,
        storage: Storage,
        worker: str,
        starts: Callable[[], int],
        published: Callable[[Sequence[str]], None] | None = None,
        ended: Ended | None = None,
        wanted: Callable[[], int] | None = None,
    ) -> AbstractAsyncContextManager[AsyncIterator[RedisDelivery]]:
        """:meth:`consume`, beginning in the same script the records of the claimed messages
        that start at once (``starts()``, asked at each claim); see
        :class:`~qtasks.components.BeginOnClaim`. Only for a storage this broker
        :meth:`shares_server_with`. ``published`` gets the ids of the error callbacks a claim
        published for the workflow members it dead-lettered; ``ended`` each record a claim
        ended (read back in the same script)."""
        if not self.shares_server_with(storage):
            raise ComponentError(f"{storage!r} does not share a server with {self!r}")
        redis_storage = _redis_storage(storage)
        keys = (*self.keys, *redis_storage.index_keys)
        extra = (redis_storage.key_tag, worker, redis_storage.ttl_ms)
        claim = workflow_lua.CLAIM_BEGIN_WF  # CLAIM_BEGIN, failing the workflows of dead members
        return self._consume(
            prefetch,
            claim,
            keys,
            extra,
            redis_storage,
            starts,
            published,
            ended=ended,
            wanted=wanted,
        )

    @asynccontextmanager
    async def _consume(
        self,
        prefetch: int,
        script: Script,
        keys: tuple[str, ...],
        extra: tuple[str, ...],
        storage: RedisStorage | None,
        starts: Callable[[], int] | None,
        published: Callable[[Sequence[str]], None] | None,
        notice: Buried | None = None,
        *,
        ended: Ended | None = None,
        wanted: Callable[[], int] | None = None,
    ) -> AsyncIterator[AsyncIterator[RedisDelivery]]:
        client = self._require()
        held: dict[str, str] = {}  # token -> id, delivered to this consumer and not settled
        buried: deque[tuple[str, str]] = deque()  # dead-lettered by a claim, not yet told
        told: deque[TaskRecord] = deque()  # records a claim's dead letters ended, not yet told
        buffer: deque[RedisDelivery] = deque()  # claimed, not handed out yet
        orphans: list[RedisDelivery] = []  # claimed as the consumer was cancelled
        # Told (``notice`` returned), their note in the pending hash not deleted yet (see
        # CLAIM_NOTICED): deleted after each telling, or by a later one when that failed.
        noticed: list[str] = []

        async def tell() -> None:
            # Each taken off before it is told: told once, even if the consumer is cancelled
            # while telling it (its exit tells the rest).
            if notice is not None:
                while buried:
                    id, reason = buried.popleft()
                    if await notice(id, reason) is False:
                        # Its record not written (the storage failed): its note stays, for
                        # a claim to take a lease from now (CLAIM_NOTICED), here or elsewhere.
                        continue
                    noticed.append(id)
                if noticed:
                    await self._forget_notices(client, noticed)
            if ended is not None:
                while told:
                    await ended(told.popleft())

        count = max(prefetch, 1)
        retention = self._retention
        stride = 5 if storage is None else 13  # CLAIM_BEGIN appends the record's 8 fields
        # The longest an idle claim blocks: never longer than a lease, since a message another
        # consumer claims meanwhile has a lease ending no sooner than that; this consumer then
        # claims again in time to learn that deadline, and redelivers the message as soon as
        # the lease ends (its holder's loop stalled or its holder was killed).
        idle_ms = min(self._lease_ms, _IDLE_WAKE_MS)

        lane = client if isinstance(client, Lane) else None
        # Names this loop's record of its last claim (kept for a re-sent call, see CLAIM_BODY).
        consumer = os.urandom(6).hex()
        # The nonce of a claim that got no reply (an outage: it may have run, its reply lost
        # with its connection), for the next claim: made with it, that one hands back what
        # the lost one leased (see CLAIM_BODY) instead of leaving it leased to nobody until
        # its lease ends, a delivery burnt. The lane re-sends a lost call itself, but not an
        # idle claim (a block then the claim), and redis-py gives up after its retries.
        unanswered: list[str] = []
        claimed = False  # whether a claim was sent: its note (CLAIM_BODY) is deleted at exit
        trying = self._trying

        async def claim(
            block: float | None, due: bool
        ) -> tuple[list[RedisDelivery], float | None, bool]:
            """Claim up to ``count``, and up to what the worker wants (``wanted()``: it holds
            nothing beyond its free slots while its runs are long, see :mod:`qtasks.hold`),
            after blocking up to ``block`` seconds for a wake-up (``due``: ``block`` ends at a
            deadline, not at the idle bound); see ``parse`` for what it returns."""
            nonlocal claimed
            claimed = True
            asked = count
            if wanted is not None:
                want = wanted()
                if want < asked:
                    asked = want if want > 1 else 1
            nonce = unanswered.pop() if unanswered else os.urandom(6).hex()
            unanswered.append(nonce)  # until its reply is read
            sent = time.monotonic()  # what it leases is leased from then, not from its reply
            args: tuple[Any, ...] = (
                self._lease_ms,
                self._max_deliveries,
                asked,
                f"{consumer}/{nonce}",
                *extra,
            )
            if starts is not None:
                args = (*args, starts())
            args = (*args, *retention)  # the last two: read only when dead-lettering
            if block is not None and lane is not None:
                # Idle: block and claim in one round trip (the claim runs as soon as the
                # BLPOP returns); a claim made while we are cancelled is still recorded.
                wake = ("BLPOP", self._notify_key, block)
                # Only a deadline needs its block ended at the moment (a loop timer per
                # block); the idle bound is a safety wake that Redis's hz tick may end.
                reply = await lane.block_then_script(
                    block, wake, script, keys, args, orphan=orphaned, exact=due
                )
                unanswered.clear()
                return parse(reply, sent, asked)
            if block is not None:
                await self._block(client, block)
            # Shielded: once the script ran, its deliveries must be recorded in ``held`` so
            # that they are handed back at exit, not left to their lease.
            reply = _NO_REPLY
            with stopping.shield("a claim's reply"):
                reply = await script(client, keys, args)
                unanswered.clear()
            if reply is _NO_REPLY:
                # Cut by a stopping worker's deadline (the server did not answer): what the
                # claim may have leased is left to its lease. The stop's cancellation goes on.
                await anyio.lowlevel.checkpoint()
                return [], None, False
            return parse(reply, sent, asked)

        def orphaned(reply: Any) -> None:
            """The reply of a claim whose caller was cancelled: its records are put back at
            exit (:func:`_unbegin`), its deliveries handed back."""
            orphans.extend(parse(reply)[0])

        def parse(
            reply: Any, sent: float | None = None, asked: int = count
        ) -> tuple[list[RedisDelivery], float | None, bool]:
            """The deliveries claimed; how long to block for a wake-up before the next claim
            (``None`` when the queue may hold more: as many claimed as ``asked`` for); and whether
            that wait ends at a deadline (a delayed message due, a lease ending) rather than
            at the idle bound."""
            over = (len(reply) - 1) % stride
            if over == 1:
                # (CLAIM_NOTICED) the JSON list of the ids and reasons of the messages the
                # claim dead-lettered.
                *reply, extra = reply
                if notice is not None:
                    pairs = json.loads(extra)
                    buried.extend(zip(pairs[::2], pairs[1::2], strict=True))
            elif over:
                # (CLAIM_BEGIN_WF) the ids of the messages the claim published itself (the
                # error callbacks of the workflow members it dead-lettered), comma-separated;
                # then the fields of the records its dead letters ended, 10 per record.
                *reply, ids, fields = reply
                if ids and published is not None:
                    published(ids.decode().split(","))
                if ended is not None and storage is not None:
                    told.extend(_ended_records(storage, fields))
            out: list[RedisDelivery] = []
            for i in range(1, len(reply), stride):
                id, body, prio, attempt, token = reply[i : i + 5]
                token_s = token.decode()
                id_s = id.decode()
                held[token_s] = id_s
                delivery = RedisDelivery(
                    self, held, id_s, body, int(prio), int(attempt), token_s, sent
                )
                if storage is not None:
                    try:
                        delivery.begun = storage.decode_record(reply[i + 5 : i + stride])
                    except SerializationError:
                        delivery.begun = None  # the worker begins it (and sees the error)
                out.append(delivery)
            if len(out) == asked:
                return out, None, False
            wait_ms = int(reply[0])  # -1: nothing is due
            if 0 <= wait_ms <= idle_ms:
                return out, wait_ms / 1000, True
            return out, idle_ms / 1000, False

        async def settled_or_lost(suspect: RedisDelivery) -> None:
            """Until ``suspect`` is settled, or lost: its lease ran out unrenewed or a renewal
            found it fenced. Woken by the settle (no polling): the deadline is its lease's,
            read again after each renewal."""
            settled = suspect._settled
            assert settled is not None
            while suspect._token in held and not settled.is_set():
                left = suspect._lease_until - time.monotonic()
                if left <= 0:
                    return
                with anyio.move_on_after(left):
                    await settled.wait()

        # A delivery whose lease ends sooner than this is renewed before it is handed out.
        renew_within = 2 * self._lease_ms / 3000

        async def still_ours(delivery: RedisDelivery) -> bool:
            """Whether ``delivery``, claimed and not handed out yet, that waited here longer
            than a renewal interval (its lease ends within ``renew_within``), may go to the
            worker. A claim takes up to ``count`` messages and the worker takes them one at
            a time as it has room, so with long tasks the rest wait here, where no renewal
            pass sees them, for longer than their lease; another worker may claim and run
            one meanwhile. It is renewed first (the worker's pass then comes before its
            lease ends), and dropped when that is refused: another worker holds it now."""
            try:
                if await delivery.extend():
                    return True
            except Exception as exc:
                if not outage(exc):
                    raise
                return True  # the worker's renewal pass finds out, as for the others
            delivery._done()
            log.info("message %s claimed here was taken by another worker", delivery.id)
            return False

        async def deliveries() -> AsyncIterator[RedisDelivery]:
            failures = 0
            wake_at: float | None = None  # when a deadline is due (monotonic), if blocking
            took = False  # whether the last claim took anything
            due = False  # whether wake_at is a deadline (not the idle bound)
            # A suspect handed out (on one of its last two allowed deliveries, the earlier
            # ones lost with their holders: crashes, leases run out; claimed alone, see
            # CLAIM_BODY): nothing more is claimed until it is settled or lost, so that,
            # should it kill this worker again, no message claimed beside it pays for it.
            suspect: RedisDelivery | None = None
            suspect_from = alone_from(self._max_deliveries)
            # A noticing consumer first tells what the pending hash holds: the notices that a
            # consumer killed after its claim (or one that never read its claim's reply) left
            # untold (retried after an outage, as a claim is). After that, its claims take the
            # notes no consumer took for a lease (CLAIM_NOTICED), within a lease and an idle
            # wake of being left, while this consumer claims: a consumer killed while others
            # run, and not restarted, does not leave them for ever.
            sweep = notice is not None
            while True:
                if buffer:
                    head = buffer[0]
                    # Checked (a round trip) only when it waited long; taken off once checked:
                    # a stop during the check leaves it unhanded.
                    ours = time.monotonic() < head._lease_until - renew_within or await still_ours(
                        head
                    )
                    delivery = buffer.popleft()
                    if ours:
                        yield delivery
                    continue
                if suspect is not None:
                    await settled_or_lost(suspect)
                    suspect = None
                try:
                    if sweep:
                        buried.extend(await self._pending_notices(client))
                        sweep = False
                        await tell()
                    block: float | None = None
                    if wake_at is not None and (not took or time.monotonic() < wake_at):
                        # The queue was empty at the last claim: block for a wake-up (a
                        # publish pushes one) until the next deadline, a lease ending or a
                        # delayed message due (the claim's reply). After a claim that took
                        # something, and only once that deadline passed, the next claim does
                        # not block: it promotes the leases that ran out meanwhile (a worker
                        # whose loop was blocked learns at once that its last allowed delivery
                        # is dead-lettered; tests/redis/test_redis_dead_letter_fence.py).
                        # Before it, such a claim would find nothing a blocking one would not:
                        # an idle worker's pickup is one round trip, not two.
                        # The tasks just handed over go first (a runner's start and its settle
                        # write take two turns of the loop), then this wait's write.
                        await anyio.lowlevel.checkpoint()
                        await anyio.lowlevel.checkpoint()
                        # Read after those turns: a task that blocked the loop in them may
                        # have outlasted the deadline (then the claim is made at once).
                        left = wake_at - time.monotonic()
                        block = None if took and left <= 0 else max(left, 0.001)
                    # An idle claim's block is a wait asked for, not a stall.
                    trying.setdefault(consumer, time.monotonic() + (block or 0.0) + _CLAIM_GRACE)
                    got, wait, due = await claim(block, due)
                    del trying[consumer]  # answered
                    buffer.extend(got)  # before a wait: at exit, the records of the rest go back
                    for delivery in got:
                        if delivery.attempt >= suspect_from:
                            suspect = delivery
                            delivery._settled = anyio.Event()
                    if buried or told:
                        await tell()
                    took = bool(got)
                    wake_at = None if wait is None else time.monotonic() + wait
                    if failures:
                        log.warning("Redis at %s is back; consuming again", self.target.where)
                    failures = 0
                except Exception as exc:
                    if not outage(exc):
                        raise
                    if consumer in trying:  # the claim failed: it waits for nothing now
                        trying[consumer] = min(trying[consumer], time.monotonic())
                    wake_at = None
                    failures += 1
                    pause = min(_BACKOFF_CAP, 0.1 * 2**failures) * (0.5 + random.random() / 2)
                    log.warning(
                        "Redis at %s %s (%s); retrying in %.1f s",
                        self.target.where,
                        "is out of memory (maxmemory reached, noeviction)"
                        if isinstance(exc, OutOfMemoryError)
                        else "unreachable"
                        if isinstance(exc, OSError | RedisConnectionError | RedisTimeoutError)
                        else "cannot take calls for now",
                        type(exc).__name__,
                        pause,
                    )
                    await anyio.sleep(pause)

        try:
            yield deliveries()
        finally:
            trying.pop(consumer, None)
            # Each bounded, and by a stopping worker's deadline (qtasks.stopping): what a
            # stalled server does not take in time is left to the leases.
            # A claim's reply read after the consumer was cancelled, or notes not deleted.
            if buried or told or noticed:
                with stopping.shield("the dead letters' records", 5):
                    await tell()
            if storage is not None and (orphans or buffer):
                with stopping.shield("the records of unstarted messages", 5):
                    await _unbegin(storage, [*orphans, *buffer])
            if held or claimed:
                # Claimed and never handed to the worker: not a delivery attempt (its count
                # is taken back, or a graceful stop would make suspects of them). The same
                # call deletes this consumer's note of its last claim.
                unhanded = {delivery.token for delivery in (*orphans, *buffer)}
                args: list[str] = [consumer]
                for token, id in held.items():
                    args += [id, token, "1" if token in unhanded else "0"]
                held.clear()
                with stopping.shield("the hand-back of held messages", 5):
                    try:
                        await lua.RELEASE(client, self.keys, args)
                    except Exception as exc:
                        if not outage(exc):
                            raise
                        if len(args) > 1:
                            log.warning(
                                "could not hand back %d deliveries to Redis at %s; they "
                                "return when their lease ends",
                                len(args) // 3,
                                self.target.where,
                            )

    async def _pending_notices(self, client: Client | Lane) -> list[tuple[str, str]]:
        """The notices noted in the pending hash (see ``CLAIM_NOTICED``): (id, reason); the
        note of a message published again under its id is dropped (``SWEEP_NOTES``)."""
        keys = (*self._pending_keys, self.keys[lua.KEY_NAMES.index("body")])
        flat = await guarded(self.target, lua.SWEEP_NOTES(client, keys, ()))
        return [(flat[i].decode(), flat[i + 1].decode()) for i in range(0, len(flat), 2)]

    async def _forget_notices(self, client: Client | Lane, ids: list[str]) -> None:
        """Delete the notes of ``ids``, told, from the pending hash, and empty ``ids``; an
        outage leaves them for the next telling (a claim a lease later, or a consumer that
        starts, tells them again: :func:`qtasks.poison.buried` finds their records final)."""
        done = ids[:]
        try:
            await lua.FORGET_NOTES(client, self._pending_keys, done)
        except Exception as exc:
            if not outage(exc):
                raise
            log.warning(
                "could not delete the notes of %d dead letters told (Redis at %s): %s",
                len(ids),
                self.target.where,
                type(exc).__name__,
            )
            return
        del ids[: len(done)]

    async def _block(self, client: Client | Lane, seconds: float) -> None:
        """Until the queue is notified or ``seconds`` pass."""
        if isinstance(client, Lane):
            await client.blocking(seconds, ("BLPOP", self._notify_key, seconds))
        else:
            await client.blpop([self._notify_key], timeout=seconds)

    def consume_stalled(self) -> float:
        """Seconds the most overdue claim of this broker's consumers has waited past the wait
        it asked for (an idle claim blocks up to 5 s, or the lease when shorter: that does not
        count) and :data:`_CLAIM_GRACE`, or since a claim failed, its retries through an
        outage included; ``0.0`` when every claim is answered or within its wait (see
        :class:`~qtasks.components.ConsumeHealth`)."""
        trying = self._trying
        return max(time.monotonic() - min(trying.values()), 0.0) if trying else 0.0

    async def cancel(self, id: str) -> bool:
        return bool(await self._run(lua.CANCEL, id))

    async def bring_forward(self, id: str) -> bool:
        """See :class:`~qtasks.components.BringForward` (one script)."""
        return bool(await self._run(lua.BRING_FORWARD, id))

    async def _run_pruned(
        self, script: Script, *args: Any, keys: Sequence[str] | None = None
    ) -> Any:
        """Run a script that reads dead letters (see ``pruned_for_read`` in
        :mod:`~qtasks_redis.broker_lua`): again while it replies -1, each call dropping up to
        1,000 dead letters past the retention first. ``keys``: the script's, when not the
        queue's twelve."""
        while True:
            retention = self._retention
            if keys is None:
                reply = await self._run(script, *retention, *args)
            else:
                reply = await self._run_call(script, keys, (*retention, *args))
            if reply != -1:
                return reply

    async def stats(self) -> BrokerStats:
        reply = await self._run_pruned(lua.STATS)
        by_priority = {int(reply[i]): int(reply[i + 1]) for i in range(3, len(reply), 2)}
        return BrokerStats(by_priority, int(reply[0]), int(reply[1]), int(reply[2]))

    async def flush(self) -> int:
        """Delete every key of this queue (messages, in-flight, delayed, dead letters); return
        how many keys. Only for ``app.flush_all``, which refuses while a worker serves."""
        tag = glob_escape(f"{{{self.prefix}:{self.queue}}}")
        return await delete_matching(self.target, self._shared.get(), tag + ":*")

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        if limit <= 0:
            return []
        reply = await self._run_pruned(lua.DEAD_LETTERS, limit)
        out = []
        for i in range(0, len(reply), 3):
            meta = json.loads(reply[i + 2])
            out.append(
                DeadLetter(
                    id=reply[i].decode(),
                    body=reply[i + 1],
                    reason=str(meta.get("reason", "")),
                    priority=int(meta.get("priority", 0)),
                    deliveries=int(meta.get("deliveries", 0)),
                    dead_at=float(meta.get("dead_at", 0.0)),
                )
            )
        return out

    async def requeue_dead_letters(self, ids: list[str] | None = None) -> int:
        """See :meth:`qtasks.components.Broker.requeue_dead_letters`. The note of a dead letter
        whose notice no consumer told yet (``CLAIM_NOTICED``) is dropped in the same script:
        told after the requeue, it would end the record of the message's new run."""
        return await self._dead_letter_script(
            lua.REQUEUE_DEAD, ids, (*self.keys, *self._pending_keys)
        )

    async def purge_dead_letters(self, ids: list[str] | None = None) -> int:
        """Delete dead letters for good (all when ``ids`` is None); return how many (the
        dashboard's purge; see :mod:`qtasks.components`)."""
        return await self._dead_letter_script(lua.PURGE_DEAD, ids)

    async def _dead_letter_script(
        self, script: Script, ids: list[str] | None, keys: Sequence[str] | None = None
    ) -> int:
        """Run a script of ``DEAD_IDS`` on ``ids``, or on every dead letter, 1,000 a call
        (``keys``: the script's, when not the queue's twelve)."""
        if ids is not None:
            return int(await self._run_pruned(script, "ids", *ids, keys=keys)) if ids else 0
        total = 0
        while True:
            done = int(await self._run_pruned(script, "all", keys=keys))
            total += done
            if done < 1000:
                return total


def _ended_records(storage: RedisStorage, fields: list[bytes | None]) -> list[TaskRecord]:
    """The records a claim's dead letters ended, from their fields (10 per record); one that
    cannot be read is logged and left out (its hook cannot fire)."""
    out: list[TaskRecord] = []
    for at in range(0, len(fields), 10):
        try:
            record = storage.decode_record(fields[at : at + 10])
        except SerializationError as exc:
            log.error("the record a dead letter ended cannot be read: %s", exc)
            continue
        if record is not None:
            out.append(record)
    return out


def _redis_storage(storage: Storage) -> RedisStorage:
    if not isinstance(storage, RedisStorage):
        raise ComponentError(f"{storage!r} does not share a server with a RedisBroker")
    return storage


async def _unbegin(storage: RedisStorage, deliveries: Sequence[RedisDelivery]) -> None:
    """Put back to ``new`` the records a claim began for ``deliveries``, which the consumer
    claimed but never handed out (it is closing): they go back to the queue unstarted, so
    their records must not say ``process``. Fenced by each delivery's token: a newer
    delivery's begin wins, and the token stays for the next claim to replace."""
    for delivery in deliveries:
        record = delivery.begun
        if record is None or record.status.final:
            continue
        record.status, record.worker, record.updated_at = TaskStatus.NEW, None, time.time()
        try:
            await storage.save(record, fence=delivery.token)
        except Exception as exc:  # any: the held messages' release comes after this
            log.warning(
                "could not put back the record of %s, claimed as the worker stopped: %r",
                delivery.id,
                exc,
            )
            return
