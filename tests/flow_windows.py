"""Figures the flow-control tests compute from a ledger of start (and end) times."""

from __future__ import annotations


def max_in_window(starts: list[float], window: float = 1.0) -> int:
    """The most start times within any ``window`` seconds."""
    starts = sorted(starts)
    best, lo = 0, 0
    for hi, t in enumerate(starts):
        while t - starts[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def earliest_starts(arrivals: list[float], interval: float, burst: int) -> list[float]:
    """The earliest start times a GCRA rate limit (``interval`` seconds between starts,
    ``burst`` at once after a quiet spell) allows tasks added at ``arrivals``, one start per
    task, in order: the schedule of a limiter that never holds a task back below its rate."""
    out: list[float] = []
    tat: float | None = None  # the theoretical arrival time of the next start
    for at in sorted(arrivals):
        tat = at if tat is None else max(tat, at)
        out.append(max(at, tat - (burst - 1) * interval))
        tat += interval
    return out


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """The most spans ``(start, end)`` open at one moment (an end before a start at a tie)."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    best = now = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best
