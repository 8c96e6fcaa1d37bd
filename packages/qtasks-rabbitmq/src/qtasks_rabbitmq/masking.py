"""Credentials out of aiormq's and aio-pika's logs.

aiormq logs the connection URL at DEBUG (``Connecting to: amqp://...``, connection and channel
reprs) and masks only its password: a key given as the URL's user information, with no
password (``amqp://<token>@host/``), would be written as it is. :func:`mask_library_logs` puts
a filter on those libraries' loggers that runs :func:`~qtasks.masking.mask_text` over each
record they emit (a record below the logger's level is never made, so the filter costs
nothing while DEBUG is off).

The same filter moves to DEBUG the two records of aiormq that say what the link logs itself
(:data:`REPORTED`): a connection attempt that failed (``error when creating transport``,
at ERROR), and a connection lost (``Cancelling cause reader exited abnormally``, at WARNING
with a traceback), so that a worker waiting for RabbitMQ, or reconnecting to it, logs one line
per attempt and no traceback.
"""

from __future__ import annotations

import asyncio
import logging

from qtasks.masking import mask_text

LIBRARIES = ("aiormq", "aio_pika")
"""The top-level names of the loggers filtered."""


REPORTED = ("error when creating transport: %r", "Cancelling cause reader exited abnormally")
"""The messages (unformatted) of aiormq's records that the link reports itself, as a warning
of ``qtasks.rabbitmq``: a failed connection attempt and a lost connection."""


class MaskCredentials(logging.Filter):
    """Masks URLs' credentials (and whatever :func:`~qtasks.masking.mask_text` masks) in a
    record's message; makes a record of :data:`REPORTED` a DEBUG record, kept only while its
    logger logs DEBUG (a reader ended by anything but a lost connection keeps its level)."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self.logger = logger  # the one it filters: a logger's filters see its own records only

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in REPORTED and _connection_lost(record):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            if not self.logger.isEnabledFor(logging.DEBUG):
                return False
        message = record.getMessage()
        masked = mask_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def mask_library_logs() -> None:
    """Add :class:`MaskCredentials` to every logger of :data:`LIBRARIES` made so far (each
    library makes its loggers when its modules are imported, as this package's are), once. A
    logger filters only the records logged on it, not those of its children: hence each."""
    loggers = list(logging.Logger.manager.loggerDict.items())
    for name, logger in loggers:
        if name.split(".", 1)[0] not in LIBRARIES or not isinstance(logger, logging.Logger):
            continue
        if not any(isinstance(f, MaskCredentials) for f in logger.filters):
            logger.addFilter(MaskCredentials(logger))


def _connection_lost(record: logging.LogRecord) -> bool:
    """Whether ``record`` is about a connection that could not be made or was lost: not a
    reader that ended on a malformed frame, whose traceback aiormq shows on purpose."""
    if record.msg == REPORTED[0]:
        return True
    error = record.exc_info[1] if record.exc_info else None
    return isinstance(error, ConnectionError | asyncio.IncompleteReadError)
