"""Errors of the RabbitMQ broker, in the :class:`qtasks.errors.QTasksError` tree."""

from __future__ import annotations

from qtasks.errors import ComponentError, ConfigError


class PublishRejectedError(ComponentError):
    """RabbitMQ did not take a message: it was unroutable (returned) or nacked.

    The message is *not* stored; the caller decides whether to try again.
    """

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        self.reason = reason
        super().__init__(f"RabbitMQ refused {what}: {reason}")


class TopologyError(ComponentError, ConfigError):
    """A queue exists with other arguments than this configuration declares (for example a
    classic queue where ``rabbitmq_queue_type = "quorum"`` is configured)."""

    def __init__(self, queue: str, detail: str) -> None:
        self.queue = queue
        super().__init__(
            f"RabbitMQ queue {queue!r} exists with different arguments ({detail}); delete it "
            "or choose another rabbitmq_queue"
        )
