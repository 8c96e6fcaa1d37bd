"""The wire format: header names, message properties, and reading and settling a delivery.

Times travel as integer milliseconds: AMQP tables carry Python floats as 32-bit floats.
"""

from __future__ import annotations

import math
from typing import Any

from aiormq.abc import DeliveredMessage

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
