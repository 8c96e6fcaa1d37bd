"""One batch of publishes on aiormq's channel: the frames written in one go, the publisher
confirms awaited together.

aiormq's ``basic_publish`` costs, per message, a coroutine (a task of its own when batches are
gathered), the channel lock, a timeout scope, a frame list marshalled through a ``BytesIO``, one
write-queue item and a future with four callbacks; a batch of 1,000 spent most of the
producer's time there. :func:`publish_batch` writes the same frames (``basic.publish``, the
content header, the body frames) for a whole batch as one write-queue item, then registers a
future per delivery tag in ``channel.confirmations``, where aiormq's reader resolves acks
(``multiple`` ones too), nacks and returns exactly as for its own publishes. One future for the
batch wakes the caller: when every confirm came, at the first nack or return, when the
channel or connection closes (a future of the channel's, which aiormq rejects then), or at
the deadline (``publish_timeout`` after the publish began, shared with the wait for a lost
connection: a silent partition with heartbeats off, a broker that blocks publishers).

A batch is written only while more of the deadline is left than a confirm takes
(:class:`ConfirmPace`): written later, it would be reported as timed out at once though
RabbitMQ takes it, and the caller's retry would publish it twice.

The server gains too: frames that arrive in large writes cost RabbitMQ about half the CPU per
message of one write per message (``bench/rabbitmq_bulk_cost.py``).
"""

from __future__ import annotations

import asyncio
import math
import re
import struct
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import aiormq
from aiormq.abc import ChannelFrame
from aiormq.exceptions import (
    ChannelAccessRefused,
    ChannelClosed,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    DeliveryError,
    PublishError,
)
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.constants import FRAME_END_CHAR, FRAME_HEADER
from pamqp.encode import field_table
from pamqp.frame import marshal

from qtasks_rabbitmq.errors import PublishRejectedError
from qtasks_rabbitmq.wire import PERSISTENT


class ConfirmTimeout(TimeoutError):
    """The broker's confirms did not come in time, or would not have (the batch was then not
    written); the connection may still be fine."""


CONFIRM_FLOOR = 0.005
"""Seconds of the deadline a batch must have left to be written, at least: a confirm takes
~0.3-1 ms on a local server; a few ms leave it room without refusing publishes that have
time."""


REFUSALS = (ChannelPreconditionFailed, ChannelNotFoundEntity, ChannelAccessRefused)
"""How RabbitMQ closes a channel refusing a publish on it (406, 404, 403: a body over its
``max_message_size``, an exchange that does not exist, no write permission); the connection
stays up. A connection that closes fails its channels with connection errors instead."""

_SERVER_LIMIT = re.compile(r"larger than configured max size (\d+)")


def refusal(exc: BaseException) -> ChannelClosed | None:
    """``exc`` as RabbitMQ's refusal of a publish (:data:`REFUSALS`), else ``None``."""
    return exc if isinstance(exc, REFUSALS) else None


def size_limit(exc: ChannelClosed) -> int | None:
    """The ``max_message_size`` a refusal names (RabbitMQ: "message size N is larger than
    configured max size M"), or ``None`` for a refusal of another kind."""
    found = _SERVER_LIMIT.search(str(exc))
    return int(found.group(1)) if found else None


class ConfirmPace:
    """How long confirms take on one link lately (a moving average of the time from writing a
    batch to its last confirm), for :func:`publish_batch` to decide whether a batch still has
    time for its confirms: it needs :meth:`floor` of its deadline left to be written."""

    __slots__ = ("cap", "recent")

    def __init__(self, cap: float = math.inf) -> None:
        self.recent = 0.0
        self.cap = cap
        """The floor never exceeds this (half the publish timeout): a short timeout still
        writes what it is given at once."""

    def observe(self, seconds: float) -> None:
        self.recent += (seconds - self.recent) / 8

    def floor(self) -> float:
        """:data:`CONFIRM_FLOOR`, or the recent confirm time when confirms take longer (a
        distant or busy server); at most :attr:`cap`."""
        return min(max(CONFIRM_FLOOR, self.recent), self.cap)


class Outgoing(NamedTuple):
    """One message to publish: persistent, ``mandatory`` (an unroutable one comes back and
    raises)."""

    body: bytes
    id: str
    """The task id, naming the message in errors."""
    message_id: str
    """AMQP ``message-id`` (at most 255 bytes): a returned message is matched by it."""
    headers: dict[str, Any] | None
    priority: int
    """AMQP priority."""
    exchange: str
    routing_key: str
    expiration: str | None = None
    """AMQP ``expiration`` in ms (only dead letters have one)."""


class Attempt(NamedTuple):
    """What one :func:`publish_batch` did."""

    rest: Sequence[Outgoing]
    """The messages not confirmed, in order (to publish again); empty when all were."""
    trouble: BaseException | None
    """Why ``rest`` is not empty."""
    written: bool
    """Whether ``rest`` was written: then it may have been delivered though not confirmed."""


