"""A clock tests can freeze and move forward, for delayed tasks and result expiry."""

from __future__ import annotations

import time
from datetime import UTC, datetime


class FakeClock:
    """Unix time for the in-memory components and the app's flow decisions, under the test's
    control.

    Unfrozen it runs with the wall clock, plus whatever :meth:`advance` added. Frozen it stands
    still until moved. It never runs behind the wall clock when moved (times it stamped stay
    ordered with the wall-clock times of the components the harness keeps). Leases are not
    affected (they use the real monotonic clock).
    """

    def __init__(self) -> None:
        self._offset = 0.0
        self._frozen_at: float | None = None

    def time(self) -> float:
        """The current (fake) unix time."""
        if self._frozen_at is not None:
            return self._frozen_at
        return time.time() + self._offset

    __call__ = time

    def now(self) -> datetime:
        """The current (fake) time as an aware UTC datetime, e.g. for
        ``AsyncTimer(app, clock=clock.now)``."""
        return datetime.fromtimestamp(self.time(), UTC)

    @property
    def frozen(self) -> bool:
        return self._frozen_at is not None

    def freeze(self) -> None:
        """Stop the clock where it is now."""
        if self._frozen_at is None:
            self._frozen_at = self.time()

    def unfreeze(self) -> None:
        """Let the clock run again from where it stands (never behind the wall clock)."""
        if self._frozen_at is not None:
            self._offset = max(0.0, self._frozen_at - time.time())
            self._frozen_at = None

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward (from the wall clock, if that is ahead)."""
        if seconds < 0:
            raise ValueError(f"cannot move the clock backwards ({seconds} s)")
        if self._frozen_at is not None:
            self._frozen_at = max(self._frozen_at, time.time()) + seconds
        else:
            self._offset += seconds

    def advance_to(self, when: float) -> None:
        """Move the clock forward to unix time ``when`` (no-op if it is already later)."""
        if self._frozen_at is not None:
            self._frozen_at = max(self._frozen_at, when)
        else:
            self._offset = max(self._offset, when - time.time())
