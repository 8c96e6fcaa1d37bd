"""Errors of the RabbitMQ broker, in the :class:`qtasks.errors.QTasksError` tree."""

from __future__ import annotations

from qtasks.errors import ComponentError, ConfigError, MessageTooLargeError


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
