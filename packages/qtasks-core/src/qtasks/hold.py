"""How many messages a worker holds beyond its free slots: the prefetch, adapted to how long
its tasks run.

A held message waits for one of that worker's slots, even while another worker is idle. With
tasks of milliseconds that wait is nothing and the prefetch saves a claim's round trip before
each task; with tasks of seconds or minutes a message can wait behind a long task for as long as
it runs (Celery's ``-Ofair`` problem). So with the default prefetch (``prefetch`` unset) a worker
holds messages beyond its free slots only while its recent runs are short: :class:`Hold` keeps
an average of how long a slot stays taken and answers the configured prefetch while it is under
:data:`LONG_RUN`, else 0 (it takes then only what its free slots can start at once). Until a
first run ends nothing is known, and nothing is held beyond the free slots: a worker of long
tasks never takes more than it can start, and one of short tasks holds its prefetch a few
milliseconds later. An explicit ``prefetch`` is kept as it is.

Brokers that accept ``wanted=`` in their consume methods (see
:meth:`qtasks.components.Broker.consume`) size each claim by it, so that what they take ahead
follows the hold too (the Redis broker's claims, RabbitMQ's ``basic.qos`` on classic queues).
"""

from __future__ import annotations

LONG_RUN = 0.1
"""Seconds: a worker whose runs take this long or longer on average holds nothing beyond its
free slots (the round trip a prefetch saves is then a per cent or less of a run)."""

WEIGHT = 0.2
"""Weight of the latest run in the average (about the last ten runs count)."""


class Hold:
    """The number of messages a worker holds beyond its free slots (:attr:`now`), given the
    configured ``prefetch``; adapted to its runs' lengths when ``adaptive`` (the prefetch was
    left unset), else ``prefetch`` always."""

    __slots__ = ("adaptive", "average", "now", "prefetch")

    def __init__(self, prefetch: int, *, adaptive: bool) -> None:
        self.prefetch = prefetch
        self.adaptive = adaptive
        self.average: float | None = None
        """Seconds a slot stayed taken, on average over the latest runs (``None``: no run
        ended yet)."""
        self.now = 0 if adaptive else prefetch
        """Messages held beyond the free slots now."""

    def ran(self, seconds: float) -> None:
        """A run took its slot for ``seconds`` (nothing changes when not ``adaptive``)."""
        if not self.adaptive:
            return
        average = self.average
        average = seconds if average is None else average + (seconds - average) * WEIGHT
        self.average = average
        self.now = self.prefetch if average < LONG_RUN else 0
