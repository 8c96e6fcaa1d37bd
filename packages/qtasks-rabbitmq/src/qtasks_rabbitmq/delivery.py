"""One delivery handed to the worker: settled on the channel it came from, fenced after that
channel is gone (its methods then return ``False``)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiormq.abc import DeliveredMessage

from qtasks.components import Counting
from qtasks_rabbitmq.wire import settle

if TYPE_CHECKING:
    from qtasks_rabbitmq.consumer import Consumer


class RabbitMQDelivery:
    """One delivery from :class:`~qtasks_rabbitmq.RabbitMQBroker`; settles on the channel it
    came from."""

    __slots__ = (
        "_attempt",
        "_consumer",
        "_generation",
        "_id",
        "_message",
        "_priority",
        "_settled",
        "lease_until",
        "token",
    )

    def __init__(
        self,
        consumer: Consumer,
        generation: int,
        message: DeliveredMessage,
        id: str,
        priority: int,
        attempt: int,
    ) -> None:
        self._consumer = consumer
        self._generation = generation
        self._message = message
        self._id = id
        self._priority = priority
        self._attempt = attempt
        self._settled = False
        self.lease_until = 0.0
        self.token = f"{consumer.state.uid}.{generation}.{message.delivery_tag}"

    @property
    def id(self) -> str:
        return self._id

    @property
    def body(self) -> bytes:
        return self._message.body

    @property
    def priority(self) -> int:
        return self._priority

    @property
    def attempt(self) -> int:
        return self._attempt

    @property
    def generation(self) -> int:
        return self._generation

    def _live(self) -> bool:
        return not self._settled and self._consumer.state.holds(self._generation)

    async def _finish(self) -> bool:
        """Ack on the original channel; ``False`` if that channel is gone."""
        self._consumer.release(self.token)
        try:
            await settle(self._message, ack=True)
        except Exception:
            return False
        return True

    async def _then_finish(self, publish: Callable[[], Awaitable[None]]) -> bool:
        """Publish (a copy, a dead letter) and only then ack this delivery."""
        if not self._live():
            return False
        self._settled = True
        try:
            await publish()
        except BaseException:
            self._settled = False
            raise
        return await self._finish()

    async def _expire(self) -> None:
        """Hand back to the queue at once, counted as a delivery (``basic.nack`` with requeue),
        and fence the holder: its lease ran out, or its consumer closes."""
        if not self._live():
            return
        self._settled = True
        self._consumer.release(self.token)
        with contextlib.suppress(Exception):
            await settle(self._message, ack=False)

    async def ack(self) -> bool:
        if not self._live():
            return False
        self._settled = True
        return await self._finish()

    async def nack(self, reason: str) -> bool:
        publisher = self._consumer.publisher
        return await self._then_finish(
            lambda: publisher.bury(self._id, self.body, self._priority, self._attempt, reason)
        )

    async def requeue(
        self, *, delay: float | None = None, body: bytes | None = None, count: Counting = "reset"
    ) -> bool:
        publisher = self._consumer.publisher
        eta = time.time() + delay if delay else None
        # The copy carries the deliveries counted so far (see hand_back).
        deliveries = {"reset": 0, "kept": self._attempt, "earlier": self._attempt - 1}[count]
        return await self._then_finish(
            lambda: publisher.send(
                self._id, self.body if body is None else body, self._priority, deliveries, eta
            )
        )

    async def extend(self) -> bool:
        if not self._live():
            return False
        self.lease_until = time.monotonic() + self._consumer.lease
        return True

    async def hand_back(self) -> None:
        """Return an unstarted delivery without counting it: publish a copy, ack this one.
        The copy carries the deliveries counted before this one (``attempt - 1``), whoever
        counted them: on a quorum queue RabbitMQ's ``x-delivery-count`` is part of it."""
        publisher = self._consumer.publisher
        deliveries = self._attempt - 1
        with contextlib.suppress(Exception):
            await self._then_finish(
                lambda: publisher.send(self._id, self.body, self._priority, deliveries, None)
            )
