"""Inspection and management on a channel of their own: queue counts for ``stats``, reading and
requeueing dead letters, and the reason of a message RabbitMQ dead-lettered itself.

RabbitMQ drops an expired dead letter when it reaches the head of ``Q.dead``; reading the
queue removes one met past ``dead_letter_ttl`` all the same (one written before dead letters
had an ``expiration``, or one RabbitMQ dead-lettered itself), so none is listed or requeued."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, cast

from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from qtasks.components import DeadLetter
from qtasks_rabbitmq.publisher import Publisher
from qtasks_rabbitmq.topology import LEVELS, Topology
from qtasks_rabbitmq.wire import H_DEAD_AT, H_DELIVERIES, H_ID, H_PRIORITY, H_REASON, as_int, as_str


async def counts(connection: AbstractConnection, topology: Topology) -> tuple[int, int, int]:
    """Ready, delayed and dead messages, as RabbitMQ counts them."""
    channel = await connection.channel(publisher_confirms=False)
    try:

        async def count(name: str) -> int:
            queue = await channel.declare_queue(name, passive=True)
            result = queue.declaration_result
            return int(result.message_count or 0)

        ready = await count(topology.queue)
        dead = await count(topology.dead)
        delayed = 0
        for bit in range(LEVELS):
            delayed += await count(topology.level(bit))
    finally:
        await channel.close()
    return ready, delayed, dead


async def dead_letters(
    connection: AbstractConnection, topology: Topology, limit: int
) -> list[DeadLetter]:
    """The oldest ``limit`` dead letters (read without removing them)."""
    channel = await connection.channel(publisher_confirms=False)
    letters: list[DeadLetter] = []
    try:
        queue = await channel.declare_queue(topology.dead, passive=True)
        while len(letters) < limit:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            letter = _dead_letter(message)
            if _expired(letter, topology):
                await message.ack()
                continue
            letters.append(letter)
    finally:
        await channel.close()  # hands every message back, in order
    return letters


async def requeue_dead_letters(
    connection: AbstractConnection, publisher: Publisher, ids: list[str] | None
) -> int:
    """Publish dead letters (those of ``ids``, or all) to the work queue again, with their
    delivery count reset; return how many."""
    wanted = None if ids is None else set(ids)
    channel = await connection.channel(publisher_confirms=False)
    moved = 0
    try:
        queue = await channel.declare_queue(publisher.topology.dead, passive=True)
        total = int(queue.declaration_result.message_count or 0)
        for _ in range(total):
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            letter = _dead_letter(message)
            if _expired(letter, publisher.topology):
                await message.ack()
                continue
            if wanted is not None and letter.id not in wanted:
                continue  # left unacked: the channel close puts it back
            await publisher.send(letter.id, letter.body, letter.priority, 0, None)
            await message.ack()
            moved += 1
    finally:
        await channel.close()
    return moved


async def purge_dead_letters(
    connection: AbstractConnection, topology: Topology, ids: list[str] | None
) -> int:
    """Delete dead letters (those of ``ids``, or all) for good; return how many."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        queue = await channel.declare_queue(topology.dead, passive=True)
        if ids is None:
            result = await queue.purge()
            return int(getattr(result, "message_count", 0) or 0)
        wanted = set(ids)
        purged = 0
        total = int(queue.declaration_result.message_count or 0)
        for _ in range(total if wanted else 0):
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            letter = _dead_letter(message)
            if _expired(letter, topology):
                await message.ack()
            elif letter.id in wanted:
                await message.ack()
                purged += 1
            # others are left unacked: the channel close puts them back
        return purged
    finally:
        await channel.close()


def _expired(letter: DeadLetter, topology: Topology) -> bool:
    """Whether ``letter`` died ``dead_letter_ttl`` ago or more (one of unknown age is kept)."""
    ttl = topology.dead_letter_ttl_ms
    return ttl is not None and 0 < letter.dead_at <= time.time() - ttl / 1000


def _dead_letter(message: AbstractIncomingMessage) -> DeadLetter:
    headers = message.headers or {}
    id = as_str(headers.get(H_ID)) or message.message_id or "unknown"
    reason = as_str(headers.get(H_REASON))
    dead_at_ms = as_int(headers.get(H_DEAD_AT), 0)
    dead_at = dead_at_ms / 1000 if dead_at_ms else None
    if reason is None:
        reason, dead_at = _server_reason(headers)
    return DeadLetter(
        id=id,
        body=message.body,
        reason=reason,
        priority=as_int(headers.get(H_PRIORITY), 0),
        deliveries=as_int(headers.get(H_DELIVERIES), 0),
        dead_at=dead_at or 0.0,
    )


def _server_reason(headers: dict[str, Any]) -> tuple[str, float | None]:
    """A reason for a message RabbitMQ dead-lettered itself, from its ``x-death`` header."""
    deaths = headers.get("x-death")
    if not isinstance(deaths, list) or not deaths or not isinstance(deaths[0], dict):
        return "dead-lettered by RabbitMQ (no reason recorded)", None
    death = cast(dict[str, Any], deaths[0])
    why = as_str(death.get("reason")) or "unknown"
    queue = as_str(death.get("queue")) or "?"
    when = death.get("time")
    dead_at = when.timestamp() if isinstance(when, datetime) else None
    if why == "delivery_limit":
        return f"delivery limit reached: RabbitMQ's x-delivery-limit on queue {queue!r}", dead_at
    return f"dead-lettered by RabbitMQ: {why} in queue {queue!r}", dead_at
