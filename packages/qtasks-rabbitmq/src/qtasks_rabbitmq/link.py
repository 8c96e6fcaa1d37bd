"""One supervised AMQP connection: connect, declare, publish with confirms, reconnect.

aio-pika's ``connect_robust`` restores channels and consumers by itself, but it hides *when* a
channel was replaced, and a delivery tag acked on the new channel would settle some other
message. This link owns the reconnect loop instead: every (re)connection gets a new
``generation``, consumers re-open their channel under it, and deliveries from an older generation
are refused (their ``ack`` returns ``False``). A watchdog checks every few seconds that the
connection and each consumer are still alive, so a silently cancelled consumer (queue deleted,
server-side cancel) is restarted instead of leaving the worker idle forever.

A link belongs to the event loop it was started in. When that loop ends (``asyncio.run``,
``anyio.run`` and pytest-asyncio cancel every task left before closing it), the supervisor's
cancellation is the signal: the link closes quietly, publish channel then connection, while the
loop still runs, instead of reporting the aiormq tasks' cancellation as a lost connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from typing import cast

import aio_pika
import aiormq
import anyio
from aio_pika.abc import AbstractChannel, AbstractConnection

from qtasks.errors import BrokerConnectionError, CredentialsRefusedError
from qtasks.masking import MASK, mask_text, mask_url
from qtasks.outage import tls_refused
from qtasks_rabbitmq.confirms import (
    ConfirmPace,
    ConfirmTimeout,
    Outgoing,
    publish_batch,
    refusal,
    size_limit,
)
from qtasks_rabbitmq.declaring import declare
from qtasks_rabbitmq.errors import (
    NOT_AMQP,
    OversizedMessageError,
    PublishRejectedError,
    TopologyError,
    closed_at_open,
    not_amqp,
    refused_at_connect,
)
from qtasks_rabbitmq.masking import mask_library_logs
from qtasks_rabbitmq.retention import Trimmer
from qtasks_rabbitmq.settings import check_url
from qtasks_rabbitmq.topology import Topology

log = logging.getLogger("qtasks.rabbitmq")

Reopen = Callable[[AbstractConnection, int], Awaitable[None]]


def describe(exc: BaseException, secret: str | None) -> str:
    """A one-line description of ``exc`` that never contains ``secret`` (the URL's password,
    or its user information when that has no password: a key), nor what
    :func:`~qtasks.masking.mask_text` masks."""
    return masked(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, secret)


def masked(text: str, secret: str | None) -> str:
    """``text`` without ``secret`` nor what :func:`~qtasks.masking.mask_text` masks."""
    if secret:
        text = text.replace(secret, MASK)
    return mask_text(text)


class Link:
    """A connection that comes back by itself, with a publisher-confirm channel."""

    def __init__(
        self,
        url: str,
        topology: Topology,
        *,
        heartbeat: int = 30,
        connect_timeout: float = 10.0,
        publish_timeout: float = 30.0,
        watchdog_interval: float = 5.0,
        max_message_size: int | None = None,
    ) -> None:
        parsed = check_url(url)  # checked by the broker's constructor already
        if "heartbeat" not in parsed.query:
            parsed = parsed.update_query(heartbeat=heartbeat)
        self._url = str(parsed)
        # As mask_url: a password, or user information without one (a key, not a name).
        self._secret = parsed.password or parsed.user or None
        self.safe_url = mask_url(self._url)
        self.topology = topology
        self._connect_timeout = connect_timeout
        self._publish_timeout = publish_timeout
        self._watchdog_interval = watchdog_interval
        self._max_message_size = max_message_size
        self.generation = 0
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._publisher: aiormq.Channel | None = None
        self._pace = ConfirmPace(cap=publish_timeout / 2)
        self._trimmer = Trimmer(topology, publish_timeout)
        self._ready = asyncio.Event()
        self._lost = asyncio.Event()
        self._closed = False
        self._refused = False  # the publish channel was closed by a refusal, not the connection
        self.loop: asyncio.AbstractEventLoop | None = None
        """The event loop the link was started in."""
        self._supervisor: asyncio.Task[None] | None = None
        self._reopeners: dict[int, tuple[Reopen, Callable[[], bool]]] = {}
        self.reconnects = 0

    # lifecycle

    async def start(self, stack: AsyncExitStack) -> None:
        """Connect and declare once (errors are raised here), then keep the link up."""
        self.loop = asyncio.get_running_loop()
        mask_library_logs()
        try:
            await self._connect()
        except TopologyError:
            await self._drop_connection()
            raise
        except BaseException as exc:
            # Closed whatever ended the attempt, a cancel included (a stop while a worker
            # waits for its servers, qtasks.waiting): else the connection, its heartbeats
            # going, would outlive the attempt.
            with anyio.CancelScope(shield=True):
                await self._drop_connection()
            if not isinstance(exc, Exception):
                raise
            # Refused credentials or access are a configuration error: a worker waiting for
            # its servers at start (start_timeout) does not wait on them.
            kind = CredentialsRefusedError if refused_at_connect(exc) else BrokerConnectionError
            close = closed_at_open(exc)  # aiormq's error names the frame only, not the reason
            why = describe(exc, self._secret)
            if not_amqp(exc):  # a server of another protocol: the URL is to fix
                kind, why = CredentialsRefusedError, NOT_AMQP
            elif close is not None:
                why = masked(f"connection.open refused: {close.reply_text}", self._secret)
            elif tls_refused(exc) is not None:
                why = (
                    "the TLS connection failed its checks (check the server's certificate and "
                    f"the client's TLS settings, or the URL's scheme): {why}"
                )
            raise kind(f"cannot connect to RabbitMQ at {self.safe_url}: {why}") from None
        self._supervisor = asyncio.create_task(self._supervise(), name="qtasks-rabbitmq-link")
        stack.push_async_callback(self.close)

    async def close(self) -> None:
        self._closed = True
        self._ready.clear()
        self._lost.set()
        supervisor = self._supervisor
        if supervisor is not None:
            # Cancelled already, the loop is ending and the supervisor is closing the link:
            # cancelling it again would cut that close short (and leave aio-pika's callbacks
            # pending). Wait for it instead.
            if not supervisor.cancelling():
                supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
            self._supervisor = None
        await self._drop_connection()

    def abandon(self) -> None:
        """Forget a link whose event loop is gone (closed without cancelling its tasks), without
        touching that loop: nothing can run there any more. Its sockets go with the loop."""
        self._closed = True
        self._ready.clear()
        self._supervisor = None
        self._connection, self._channel, self._publisher = None, None, None
        self._reopeners.clear()

    @property
    def ending(self) -> bool:
        """Whether the link is closed or closing: by :meth:`close`, or because its event loop
        ends (the loop's runner cancelled the supervisor; nothing else does)."""
        supervisor = self._supervisor
        return self._closed or (supervisor is not None and supervisor.cancelling() > 0)

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    def register(self, key: int, reopen: Reopen, alive: Callable[[], bool]) -> None:
        """Have ``reopen(connection, generation)`` called after every reconnect; ``alive()`` is
        polled by the watchdog."""
        self._reopeners[key] = (reopen, alive)

    def unregister(self, key: int) -> None:
        self._reopeners.pop(key, None)

    def lost(self, why: str) -> None:
        """Report that something on this connection died: reconnect everything."""
        if self.ending or not self._ready.is_set():
            return
        log.warning("RabbitMQ link to %s lost (%s); reconnecting", self.safe_url, why)
        self._ready.clear()
        self._lost.set()

    def refused(self, channel: aiormq.Channel | AbstractChannel, why: str) -> None:
        """Report that RabbitMQ closed the publish ``channel`` refusing a publish (the
        connection is fine): the supervisor opens a new publish channel, and only that."""
        if self.ending or not self._ready.is_set():
            return
        if channel is not self._publisher and channel is not self._channel:
            return  # an older channel, replaced already
        log.warning(
            "RabbitMQ closed the publish channel of the link to %s (%s); opening another, "
            "the connection and its consumers are kept",
            self.safe_url,
            why,
        )
        self._ready.clear()
        self._refused = True
        self._lost.set()

    async def connection(self, timeout: float | None = None) -> tuple[AbstractConnection, int]:
        """The live connection and its generation, waiting up to ``timeout`` for one."""
        await self._wait_ready(timeout if timeout is not None else self._publish_timeout)
        assert self._connection is not None
        return self._connection, self.generation

    # publishing

    async def publish_many(self, messages: Sequence[Outgoing], *, what: str = "message") -> None:
        """Publish ``messages`` in order (their frames written in one go) and wait for the
        broker's confirm of every one; what connection trouble left unconfirmed is published
        again after the reconnect (at least once). One deadline, ``publish_timeout`` from the
        call, bounds every wait of it (for a lost connection to come back, for room to write,
        for the confirms); then it raises :class:`BrokerConnectionError`. Messages are not
        written with less of it left than a confirm takes (see :mod:`~qtasks_rabbitmq.confirms`);
        the error says whether what it names was written (it may then have been delivered) or
        not (nothing of it was published, so trying again duplicates nothing). With
        ``publish_timeout`` 0 a lost connection fails at once and the confirms are waited for
        without limit (a confirm cannot come at once). A return (unroutable) or a nack raises
        :class:`PublishRejectedError` at once (``what`` and the message's id name it there).

        A body over ``max_message_size`` raises :class:`OversizedMessageError` before anything
        is written. RabbitMQ refusing a publish by closing the channel (``PRECONDITION_FAILED``
        for a body over its own limit, ``NOT_FOUND`` for a deleted exchange, ``ACCESS_REFUSED``)
        costs the publish channel only, never the connection and its consumers (see
        :meth:`refused`): the publishes that had a body over the limit the server names raise
        :class:`OversizedMessageError` at once; for another refusal, which cannot tell which
        publish on the channel caused it, what is left is published once more (the exchanges
        declared again first after a ``NOT_FOUND``), and a second refusal raises
        :class:`PublishRejectedError`."""
        limit = self._publish_timeout
        largest = self._max_message_size
        if largest is not None:
            for message in messages:
                if len(message.body) > largest:
                    raise _oversized(what, message, largest, "rabbitmq_max_message_size")
        deadline = time.monotonic() + limit
        written = False  # whether what is left went out once (on this connection or before)
        refusals = 0
        while messages:
            channel = self._publisher
            if channel is None or not self._ready.is_set():
                try:
                    await self._wait_ready(deadline - time.monotonic())
                except BrokerConnectionError as exc:
                    raise self._unpublished(what, messages, str(exc), written) from None
                channel = self._publisher
                if channel is None:  # abandoned meanwhile (its event loop was left)
                    why = "the link is closed"
                    raise self._unpublished(what, messages, why, written) from None
            attempt = await publish_batch(
                channel, messages, what, deadline if limit else None, self._pace
            )
            messages, trouble = attempt.rest, attempt.trouble
            if trouble is None:
                continue
            written = written or attempt.written
            timed_out = isinstance(trouble, ConfirmTimeout)
            refused = refusal(trouble)
            if refused is not None:
                self.refused(channel, describe(trouble, self._secret))
                refusals += 1
                server_limit = size_limit(refused)
                if server_limit is not None:
                    for message in messages:
                        if len(message.body) > server_limit:
                            why = "RabbitMQ's max_message_size"
                            raise _oversized(what, message, server_limit, why)
                elif refusals > 1:
                    why = f"RabbitMQ closed the publish channel: {refused.args[0]}"
                    raise PublishRejectedError(f"{what} {messages[0].id}", why)
            elif not timed_out:
                # The connection failed: publish again what is left, on the next one.
                self.lost(f"publish failed: {describe(trouble, self._secret)}")
            if timed_out or time.monotonic() >= deadline:
                why = describe(trouble, self._secret)
                if timed_out:
                    why = f"{trouble} (publish_timeout={limit:g} s)"
                raise self._unpublished(what, messages, why, written) from None

    def _unpublished(
        self, what: str, messages: Sequence[Outgoing], why: str, written: bool
    ) -> BrokerConnectionError:
        """The error of a publish that gave up on ``messages``, saying whether they were
        written."""
        if written:
            fate = "it was written, so it may have been delivered"
        else:
            fate = "it was not written, so nothing of this batch was published"
        return BrokerConnectionError(
            f"cannot publish {what} {messages[0].id} to RabbitMQ at {self.safe_url}: {why}; {fate}"
        )

    async def trim_dead(self, keep: int) -> None:
        """Drop the oldest dead letters beyond ``keep`` (``max_dead_letters``, which ``Q.dead``
        does not hold as ``x-max-length``: see :func:`_declare_dead`), within
        ``publish_timeout`` (a server that stops answering must not hold the caller for ever),
        on a channel of its own: a trim that fails or times out leaves the publish channel
        alone (see :mod:`qtasks_rabbitmq.retention`)."""
        connection = self._connection
        if connection is None or not self._ready.is_set():
            return  # the next dead letter trims
        await self._trimmer.trim(connection, keep)

    @property
    def connect_timeout(self) -> float:
        """Seconds one step of (re)connecting may take, a consumer's reopen included."""
        return self._connect_timeout

    # internals

    async def _wait_ready(self, timeout: float) -> None:
        if self._ready.is_set():
            return
        if self._closed:
            raise BrokerConnectionError(f"the RabbitMQ link to {self.safe_url} is closed")
        try:
            async with asyncio.timeout(max(timeout, 0)):
                await self._ready.wait()
        except TimeoutError:
            raise BrokerConnectionError(
                f"RabbitMQ at {self.safe_url} unreachable for {self._publish_timeout:g} s"
            ) from None

    async def _connect(self) -> None:
        connection = await aio_pika.connect(
            self._url,
            timeout=self._connect_timeout,
            client_properties={
                "connection_name": f"qtasks {self.topology.queue} pid={os.getpid()}"
            },
        )
        self._connection = connection
        generation = self.generation + 1
        connection.close_callbacks.add(
            lambda _sender, exc: self._on_close(generation, "connection closed", exc)
        )
        await declare(connection, self.topology, first=self.generation == 0)
        await self._open_publisher(connection, generation)
        self.generation = generation
        for reopen, _ in list(self._reopeners.values()):
            await reopen(connection, generation)
        self._lost.clear()
        self._ready.set()

    async def _open_publisher(self, connection: AbstractConnection, generation: int) -> None:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        channel.close_callbacks.add(
            lambda sender, exc: self._on_publisher_close(generation, sender, exc)
        )
        self._channel = channel
        # The concrete aiormq channel, written on by qtasks_rabbitmq.confirms.
        self._publisher = cast(aiormq.Channel, await channel.get_underlay_channel())

    def _on_publisher_close(
        self, generation: int, channel: AbstractChannel, exc: BaseException | None
    ) -> None:
        if exc is not None and refusal(exc) is not None and generation == self.generation:
            self.refused(channel, describe(exc, self._secret))
        else:
            self._on_close(generation, "publish channel closed", exc)

    def _on_close(self, generation: int, what: str, exc: BaseException | None) -> None:
        if generation == self.generation and not self.ending:
            self.lost(what if exc is None else f"{what}: {describe(exc, self._secret)}")

    async def _reopen_publisher(self) -> bool:
        """After :meth:`refused`: a new publish channel on the same connection, within the
        connect timeout, the topology declared again first (a refusal may be an exchange
        deleted under the link). ``False`` if that failed or something else is down: the
        supervisor then reconnects everything."""
        connection = self._connection
        if connection is None or connection.is_closed:
            return False
        old, self._channel, self._publisher = self._channel, None, None
        if old is not None:
            await _close_quietly(old)  # through aio-pika, which awaits its close callbacks
        try:
            async with asyncio.timeout(self._connect_timeout):
                await declare(connection, self.topology, first=False)
                await self._open_publisher(connection, self.generation)
        except Exception as exc:
            log.warning(
                "RabbitMQ at %s: opening a publish channel failed (%s)",
                self.safe_url,
                describe(exc, self._secret),
            )
            return False
        if not self._healthy():
            return False
        self._lost.clear()
        self._ready.set()
        return True

    async def _drop_connection(self) -> None:
        """Close the publish channel, then the connection. Through aio-pika even when they are
        closed already (by the server, or by aiormq's tasks being cancelled at the loop's
        end): its ``close`` waits for the close callbacks it runs in tasks of their own, so
        none is left pending when the loop closes."""
        connection, self._connection = self._connection, None
        channel, self._channel, self._publisher = self._channel, None, None
        await self._trimmer.close()
        if channel is not None:
            await _close_quietly(channel)
        if connection is not None:
            await _close_quietly(connection)

    def _healthy(self) -> bool:
        if self._connection is None or self._connection.is_closed:
            return False
        if self._channel is None or self._channel.is_closed:
            return False
        return all(alive() for _, alive in self._reopeners.values())

    async def _supervise(self) -> None:
        try:
            await self._keep_up()
        except asyncio.CancelledError:
            if not self._closed:
                # Cancelled from outside close(): the event loop is ending. Close in order
                # while it still runs; this task is awaited by the loop's runner.
                self._closed = True
                self._ready.clear()
                await self._drop_connection()
            raise

    async def _keep_up(self) -> None:
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._watchdog_interval):
                    await self._lost.wait()
            if self._closed:
                return
            if self._ready.is_set() and self._healthy():
                continue
            if self._refused:
                self._refused = False
                if await self._reopen_publisher():
                    continue
                if self._closed:
                    return
            self.lost("watchdog found a closed channel or a cancelled consumer")
            self._ready.clear()
            await self._drop_connection()
            pause = 0.1
            while not self._closed:
                try:
                    await self._connect()
                    self.reconnects += 1
                    log.warning("RabbitMQ link to %s restored", self.safe_url)
                    break
                except Exception as exc:
                    log.warning(
                        "RabbitMQ at %s: reconnect failed (%s); retrying in %.1f s",
                        self.safe_url,
                        describe(exc, self._secret),
                        pause,
                    )
                    await self._drop_connection()
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 5.0)


def _oversized(what: str, message: Outgoing, limit: int, whose: str) -> OversizedMessageError:
    size = len(message.body)
    why = f"its body is {size} bytes, above {whose} ({limit} bytes)"
    return OversizedMessageError(f"{what} {message.id}", size, limit, why)


async def _close_quietly(closable: AbstractChannel | AbstractConnection) -> None:
    """Close a channel or connection, closed or not, within 5 s, whatever it raises."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5):
            await closable.close()
