"""A timer's outage: its ticks failing for want of the broker or the global config (a lost
connection, a full server, no answer in time), reported once when it begins and once when it
ends, not once per retry."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

log = logging.getLogger("qtasks.timer")

REMIND = timedelta(minutes=5)
"""How often an outage that goes on is reported again at warning level."""


@dataclass(slots=True)
class TickOutage:
    """The failed attempts of one timer's ticks since its outage began (at ``began``, on the
    timer's clock)."""

    timer_id: str
    began: datetime
    attempts: int = 0
    ticks: int = 0
    """Distinct ticks that failed (a retry of the same tick counts once)."""
    last_key: str = ""
    warned: datetime | None = None
    """When the outage was last reported at warning level."""

    def failed(self, key: str, cause: str, retry: str, now: datetime) -> None:
        """An attempt at tick ``key`` failed for ``cause``: the first one logs a warning
        (with the current exception's traceback, if any), the next ones only at debug level,
        but for a reminder every :data:`REMIND` while the outage lasts."""
        self.attempts += 1
        if key != self.last_key:
            self.ticks, self.last_key = self.ticks + 1, key
        if self.attempts == 1:
            self.warned = now
            log.warning(
                "timer %s: tick %s failed (%s), an outage: %s; its end is logged, not each retry",
                self.timer_id,
                key,
                cause,
                retry,
                exc_info=True,
            )
        elif self.warned is not None and now - self.warned >= REMIND:
            self.warned = now
            log.warning(
                "timer %s: still failing (%s); %s",
                self.timer_id,
                cause,
                self._summary(now, self.ticks - 1),
            )
        else:
            log.debug("timer %s: tick %s failed again (%s)", self.timer_id, key, cause)

    def over(self, key: str, now: datetime) -> None:
        """Tick ``key`` was handled (enqueued, by a replica too, or paused): log the outage's
        length, its failed attempts and the ticks that failed without being enqueued."""
        missed = self.ticks - (key == self.last_key)
        log.log(
            logging.WARNING if missed else logging.INFO,  # ticks not enqueued: work not done
            "timer %s: outage over, tick %s handled; %s",
            self.timer_id,
            key,
            self._summary(now, missed),
        )

    def given_up(self, grace: float, now: datetime) -> None:
        """The failed ticks went past ``grace`` with no later tick due yet: the outage's
        ticks are lost (its end is unknown: no tick is tried until the next one)."""
        log.warning(
            "timer %s: failed tick(s) skipped, past misfire_grace=%ss; %s",
            self.timer_id,
            grace,
            self._summary(now, self.ticks),
        )

    def _summary(self, now: datetime, missed: int) -> str:
        return (
            f"{(now - self.began).total_seconds():.1f} s since the outage began, "
            f"{self.attempts} failed attempt(s) at {self.ticks} tick(s), {missed} of them not "
            "enqueued (coalesced into a later run, or past misfire_grace)"
        )