_HEADER = struct.Struct(">BHIHxxQH")  # frame type, channel, size; class, weight, body size, flags
_FLAGS = Basic.Properties.flags
_PLAIN = _FLAGS["delivery_mode"] | _FLAGS["priority"] | _FLAGS["message_id"]
_WITH_HEADERS = _PLAIN | _FLAGS["headers"]
_HEADER_SIZE = _HEADER.size - 7  # the frame's own type, channel and size are not counted


def content_header(message: Outgoing, channel: int) -> bytes:
    """The content header frame of ``message``: exactly pamqp's for ``Basic.Properties`` of
    its headers, delivery mode 2, priority and message id (tested byte for byte), with the
    properties built and encoded in ~0.5 instead of ~5.7 us without headers (pamqp validates
    them and encodes each of the 14 through a type lookup; a headers table costs both ~3 us)."""
    if message.expiration is not None:
        return _expiring_header(message, channel, message.expiration.encode())
    message_id = message.message_id.encode()
    headers = message.headers
    table = field_table(headers) if headers else b""
    size = _HEADER_SIZE + len(table) + 3 + len(message_id)
    flags = _WITH_HEADERS if headers else _PLAIN
    return b"".join(
        (
            _HEADER.pack(FRAME_HEADER, channel, size, Basic.frame_id, len(message.body), flags),
            table,
            bytes((PERSISTENT, message.priority, len(message_id))),
            message_id,
            FRAME_END_CHAR,
        )
    )


def _expiring_header(message: Outgoing, channel: int, expiration: bytes) -> bytes:
    """:func:`content_header` with an ``expiration`` (a short string written between the
    priority and the message id, in the order of the property flags)."""
    message_id = message.message_id.encode()
    headers = message.headers
    table = field_table(headers) if headers else b""
    size = _HEADER_SIZE + len(table) + 4 + len(expiration) + len(message_id)
    flags = (_WITH_HEADERS if headers else _PLAIN) | _FLAGS["expiration"]
    return b"".join(
        (
            _HEADER.pack(FRAME_HEADER, channel, size, Basic.frame_id, len(message.body), flags),
            table,
            bytes((PERSISTENT, message.priority, len(expiration))),
            expiration,
            bytes((len(message_id),)),
            message_id,
            FRAME_END_CHAR,
        )
    )


def frames(channel: aiormq.Channel, messages: Sequence[Outgoing]) -> bytes:
    """The frames of ``messages`` on ``channel``, back to back."""
    number = channel.number
    largest = channel.max_content_size
    publish_frames: dict[tuple[str, str], bytes] = {}
    parts: list[bytes] = []
    append = parts.append
    for message in messages:
        route = (message.exchange, message.routing_key)
        publish = publish_frames.get(route)
        if publish is None:
            method = Basic.Publish(exchange=route[0], routing_key=route[1], mandatory=True)
            publish = publish_frames[route] = marshal(method, number)
        append(publish)
        append(content_header(message, number))
        body = message.body
        for start in range(0, len(body), largest):
            append(marshal(ContentBody(body[start : start + largest]), number))
    return b"".join(parts)


