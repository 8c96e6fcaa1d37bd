"""The content header frame written for each publish (``qtasks_rabbitmq.confirms``) is byte
for byte pamqp's, for every shape of message the publisher makes."""

from __future__ import annotations

from typing import Any

import pytest
from pamqp.commands import Basic
from pamqp.frame import marshal
from pamqp.header import ContentHeader

from qtasks_rabbitmq.confirms import Outgoing, content_header
from qtasks_rabbitmq.wire import H_DEAD_AT, H_DELIVERIES, H_ETA, H_ID, H_PRIORITY, H_REASON


def pamqp_header(message: Outgoing, channel: int) -> bytes:
    properties = Basic.Properties(
        headers=message.headers,
        delivery_mode=2,
        priority=message.priority,
        message_id=message.message_id,
        expiration=message.expiration,
    )
    return marshal(ContentHeader(0, len(message.body), properties), channel)


HEADERS: list[dict[str, Any] | None] = [
    None,
    {H_PRIORITY: -3},
    {H_PRIORITY: 7, H_DELIVERIES: 2},
    {H_ETA: 1_780_000_000_123},  # a long long in the table
    {H_ID: "é" + "x" * 300, H_DELIVERIES: 70_000},
    {H_REASON: "ValueError: ünïcode\n" * 50, H_DEAD_AT: 1_780_000_000_000, H_PRIORITY: 0},
]


@pytest.mark.parametrize("headers", HEADERS)
@pytest.mark.parametrize("priority", [0, 10, 20, 255])
@pytest.mark.parametrize("body", [b"", b"{}", b"x" * 200_000])
@pytest.mark.parametrize("message_id", ["a", "0123456789abcdef" * 2, "i" * 255])
@pytest.mark.parametrize("expiration", [None, "1", "604800000"])  # a dead letter's TTL in ms
def test_content_header_is_pamqps(
    headers: dict[str, Any] | None,
    priority: int,
    body: bytes,
    message_id: str,
    expiration: str | None,
) -> None:
    message = Outgoing(body, "task-id", message_id, headers, priority, "", "queue", expiration)
    for channel in (1, 2047):
        assert content_header(message, channel) == pamqp_header(message, channel)
