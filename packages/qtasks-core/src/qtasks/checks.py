"""Checks of the values several places take alike, written once so that every entry point holds
the same rule: a priority (``add_task``, a signature, a task declaration, the configuration, a
timer), a delay (``add_task`` and a signature alike, and ``add_task``'s ``timeout``) and a finite
number of seconds or a unix time (``delay``, ``eta``, ``expires``), and a wait's timeout."""

from __future__ import annotations

import math
import reprlib
from typing import Any

from qtasks.errors import InvalidTimeoutError

PRIORITY_BITS = 64
"""A priority is an int of 64 bits (``-2**63`` to ``2**63 - 1``), what every broker carries (an
AMQP header is no wider). The brokers order a narrower range apart and clamp beyond it: the
Redis broker ±899, RabbitMQ ±``rabbitmq_max_priority // 2``."""
_BOUND = 1 << (PRIORITY_BITS - 1)


def check_priority(value: Any, what: str, error: type[Exception]) -> int:
    """``value`` as a priority (an int that is not a bool, within :data:`PRIORITY_BITS`; an
    ``IntEnum`` member as its int); raises ``error`` saying what ``what`` expects otherwise."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise error(f"{what} expects an int, got {reprlib.repr(value)}")
    number = int(value)  # an IntEnum member as its int
    if not -_BOUND <= number < _BOUND:
        bits = number.bit_length()  # a huge int is not printed (too long, or past str's limit)
        got = number if bits <= 128 else f"an int of {bits} bits"
        raise error(f"{what} expects an int from -2**63 to 2**63 - 1, got {got}")
    return number


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite real number (an int or a float, not a bool),
    else ``None``: what a number of seconds or a unix time must be."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float
        return None
    return number if math.isfinite(number) else None


def check_delay(value: Any, what: str, error: type[Exception]) -> float:
    """``value`` as a delay: finite seconds of 0 or more (an int or a float, not a bool);
    raises ``error`` saying what ``what`` expects otherwise (a negative delay is refused, not
    taken as "now": it is a mistake in the caller's arithmetic more often than a wish)."""
    number = finite(value)
    if number is None or number < 0:
        raise error(f"{what} expects finite seconds >= 0, got {reprlib.repr(value)}")
    return number


FAR_AHEAD = 100 * 365.25 * 86400
"""Seconds (100 years): a ``delay`` or ``eta`` further ahead is refused as milliseconds given
for seconds (``eta=time.time() * 1000`` is some 50,000 years ahead), which a broker would
keep for ever and ``qtasks`` commands print past the year 9999."""


ETA_TAKES = "a unix time in seconds (time.time() + seconds)"
"""What an ``eta`` takes, for :func:`far_ahead`'s message."""


def far_ahead(
    what: str, value: float, ahead: float, takes: str, error: type[Exception]
) -> Exception:
    """The ``error`` for ``what`` = ``value``, ``ahead`` seconds ahead (past
    :data:`FAR_AHEAD`): it looks like milliseconds; ``what`` takes ``takes``."""
    years = ahead / (365.25 * 86400)
    option = what.rpartition(" ")[2]
    return error(
        f"{what} {value!r} is {years:,.0f} years ahead, more than 100: it looks like "
        f"milliseconds; {option} takes {takes}"
    )


def check_timeout(value: Any, what: str) -> float | None:
    """``value`` as a wait's timeout: ``None`` (or ``math.inf``) for no limit, else seconds of 0
    or more; raises :class:`~qtasks.errors.InvalidTimeoutError` otherwise (a negative one is a
    mistake in the caller's arithmetic, not "time is up")."""
    if value is None or (isinstance(value, float) and value == math.inf):
        return None
    return check_delay(value, what, InvalidTimeoutError)
