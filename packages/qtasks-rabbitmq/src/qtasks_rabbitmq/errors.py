"""Errors of the RabbitMQ broker, in the :class:`qtasks.errors.QTasksError` tree."""

from __future__ import annotations

import asyncio

import aiormq
from pamqp import commands as spec

from qtasks.errors import ComponentError, ConfigError, MessageTooLargeError
from qtasks.outage import tls_refused


class PublishRejectedError(ComponentError):
    """RabbitMQ did not take a message: it was unroutable (returned), nacked, or refused by
    closing the publish channel (a message too large, say).

    The message is *not* stored; the caller decides whether to try again.
    """

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        self.reason = reason
        super().__init__(f"RabbitMQ refused {what}: {reason}")


class OversizedMessageError(PublishRejectedError, MessageTooLargeError):
    """A message body larger than ``rabbitmq_max_message_size`` (refused before it is written)
    or than the server's ``max_message_size`` (refused by RabbitMQ). Both a
    :class:`PublishRejectedError` and the core's :class:`~qtasks.errors.MessageTooLargeError`;
    the message is not stored, and sending it again fails the same way."""

    def __init__(self, what: str, size: int, limit: int, reason: str) -> None:
        self.what = what
        self.reason = reason
        self.size = size
        self.limit = limit
        self.task: str | None = None  # MessageTooLargeError's: ``what`` names the message
        # Both bases build their message in __init__ with other arguments: set it here.
        Exception.__init__(self, f"cannot publish {what} to RabbitMQ: {reason}")


class TopologyError(ComponentError, ConfigError):
    """A queue exists with other arguments than this configuration declares (for example a
    classic queue where ``rabbitmq_queue_type = "quorum"`` is configured)."""

    def __init__(self, queue: str, detail: str) -> None:
        self.queue = queue
        super().__init__(
            f"RabbitMQ queue {queue!r} exists with different arguments ({detail}); delete it "
            "or choose another rabbitmq_queue"
        )


_REFUSALS = (
    aiormq.exceptions.AuthenticationError,  # no mechanism both sides accept
    aiormq.exceptions.ProbableAuthenticationError,  # 403 ACCESS_REFUSED: user, password
    aiormq.exceptions.ConnectionNotAllowed,  # 530 NOT_ALLOWED (an aiormq that maps it)
    aiormq.exceptions.ChannelAccessRefused,  # 403 on a declare: no configure/write permission
)


def refused_at_connect(exc: BaseException) -> bool:
    """Whether ``exc``, raised while connecting and declaring, is RabbitMQ refusing the
    connection for its configuration (credentials, permissions, a virtual host not allowed
    or missing), which no wait mends, rather than an outage. A connection limit reached is
    not (other connections may close: waited on). A TLS connection that fails its checks
    (``amqps://``: a certificate that does not verify, a server that does not speak TLS on
    that port) is refused too (:func:`qtasks.outage.tls_refused`)."""
    if isinstance(exc, _REFUSALS) or tls_refused(exc) is not None:
        return True
    close = closed_at_open(exc)
    if close is None:
        return False
    return close.reply_code in (403, 530) and "connection limit" not in (close.reply_text or "")


NOT_AMQP = (
    "the server there does not answer as RabbitMQ does (check the URL's host and port): it "
    "answered in another protocol and closed the connection"
)
"""Why a start failed when :func:`not_amqp` holds."""


def not_amqp(exc: BaseException) -> bool:
    """Whether ``exc``, raised while connecting, says the server answered the protocol header
    with bytes and closed the connection in the middle of what would be an AMQP frame: another
    protocol's server listens on the port (a protected-mode or full Redis's ``-DENIED`` or
    ``-ERR``, an HTTP server's ``400``), which no retry mends. RabbitMQ sends whole frames
    (one segment each while connecting) or its protocol header, and an outage closes without
    a word: neither is this. A server that says nothing and keeps the connection open (Redis,
    given the header and no end of line) is seen only when the connect times out."""
    cause = exc.__cause__
    return (
        isinstance(exc, aiormq.exceptions.AMQPConnectionError)
        and isinstance(cause, asyncio.IncompleteReadError)
        and bool(cause.partial)
    )


def closed_at_open(exc: BaseException) -> spec.Connection.Close | None:
    """RabbitMQ's ``connection.close`` in answer to ``connection.open``, if that is what
    ``exc`` is: a virtual host the user may not use or that does not exist, a connection
    limit reached (530 ``NOT_ALLOWED``, each). aiormq (7.2.x) raises an ``InvalidFrameError``
    for it whose text names the frame only (``got <Connection.Close object at ...>``), not
    the error its reply code maps to; the frame is still a local of aiormq's call in the
    traceback, read from there."""
    if not isinstance(exc, aiormq.exceptions.InvalidFrameError):
        return None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame.f_locals.get("frame")
        if isinstance(frame, spec.Connection.Close):
            return frame
        tb = tb.tb_next
    return None
