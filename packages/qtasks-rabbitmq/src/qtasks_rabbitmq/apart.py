"""Keeping a suspect apart, over a consumer's :class:`ChannelState`.

A suspect (a delivery from :func:`~qtasks.components.alone_from` on: its earlier deliveries
were lost with their holders) kills its worker again, maybe: what the process holds then,
received and not handed out, comes back counted too (RabbitMQ pushes up to the prefetch to the
channel), and innocent messages follow it to the dead-letter queue. So the first suspect is kept
apart (:meth:`Apart.keep`): the consumer is cancelled (RabbitMQ pushes nothing more), what it
received and had not handed out is handed back uncounted (published again with its count, the
original acked), and only then is the suspect handed out, alone; once it is settled or lost (its
lease run out) the consumer consumes again. A message received meanwhile (pushed before the
cancel took effect, another suspect among them) is handed back uncounted.
"""

from __future__ import annotations

import asyncio
import functools
import uuid as uuid_mod
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiormq
from aio_pika.abc import AbstractChannel
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp import commands as spec

if TYPE_CHECKING:
    from qtasks_rabbitmq.delivery import RabbitMQDelivery


def _set_event() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


@dataclass(eq=False)
class ChannelState:
    """A consumer's channel and what was received on it: read and changed by its receive
    path, its lease and qos loops, keeping a suspect apart and its close (the awaits of a
    reopen, a resume and the close under :attr:`lock`)."""

    queue: str
    uid: str
    generation: int = 0
    channel: AbstractChannel | None = None
    underlay: aiormq.Channel | None = None
    tag: str | None = None
    """The consumer's tag while it consumes."""
    paused: bool = False
    """Not consuming on purpose (a suspect kept apart): the watchdog sees it alive."""
    closing: bool = False
    buffer: asyncio.Queue[RabbitMQDelivery] = field(default_factory=asyncio.Queue)
    """Received, not handed to the worker yet."""
    held: dict[str, RabbitMQDelivery] = field(default_factory=dict)
    """Handed to the worker, not settled yet, by token."""
    pending: int = 0
    """Messages being received (their receipt awaits)."""
    idle: asyncio.Event = field(default_factory=_set_event)
    """Set while :attr:`pending` is 0."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    retired: list[str] = field(default_factory=list)
    """Consumer tags cancelled to keep a suspect apart whose callbacks aiormq still holds
    (late deliveries for them are received); dropped once the consumer consumes again."""

    def holds(self, generation: int) -> bool:
        channel = self.channel
        return generation == self.generation and channel is not None and not channel.is_closed

    def alive(self) -> bool:
        channel = self.channel
        if channel is None or channel.is_closed:
            return False
        if self.paused:
            return True  # not consuming on purpose, while a suspect is kept apart
        if self.tag is None:
            return False
        return self.underlay is not None and self.tag in self.underlay.consumers

    def new_tag(self) -> str:
        """A consumer tag, known before the first message comes: a suspect among the first
        cancels the consumer by it."""
        return f"qtasks.{self.uid}.{uuid_mod.uuid4().hex[:12]}"


OnMessage = Callable[[int, DeliveredMessage], Coroutine[Any, Any, None]]
"""The consumer's callback for a message of a generation's channel."""
Failed = Callable[[int, BaseException], None]
"""Told that keeping a suspect apart on a generation's channel failed (the link reconnects)."""


async def cancel(underlay: aiormq.Channel, tag: str, queue: str) -> None:
    """Cancel the consumer ``tag``; return once RabbitMQ sent what it pushed for it before.
    A quorum queue may still push for it a moment after the cancel is answered (RabbitMQ 3.10
    does), and aiormq drops a message for a tag it forgot: left unacked on the channel, it
    would come back counted. So the ``basic.cancel`` goes out with ``nowait`` and is not
    waited for, and aiormq keeps the tag's callback: what still comes is received (handed
    back, while a suspect is kept apart or the consumer closes). The answer to a passive
    declare sent after the cancel comes after what RabbitMQ pushed before it (a classic queue
    pushes nothing later). A suspect's cancelled tag is dropped once the consumer consumes
    again (:attr:`ChannelState.retired`); a close's, with the channel.

    Written on aiormq's frame queue, as :mod:`qtasks_rabbitmq.confirms` writes a batch of
    publishes, not through ``basic_cancel``: aiormq before 7.2.4 waits for an answer to a
    synchronous method sent with ``nowait``, which RabbitMQ never sends, holding every later
    RPC of the channel (this declare, the next consume) behind that wait for ever."""
    if underlay.is_closed:  # a frame for a closed channel would close the connection
        raise aiormq.exceptions.ChannelInvalidStateError(f"{underlay!r} closed")
    frame = spec.Basic.Cancel(consumer_tag=tag, nowait=True)
    await underlay.write_queue.put(
        ChannelFrame.marshall(channel_number=underlay.number, frames=[frame])
    )
    await underlay.queue_declare(queue, passive=True)


