"""Publishing: every message the broker writes, each confirmed by RabbitMQ before it returns.

Task messages, delayed ones (into the wait-queue chain of :mod:`qtasks_rabbitmq.topology`),
copies with a new delivery count, requeued and dead letters are each a
:meth:`Publisher.message`, published through :meth:`Publisher.send` (:meth:`Publisher.send_many`
for a batch) or :meth:`Publisher.bury`, then :meth:`Link.publish_many
<qtasks_rabbitmq.link.Link.publish_many>` (publisher confirms, retried across reconnects).
:class:`Published` remembers the ids this process published, for ``cancel``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from uuid import uuid4

from qtasks_rabbitmq.confirms import Outgoing
from qtasks_rabbitmq.link import Link
from qtasks_rabbitmq.topology import Topology, delay_ms, delay_routing_key
from qtasks_rabbitmq.wire import (
    H_DEAD_AT,
    H_DELIVERIES,
    H_ETA,
    H_ID,
    H_PRIORITY,
    H_REASON,
    MAX_MESSAGE_ID,
    ms,
)

log = logging.getLogger("qtasks.rabbitmq")

Sendable = tuple[str, bytes, int, int, float | None]
"""What :meth:`Publisher.send` takes: id, body, priority, deliveries made, eta."""

TRACKED_IDS = 100_000
"""How many ids published by this process :meth:`Published.cancel` remembers."""


class Publisher:
    """Writes messages on one started :class:`~qtasks_rabbitmq.link.Link`."""

    __slots__ = ("link", "topology")

    def __init__(self, link: Link, topology: Topology) -> None:
        self.link = link
        self.topology = topology

    def message(
        self,
        id: str,
        body: bytes,
        priority: int,
        deliveries: int,
        route: tuple[str, str],
        extra: dict[str, Any] | None = None,
    ) -> Outgoing:
        """The message to publish to ``route`` (exchange, routing key), its headers and
        properties as the consumer reads them."""
        # Only what differs from the defaults travels in headers: encoding an AMQP table is a
        # good part of a publish's cost. The id is the message id (a short string); an id too
        # long for that goes in a header instead, and the message id is random (a returned
        # message is matched to its publish by it).
        headers: dict[str, Any] = dict(extra) if extra else {}
        if priority:
            headers[H_PRIORITY] = priority
        if deliveries:
            headers[H_DELIVERIES] = deliveries
        message_id = id
        if len(id) > MAX_MESSAGE_ID or not id.isascii():
            headers[H_ID] = id
            message_id = uuid4().hex
        amqp_priority = self.topology.amqp_priority(priority)
        return Outgoing(body, id, message_id, headers or None, amqp_priority, *route)

    def outgoing(
        self, id: str, body: bytes, priority: int, deliveries: int, eta: float | None
    ) -> Outgoing:
        """The message for the work queue, or for the delay chain when ``eta`` is ahead."""
        wait = delay_ms(eta - time.time()) if eta is not None else 0
        if wait > 0:
            assert eta is not None
            route = (self.topology.entry_exchange, delay_routing_key(wait))
            return self.message(id, body, priority, deliveries, route, {H_ETA: ms(eta)})
        return self.message(id, body, priority, deliveries, ("", self.topology.queue))

    async def send(
        self, id: str, body: bytes, priority: int, deliveries: int, eta: float | None
    ) -> None:
        """Publish to the work queue, or into the delay chain when ``eta`` is ahead."""
        await self.link.publish_many((self.outgoing(id, body, priority, deliveries, eta),))

    async def send_many(self, messages: Iterable[Sendable]) -> None:
        """:meth:`send` of each ``(id, body, priority, deliveries, eta)``, in order: the
        frames written in one go, the confirms awaited together."""
        outgoing = self.outgoing
        await self.link.publish_many([outgoing(*message) for message in messages])

    async def bury(self, id: str, body: bytes, priority: int, deliveries: int, reason: str) -> None:
        """Publish to the dead-letter queue with ``reason`` and the time, expiring
        ``dead_letter_ttl`` later (a per-message ``expiration``: a TTL needs no change to the
        queue's arguments, which RabbitMQ refuses on an existing queue), then drop the oldest
        beyond ``max_dead_letters`` (:meth:`Link.trim_dead`; a failure there is only logged:
        the letter is safe, and the next one trims)."""
        extra = {H_REASON: reason[:4000], H_DEAD_AT: ms(time.time())}
        dead = self.message(id, body, priority, deliveries, ("", self.topology.dead), extra)
        ttl = self.topology.dead_letter_ttl_ms
        if ttl is not None:
            dead = dead._replace(expiration=str(ttl))
        await self.link.publish_many((dead,), what="dead letter")
        keep = self.topology.max_dead_letters
        if keep is not None:
            try:
                await self.link.trim_dead(keep)
            except Exception as exc:
                log.warning("qtasks_rabbitmq: trimming %r failed: %r", self.topology.dead, exc)


class Published:
    """Ids published by this process and not received here yet, and those of them cancelled
    (the newest :data:`TRACKED_IDS` of each): RabbitMQ cannot remove a message from the middle
    of a queue, so a cancelled one is skipped when it is received. A cancelled message another
    process receives is never received here: it is forgotten in turn (the worker that runs
    it finds its stored record cancelled and acks it without running it)."""

    __slots__ = ("cancelled", "ids")

    def __init__(self) -> None:
        self.ids: OrderedDict[str, None] = OrderedDict()
        self.cancelled: OrderedDict[str, None] = OrderedDict()

    def remember(self, id: str) -> None:
        _bounded_add(self.ids, id)

    @contextmanager
    def publishing(self, ids: Sequence[str]) -> Iterator[None]:
        """Remember ``ids`` for the block that publishes them, before they are written: a
        consumer of this process may receive one before its confirm comes back, and forgets
        it then (remembered after the confirm, it stayed cancellable once delivered). A
        publish that raises forgets them again (neither cancellable nor skipped)."""
        for id in ids:
            _bounded_add(self.ids, id)
        try:
            yield
        except BaseException:
            for id in ids:
                self.ids.pop(id, None)
                self.cancelled.pop(id, None)
            raise

    def cancel(self, id: str) -> bool:
        """Mark ``id`` to be skipped on receipt; ``False`` if it is not one of ours (or was
        received already)."""
        if id in self.ids:
            del self.ids[id]
            _bounded_add(self.cancelled, id)
            return True
        return False

    def skip(self, id: str) -> bool:
        """On receipt of ``id``: forget it, and say whether it was cancelled."""
        if self.ids:
            self.ids.pop(id, None)
        if self.cancelled and id in self.cancelled:
            del self.cancelled[id]
            return True
        return False


def _bounded_add(ids: OrderedDict[str, None], id: str) -> None:
    """Add ``id`` as the newest of ``ids``, dropping the oldest past :data:`TRACKED_IDS`."""
    ids[id] = None
    if len(ids) > TRACKED_IDS:
        ids.popitem(last=False)
