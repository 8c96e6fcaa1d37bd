"""Credentials out of aiormq's and aio-pika's logs.

aiormq logs the connection URL at DEBUG (``Connecting to: amqp://...``, connection and channel
reprs) and masks only its password: a key given as the URL's user information, with no
password (``amqp://<token>@host/``), would be written as it is. :func:`mask_library_logs` puts
a filter on those libraries' loggers that runs :func:`~qtasks.masking.mask_text` over each
record they emit (a record below the logger's level is never made, so the filter costs
nothing while DEBUG is off).
"""

from __future__ import annotations

import logging

from qtasks.masking import mask_text

LIBRARIES = ("aiormq", "aio_pika")
"""The top-level names of the loggers filtered."""


class MaskCredentials(logging.Filter):
    """Masks URLs' credentials (and whatever :func:`~qtasks.masking.mask_text` masks) in a
    record's message; keeps every record."""

    def filter(self, record: logging.LogRecord) -> bool:
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
            logger.addFilter(MaskCredentials())
