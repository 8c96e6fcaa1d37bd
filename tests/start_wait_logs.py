"""The warnings of a worker waiting for its servers at start (qtasks.waiting), caught in the
test's process: shared by the Redis and RabbitMQ start-wait tests."""

from __future__ import annotations

import logging


class Caught(logging.Handler):
    """The messages of qtasks' warnings (start attempts) in this process."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def attempts(self) -> list[str]:
        return [m for m in self.messages if "cannot start:" in m]
