"""What a tick's claim says in the GlobalConfig: who claimed it, and which ticks its run
accounts for besides its own, so that a replica that won an earlier tick but heard so late can
tell whether that tick still has to run.

A replica whose claim of tick T1 returns once later ticks are due folds T1 into the latest due
tick L and claims L. When another replica has L, the run of L may already account for T1 (it
coalesced T1 as well: both replicas' claims waited out one outage) or not (the other replica
ran L on time, without T1). The record of L's claim tells which, at the cost of one read on
that path only: the claim of every tick writes it in the same call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class TickClaim:
    """The value of a tick's claim: ``worker`` claimed it; ``first`` is the earliest tick its
    run coalesces (``None``: none, the tick runs on its own); ``ran`` is the latest tick that
    worker had enqueued before (``None``: none since it started). Ticks are tick keys, which
    sort in time order within a timer."""

    worker: str
    first: str | None = None
    ran: str | None = None

    def value(self) -> dict[str, str]:
        """The JSON-able value stored for the claim."""
        value = {"worker": self.worker}
        if self.first is not None:
            value["first"] = self.first
        if self.ran is not None:
            value["ran"] = self.ran
        return value

    @classmethod
    def read(cls, value: Any) -> TickClaim | None:
        """The claim stored as ``value`` (``None``: no claim, or not one of a timer). A bare
        worker id is the claim of a qtasks-timer that recorded nothing else."""
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, dict) and isinstance(value.get("worker"), str):
            first, ran = value.get("first"), value.get("ran")
            return cls(
                value["worker"],
                first if isinstance(first, str) else None,
                ran if isinstance(ran, str) else None,
            )
        return None

    def accounts_for(self, tick: str) -> bool:
        """Whether the run of the claimed tick accounts for the earlier ``tick``: it coalesces
        it, or its worker had enqueued ``tick`` itself."""
        return (self.first is not None and self.first <= tick) or self.ran == tick


def claimer(value: Any) -> str | None:
    """The worker id of the claim stored as ``value``."""
    claim = TickClaim.read(value)
    return None if claim is None else claim.worker
