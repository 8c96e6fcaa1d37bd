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


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """The most spans ``(start, end)`` open at one moment (an end before a start at a tie)."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    best = now = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best
