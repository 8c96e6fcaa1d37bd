"""Names, arguments and routing of the RabbitMQ objects one qtasks queue uses.

For a queue named ``Q``:

* ``Q`` — the work queue (durable; classic with ``x-max-priority``, or quorum).
* ``Q.dead`` — dead letters, with the reason in the ``x-qtasks-reason`` header; each expires
  ``dead_letter_ttl`` after it died (its own ``expiration``); beyond ``max_dead_letters`` the
  oldest are dropped after each dead letter (not ``x-max-length``: see ``docs/rabbitmq.md``).
* ``Q.delay.0`` … ``Q.delay.31`` — wait queues, one per bit of the delay in milliseconds. Queue
  ``Q.delay.L`` holds every message for exactly ``2**L`` ms (``x-message-ttl``), then
  dead-letters it to the next lower level. Topic exchanges of the same names route a message
  into the queue of a level only when that bit of its delay is set (the routing key spells the
  bits), and past it otherwise, so a message waits exactly its delay after at most 32 hops,
  with no server plugin and no consumer in between.
* ``Q.delay.out`` — a fanout exchange bound to ``Q``, where the last level delivers.

This is the binary delay scheme of NServiceBus' RabbitMQ transport, with milliseconds as the unit.
Every wait queue has one TTL, so messages expire in order at the head (RabbitMQ only expires
messages at the head of a queue).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

LEVELS = 32
"""Delay bits: the longest single wait is ``2**32 - 1`` ms (about 49.7 days); longer delays are
waited in several passes."""

MAX_DELAY_MS = (1 << LEVELS) - 1

QueueType = Literal["classic", "quorum"]


@dataclass(frozen=True, slots=True)
class Topology:
    """The objects of one qtasks queue and how they are declared."""

    queue: str
    queue_type: QueueType = "classic"
    max_priority: int = 20
    """``x-max-priority`` of a classic work queue (0 turns priorities off)."""
    delivery_limit: int = 5
    """``x-delivery-limit`` of a quorum work queue."""
    version: int = 0
    """``x-queue-version`` of the classic queues (0: not sent, the server's default). See
    ``docs/rabbitmq.md`` for what version 2 changes in speed (same features and guarantees)."""
    dead_letter_ttl_ms: int | None = None
    """The ``expiration`` of each dead letter (``dead_letter_ttl``; ``None``: none)."""
    max_dead_letters: int | None = None
    """Most dead letters kept, the oldest dropped after each dead letter (``None``: all)."""

    @property
    def dead(self) -> str:
        return f"{self.queue}.dead"

    @property
    def delay_out(self) -> str:
        return f"{self.queue}.delay.out"

    def level(self, bit: int) -> str:
        """Name of the wait exchange and queue for delay bit ``bit``."""
        return f"{self.queue}.delay.{bit}"

    @property
    def entry_exchange(self) -> str:
        """Where delayed messages are published: the highest level."""
        return self.level(LEVELS - 1)

    @property
    def priorities(self) -> bool:
        """Whether the work queue orders by priority (quorum queues before RabbitMQ 4 cannot)."""
        return self.queue_type == "classic" and self.max_priority > 0

    def work_arguments(self) -> dict[str, Any]:
        args: dict[str, Any] = {
            "x-queue-type": self.queue_type,
            # Only the server dead-letters through this (a quorum delivery limit, a policy);
            # qtasks publishes its own dead letters, with a reason, confirmed.
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.dead,
        }
        if self.queue_type == "classic":
            if self.max_priority > 0:
                args["x-max-priority"] = self.max_priority
            self._versioned(args)
        else:
            args["x-delivery-limit"] = self.delivery_limit
        return args

    def dead_arguments(self) -> dict[str, Any]:
        """The arguments of ``Q.dead``: the same in every version (no cap, no TTL), or a
        process of another version would be refused it."""
        args: dict[str, Any] = {"x-queue-type": self.queue_type}
        if self.queue_type == "classic":
            self._versioned(args)
        return args

    def level_arguments(self, bit: int) -> dict[str, Any]:
        return self._versioned(
            {
                "x-queue-type": "classic",
                "x-message-ttl": 1 << bit,
                "x-dead-letter-exchange": self.level(bit - 1) if bit else self.delay_out,
            }
        )

    def _versioned(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.version:
            args["x-queue-version"] = self.version
        return args

    def amqp_priority(self, priority: int) -> int:
        """Map a qtasks priority (lower runs first, 0 the usual default) onto AMQP's (higher
        first, ``0..max_priority``): priorities from ``-max/2`` to ``+max/2`` stay distinct,
        others are clamped to the ends."""
        if not self.priorities:
            return 0
        return min(max(self.max_priority // 2 - priority, 0), self.max_priority)

    def all_queues(self) -> list[str]:
        return [self.queue, self.dead, *(self.level(bit) for bit in range(LEVELS))]

    def all_exchanges(self) -> list[str]:
        return [self.delay_out, *(self.level(bit) for bit in range(LEVELS))]


def delay_ms(seconds: float) -> int:
    """A delay rounded *up* to whole milliseconds (never early), capped at one pass."""
    return min(max(math.ceil(seconds * 1000), 0), MAX_DELAY_MS)


def delay_routing_key(milliseconds: int) -> str:
    """The routing key spelling ``milliseconds`` bit by bit, highest level first."""
    return ".".join("1" if milliseconds >> bit & 1 else "0" for bit in range(LEVELS - 1, -1, -1))


def level_pattern(bit: int, value: Literal["0", "1"]) -> str:
    """Topic pattern matching keys whose word for ``bit`` is ``value``."""
    return "*." * (LEVELS - 1 - bit) + value + ".#"
