"""The wire format: header names, message properties, and reading and settling a delivery.

Times travel as integer milliseconds: AMQP tables carry Python floats as 32-bit floats.
"""

from __future__ import annotations

import asyncio
import math
import struct
from typing import Any

import aiormq
from aiormq.abc import ChannelFrame, DeliveredMessage
from aiormq.exceptions import ChannelInvalidStateError
from pamqp.commands import Basic
from pamqp.constants import FRAME_END, FRAME_METHOD

PERSISTENT = 2
"""AMQP ``delivery_mode`` of a message written to disk by a durable queue."""

H_ID = "x-qtasks-id"
"""The message id when it does not fit AMQP's ``message-id`` property (else that is used)."""
H_PRIORITY = "x-qtasks-priority"
"""The qtasks priority (absent: 0)."""
H_DELIVERIES = "x-qtasks-deliveries"
"""Deliveries already made of this message (absent: 0, when published or requeued)."""
H_ETA = "x-qtasks-eta-ms"
H_REASON = "x-qtasks-reason"
H_DEAD_AT = "x-qtasks-dead-at-ms"

MAX_MESSAGE_ID = 255
"""Longest AMQP ``message-id`` (a short string)."""


def as_int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def as_str(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return value if isinstance(value, str) and value else None


def ms(unix_time: float) -> int:
    return math.ceil(unix_time * 1000)


async def settle(message: DeliveredMessage, *, ack: bool) -> None:
    """Ack, or nack with requeue, on the channel the message came from.

    The frame is queued for the socket without waiting for the write buffer to drain: an ack
    is one-way in AMQP, so draining would tell nothing more, and the wait costs a loop turn."""
    tag = message.delivery_tag
    assert tag is not None, "a consumed message always has a delivery tag"
    if ack:
        await message.channel.basic_ack(tag, wait=False)
    else:
        await message.channel.basic_nack(tag, requeue=True, wait=False)


_ACK = struct.Struct(">BHIHHQBB")
"""A ``basic.ack`` method frame: type, channel, size; class, method, delivery tag, the
``multiple`` bit (off); the frame end."""
_ACK_FIELDS = (_ACK.size - 8, Basic.frame_id, Basic.Ack.frame_id)
"""Size (the frame's type, channel, size and end are not counted), class and method."""


def ack_frames(channel: int, tags: list[int]) -> bytes:
    """``basic.ack`` frames of ``tags`` on ``channel``, back to back (as pamqp marshals
    them, tested byte for byte)."""
    pack = _ACK.pack
    return b"".join(pack(FRAME_METHOD, channel, *_ACK_FIELDS, tag, 0, FRAME_END) for tag in tags)


class Acks:
    """The acks of one consumer channel: those made in one turn of the event loop are written
    as one write (one item of the connection's write queue, one ``send``), not one each.

    An ack is queued at the end of the turn it was made in, after the record it follows was
    stored, as aiormq's ``basic_ack(wait=False)`` queues it at once: neither waits for the
    socket, and an ack lost with its connection means the message comes back (at least
    once). :meth:`flush` writes what is pending at once (before the channel closes)."""

    __slots__ = ("_writing", "channel", "tags")

    def __init__(self, channel: aiormq.Channel) -> None:
        self.channel = channel
        self.tags: list[int] = []
        self._writing: set[asyncio.Task[None]] = set()

    def add(self, tag: int) -> None:
        """Ack ``tag`` at the end of this turn; raises if the channel is closed already."""
        if self.channel.is_closed:
            raise ChannelInvalidStateError(f"{self.channel!r} closed")
        if not self.tags:
            asyncio.get_running_loop().call_soon(self.flush)
        self.tags.append(tag)

    def flush(self) -> None:
        tags = self.tags
        if not tags:
            return
        self.tags = []
        channel = self.channel
        if channel.is_closed:
            return  # RabbitMQ delivers them again
        frame = ChannelFrame(payload=ack_frames(channel.number, tags), should_close=False)
        try:
            channel.write_queue.put_nowait(frame)
        except asyncio.QueueFull:  # the socket is behind: wait for room, in order
            task = asyncio.ensure_future(channel.write_queue.put(frame))
            self._writing.add(task)
            task.add_done_callback(self._writing.discard)
