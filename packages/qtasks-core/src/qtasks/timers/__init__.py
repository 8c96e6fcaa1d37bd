"""``from qtasks.timers import AsyncTimer, SyncTimer`` (QTasks' path): the timers ship in the
``qtasks-timer`` distribution (import name ``qtasks_timer``)."""

from __future__ import annotations

try:
    from qtasks_timer import AsyncTimer, SyncTimer
except ImportError as exc:  # pragma: no cover - only without the distribution
    raise ImportError(
        "qtasks.timers needs the qtasks-timer distribution: pip install qtasks-timer"
    ) from exc

__all__ = ["AsyncTimer", "SyncTimer"]
