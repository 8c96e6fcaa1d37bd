"""Keeping ``max_dead_letters``: after each dead letter, the oldest letters beyond the cap are
dropped (:class:`Trimmer`; ``Q.dead`` has no ``x-max-length``: see ``docs/rabbitmq.md``).

The trim runs on a channel of its own: aiormq closes a channel whose call is cancelled, so a
trim that timed out on the publish channel closed it, and the publishes after it paid a
reconnect. Here a failed trim closes only its own channel, opened again by the next trim.

``basic.get`` takes the oldest *ready* letter. While a reader (``dead_letters()``,
``requeue_dead_letters()``, ``purge_dead_letters(ids)``) holds the oldest letters un-acked,
dropping from the head would drop the newer ones behind them and keep the oldest, and AMQP
reports un-acked messages to no one else. So readers announce themselves (:func:`reading`):
while it holds letters, each consumes from ``Q.dead.readers``, a queue nothing is published
to. A trim takes the letters it would drop un-acked, then looks there: if it finds a
consumer, it puts them back (``Q.dead`` stays over the cap until the next dead letter after
the readers are done). Not seen: readers of earlier versions and other AMQP clients holding
letters, and a read that took its letters before the trim took its own and was over before
the trim looked (within the trim's ``basic.get`` round trips); a read that begins while a
trim holds letters does not list those.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue
from pamqp.commands import Basic

from qtasks_rabbitmq.topology import Topology

TRIM_BATCH = 100
"""Most dead letters one trim drops: an excess found (a lowered ``max_dead_letters``, a queue
that grew under an earlier version) goes over the next dead letters, none of them kept
waiting for long."""


@asynccontextmanager
async def reading(
    connection: AbstractConnection, topology: Topology
) -> AsyncIterator[AbstractQueue]:
    """``Q.dead`` on a channel of its own, announced as read for as long as the block runs
    (a consumer of ``Q.dead.readers``): a trim meanwhile puts back what it took. Letters got
    and not acked go back, in order, when the channel closes at the end."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        readers = await _declare_readers(channel, topology)
        await readers.consume(_ignore, no_ack=True)
        yield await channel.declare_queue(topology.dead, passive=True)
    finally:
        await channel.close()


async def _declare_readers(channel: AbstractChannel, topology: Topology) -> AbstractQueue:
    """``Q.dead.readers``, declared by its first user (the same arguments everywhere)."""
    return await channel.declare_queue(
        topology.dead_readers, durable=True, arguments=topology.readers_arguments()
    )


async def _ignore(message: AbstractIncomingMessage) -> None:
    """Nothing is published to ``Q.dead.readers``; a stray message is dropped."""


class Trimmer:
    """Drops the oldest dead letters beyond a cap, on a channel of its own (opened by the
    first trim, and again after it closed)."""

    def __init__(self, topology: Topology, timeout: float) -> None:
        self.topology = topology
        self.timeout = timeout
        self._channel: AbstractChannel | None = None

    async def trim(self, connection: AbstractConnection, keep: int) -> None:
        """Drop the oldest dead letters beyond ``keep``, at most :data:`TRIM_BATCH`, within
        ``timeout`` (0: no limit), unless a reader holds letters (see the module).

        The letters are got un-acked, and acked only if ``Q.dead.readers`` has no consumer
        then; else they are put back (as when a trim fails half-way: its channel closes).
        That is a passive declare of ``Q.dead``, one ``basic.get`` and one ack per letter
        dropped, and one declare of ``Q.dead.readers`` if any was got. Several processes
        dead-lettering at the cap at once may each drop the same excess (as may trims of one
        process at once), so a few of the oldest may go early."""
        dead = self.topology.dead
        async with asyncio.timeout(self.timeout or None):
            channel = await self._open(connection)
            declared = await channel.queue_declare(dead, passive=True)
            held: list[int] = []
            for _ in range(min((declared.message_count or 0) - keep, TRIM_BATCH)):
                got = await channel.basic_get(dead, no_ack=False)
                if isinstance(got.delivery, Basic.GetEmpty):
                    break  # another process trimmed meanwhile
                assert got.delivery_tag is not None
                held.append(got.delivery_tag)
            if not held:
                return
            # A reader that took letters before these were got holds older ones: then these
            # are not the oldest, and go back (in order, to where they were).
            if await self._read_now(channel):
                for tag in held:
                    await channel.basic_nack(tag, requeue=True, wait=False)
                return
            for tag in held:
                await channel.basic_ack(tag, wait=False)

    async def _read_now(self, channel: aiormq.Channel) -> bool:
        """Whether a reader holds dead letters now (``Q.dead.readers`` has a consumer)."""
        readers = await channel.queue_declare(
            self.topology.dead_readers, durable=True, arguments=self.topology.readers_arguments()
        )
        return bool(readers.consumer_count)

    async def _open(self, connection: AbstractConnection) -> aiormq.Channel:
        channel = self._channel
        if channel is None or channel.is_closed:
            # One closed by a failed trim (aiormq closed it) or by a lost connection.
            channel = self._channel = await connection.channel(publisher_confirms=False)
        return cast(aiormq.Channel, await channel.get_underlay_channel())

    async def close(self) -> None:
        """Close the channel (before its connection), whatever state it is in."""
        channel, self._channel = self._channel, None
        if channel is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await channel.close()