class Apart:
    """Keeping a suspect apart on one consumer's channel (see the module)."""

    def __init__(self, state: ChannelState, on_message: OnMessage, failed: Failed) -> None:
        self.state = state
        self._on_message = on_message
        self._failed = failed
        self.suspect: RabbitMQDelivery | None = None
        """The suspect kept apart, from its receipt until it is settled or lost (or its
        channel is gone): the consumer consumes nothing meanwhile."""
        self.staged: RabbitMQDelivery | None = None
        """The suspect kept apart while what was received beside it is handed back, before
        it goes to the buffer (handed back by the consumer's close if it is still here)."""
        self.pausing: asyncio.Future[Any] | None = None
        """The consumer's cancel under way, or answered."""
        self._over = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def keep(self, delivery: RabbitMQDelivery) -> None:
        """Keep ``delivery``, a suspect or a message received while one is kept apart, as
        the module says."""
        state = self.state
        if self.suspect is not None:
            await delivery.hand_back()
            return
        if not delivery._live():
            # Of a channel replaced meanwhile (a reconnect during its receipt's awaits):
            # RabbitMQ delivers it again; keeping it apart would cancel the new consumer.
            return
        self.suspect = self.staged = delivery
        state.paused = True
        self._over = asyncio.Event()
        beside: list[RabbitMQDelivery] = []
        buffer = state.buffer
        while not buffer.empty():
            beside.append(buffer.get_nowait())
        tag, underlay = state.tag, state.underlay
        state.tag = self.pausing = None
        if tag is not None and underlay is not None:
            state.retired.append(tag)
            # Shielded (aiormq closes a channel whose RPC is cancelled mid-flight); its
            # outcome is read even if nobody awaits it (the consumer's close cut in).
            self.pausing = asyncio.ensure_future(cancel(underlay, tag, state.queue))
            self.pausing.add_done_callback(read_outcome)
        self._task = asyncio.create_task(
            self._resume(delivery, self._over), name="qtasks-rabbitmq-apart"
        )
        for other in beside:
            await other.hand_back()

    def released(self, token: str) -> None:
        """A delivery was settled or lost: the suspect's wakes the consumer."""
        suspect = self.suspect
        if suspect is not None and suspect.token == token:
            self.suspect = None
            self._over.set()

    async def _resume(self, suspect: RabbitMQDelivery, over: asyncio.Event) -> None:
        """Hand out ``suspect`` once the consumer's cancel is answered and what it received
        beside it is handed back; consume again once it is settled or lost. Woken by the
        settle (or the suspect's channel gone, or the consumer's close), never polling."""
        state = self.state
        generation = suspect.generation
        try:
            pausing = self.pausing
            if pausing is not None:
                await asyncio.shield(pausing)
            # The messages pushed before the cancel's answer are being handed back: once
            # they are (the consumer idle), the suspect goes out alone.
            await state.idle.wait()
            if self.staged is suspect:
                self.staged = None
                if suspect._live():
                    state.buffer.put_nowait(suspect)
                elif self.suspect is suspect:  # its channel is gone: nothing to wait for
                    self.suspect = None
                    over.set()
            await over.wait()
            async with state.lock:
                if state.closing or not state.holds(generation) or self.suspect is not None:
                    return
                underlay = state.underlay
                assert underlay is not None
                state.tag = tag = state.new_tag()
                state.paused = False
                retired, state.retired = state.retired, []
                rpc = asyncio.ensure_future(
                    underlay.basic_consume(
                        state.queue,
                        functools.partial(self._on_message, generation),
                        consumer_tag=tag,
                    )
                )
                rpc.add_done_callback(read_outcome)
                await asyncio.shield(rpc)
                # Dropped only now, or aiormq's dict grew by one per suspect for the channel's
                # life. Nothing more comes for those tags: their barriers were answered before
                # this consume was sent (what a quorum queue pushed across the cancel may
                # trail its barrier's answer: this second round trip is later still).
                for old in retired:
                    underlay.consumers.pop(old, None)
        except Exception as exc:
            state.paused = False
            self._failed(generation, exc)

    def end(self) -> None:
        """Forget the suspect kept apart (its channel is gone, or the consumer closes)."""
        self.suspect = self.staged = None
        self.state.paused = False
        self.pausing = None
        self._over.set()
        self.stop()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


def read_outcome(rpc: asyncio.Future[Any]) -> None:
    if not rpc.cancelled():
        rpc.exception()  # read, so that asyncio does not log it as never retrieved
