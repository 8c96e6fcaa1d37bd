"""Keeping ``max_dead_letters``: after each dead letter, the oldest letters beyond the cap are
dropped (:class:`Trimmer`; ``Q.dead`` has no ``x-max-length``: see ``docs/rabbitmq.md``).

The trim runs on a channel of its own: aiormq closes a channel whose call is cancelled, so a
trim that timed out on the publish channel closed it, and the publishes after it paid a
reconnect. Here a failed trim closes only its own channel, opened again by the next trim.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import cast

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from pamqp.commands import Basic

from qtasks_rabbitmq.topology import Topology

TRIM_BATCH = 100
"""Most dead letters one trim drops: an excess found (a lowered ``max_dead_letters``, a queue
that grew under an earlier version) goes over the next dead letters, none of them kept
waiting for long."""


class Trimmer:
    """Drops the oldest dead letters beyond a cap, on a channel of its own (opened by the
    first trim, and again after it closed)."""

    def __init__(self, topology: Topology, timeout: float) -> None:
        self.topology = topology
        self.timeout = timeout
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()
        """One trim at a time in a process: trims at once (tasks failing together) each saw
        the same excess and dropped it again, and each opened a channel of its own."""

    async def trim(self, connection: AbstractConnection, keep: int) -> None:
        """Drop the oldest dead letters beyond ``keep``, at most :data:`TRIM_BATCH`, within
        ``timeout`` (0: no limit): a passive declare of ``Q.dead``, then one ``basic.get`` per
        letter dropped. The trims of one process run one after the other, each counting what
        the one before it left; several processes dead-lettering at the cap at once may each
        drop the same excess, so a few of the oldest may go early."""
        dead = self.topology.dead
        async with asyncio.timeout(self.timeout or None), self._lock:
            channel = await self._open(connection)
            declared = await channel.queue_declare(dead, passive=True)
            for _ in range(min((declared.message_count or 0) - keep, TRIM_BATCH)):
                got = await channel.basic_get(dead, no_ack=True)
                if isinstance(got.delivery, Basic.GetEmpty):
                    break  # another process trimmed meanwhile

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