async def publish_batch(
    channel: aiormq.Channel,
    messages: Sequence[Outgoing],
    what: str,
    deadline: float | None,
    pace: ConfirmPace,
) -> Attempt:
    """Publish ``messages`` in order on ``channel`` (publisher confirms on) and wait until the
    broker confirmed every one, until ``deadline`` (:func:`time.monotonic`; ``None``: no
    limit). The deadline bounds the whole call: waiting for the channel's lock and for room
    in the connection's write queue (full while the socket does not drain) as well as for the
    confirms; the frames are written only while ``pace.floor()`` of it is left.

    Return an :class:`Attempt`: nothing left when all were confirmed; on connection or
    channel trouble, the messages not confirmed, the error (a :class:`ConfirmTimeout` when
    time ran out) and whether they were written. A message returned as unroutable or nacked
    raises :class:`PublishRejectedError` (the first such in the batch's order; ``what`` and
    its id name it)."""
    if not messages:
        return Attempt((), None, written=False)
    loop = asyncio.get_running_loop()
    payload = frames(channel, messages)  # before the floor's check: a large batch takes ms
    write_by = None
    if deadline is not None:
        floor = pace.floor()
        write_by = _loop_time(loop, deadline) - floor
        if write_by <= loop.time():
            # Written now, it would time out before its confirm could come.
            left = max(deadline - time.monotonic(), 0)
            why = f"{left * 1000:.1f} ms left, less than a confirm takes ({floor * 1000:.1f} ms)"
            return Attempt(messages, ConfirmTimeout(why), written=False)
    lost = channel.create_future()  # rejected by aiormq when the channel or connection closes
    futures: list[asyncio.Future[object]] = []
    first = 0
    try:
        try:
            # Until ``write_by`` only: what waits for the lock or for room past it is not
            # written (a cancelled put adds nothing), so a written batch has its floor left.
            async with asyncio.timeout_at(write_by), channel.lock:
                await channel.write_queue.put(ChannelFrame(payload=payload, should_close=False))
                written_at = loop.time()
                # No await from here: the frames cannot reach the broker (so no confirm can
                # come) before the delivery tags are registered.
                first = channel.delivery_tag + 1
                futures = [loop.create_future() for _ in messages]
                confirmations = channel.confirmations
                by_id = channel.message_id_delivery_tag
                for tag, (message, future) in enumerate(zip(messages, futures, strict=True), first):
                    confirmations[tag] = future
                    by_id[message.message_id] = tag
                channel.delivery_tag = first + len(messages) - 1
        except TimeoutError:  # nothing was written: the lock or the write queue stayed busy
            return Attempt(messages, ConfirmTimeout("the connection took no frames in time"), False)
        except Exception as exc:  # the channel closed before writing (a put adds all or none)
            return Attempt(messages, exc, written=False)
        done = _settled(futures, lost)
        if deadline is None:
            await done
        else:
            timer = loop.call_at(_loop_time(loop, deadline), _time_up, done, lost)
            try:
                await done
            finally:
                timer.cancel()
        rest, trouble = _outcome(messages, futures, lost, what)
        if trouble is None:
            pace.observe(loop.time() - written_at)
        return Attempt(rest, trouble, written=True)
    finally:
        if not lost.done():
            lost.cancel()
        elif not lost.cancelled():
            lost.exception()  # read: no "never retrieved" warning when all came anyway
        _forget_ids(channel, messages, futures, first)


def _settled(
    futures: list[asyncio.Future[object]], lost: asyncio.Future[object]
) -> asyncio.Future[None]:
    """A future done once every future is, at the first failed one, or when ``lost`` is."""
    done: asyncio.Future[None] = lost.get_loop().create_future()
    left = len(futures)

    def one(future: asyncio.Future[object]) -> None:
        nonlocal left
        left -= 1
        # Read every failure, also after the batch raised: no "never retrieved" warning.
        failed = future.cancelled() or future.exception() is not None
        if (failed or left == 0) and not done.done():
            done.set_result(None)

    def gone(_: asyncio.Future[object]) -> None:
        if not done.done():
            done.set_result(None)

    for future in futures:
        future.add_done_callback(one)
    lost.add_done_callback(gone)
    return done


def _loop_time(loop: asyncio.AbstractEventLoop, deadline: float) -> float:
    """``deadline`` (:func:`time.monotonic`) on ``loop``'s clock (another for some loops)."""
    return loop.time() + (deadline - time.monotonic())


def _time_up(done: asyncio.Future[None], lost: asyncio.Future[object]) -> None:
    if not done.done() and not lost.done():
        lost.set_exception(ConfirmTimeout("no publisher confirm in time"))


def _outcome(
    messages: Sequence[Outgoing],
    futures: list[asyncio.Future[object]],
    lost: asyncio.Future[object],
    what: str,
) -> tuple[Sequence[Outgoing], BaseException | None]:
    rest: list[Outgoing] = []
    for message, future in zip(messages, futures, strict=True):
        if not future.done() or future.cancelled():
            rest.append(message)
            continue
        exc = future.exception()
        if isinstance(exc, PublishError):
            raise PublishRejectedError(f"{what} {message.id}", "unroutable: no queue bound for it")
        if exc is not None:  # a nack (DeliveryError): aiormq sets no other error here
            reason = f"the broker nacked it ({exc})" if isinstance(exc, DeliveryError) else str(exc)
            raise PublishRejectedError(f"{what} {message.id}", reason)
    if not rest:
        return (), None
    cause = lost.exception() if lost.done() and not lost.cancelled() else None
    return rest, cause or ConnectionError("the channel closed before the confirms came")


def _forget_ids(
    channel: aiormq.Channel,
    messages: Sequence[Outgoing],
    futures: list[asyncio.Future[object]],
    first: int,
) -> None:
    """Drop the message-id entries aiormq matches returns with, once each publish is settled
    (as aiormq's own publish does)."""
    by_id = channel.message_id_delivery_tag
    for tag, (message, future) in enumerate(zip(messages, futures, strict=False), first):
        id = message.message_id
        if future.done():
            if by_id.get(id) == tag:
                del by_id[id]
        else:
            future.add_done_callback(partial(_forget, by_id, id, tag))


def _forget(by_id: dict[str, int], id: str, tag: int, _: object) -> None:
    if by_id.get(id) == tag:
        del by_id[id]
