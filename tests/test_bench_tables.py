"""The peers harness's medians (``bench/peers/tables.py``): a figure on the docs page is the
median over every round of a set, never one round's (issue 21's figures page)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def tables() -> ModuleType:
    spec = importlib.util.spec_from_file_location("peers_tables", ROOT / "bench/peers/tables.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(peer: str, round_: int, w1: float, w2_p50: float | None = None) -> dict[str, Any]:
    return {
        "peer": peer,
        "broker": "redis",
        "round": round_,
        "errors": [],
        "W1": {"rate": w1, "enqueue_rate": w1 + 1},
        **({"W2": {"p50_ms": w2_p50, "p95_ms": 1.0, "p99_ms": 2.0}} if w2_p50 else {}),
    }


RESULTS = [
    run("taskiq-redis", 1, 2_410, 0.9),
    run("qtasks-redis", 1, 4_350, 0.5),
    run("taskiq-redis", 2, 2_408, 0.8),
    run("qtasks-redis", 2, 4_607, 0.4),
    run("taskiq-redis", 3, 2_353, 1.2),
    run("qtasks-redis", 3, 4_260),  # its W2 failed in this round: two runs have one
    {"peer": "saq", "broker": "redis", "round": 1, "errors": [], "skipped": "no server"},
]


def test_the_medians_are_over_every_round_and_each_runs_w1_is_listed() -> None:
    medians = tables().w_medians(RESULTS)
    assert set(medians) == {"taskiq-redis", "qtasks-redis"}  # a skipped peer has no figures
    assert medians["qtasks-redis"]["runs"] == 3
    assert medians["qtasks-redis"]["w1_rate"] == 4_350  # not the last round's 4,260
    assert medians["qtasks-redis"]["w1_rate_per_run"] == [4_350, 4_607, 4_260]
    assert medians["qtasks-redis"]["w2_p50"] == 0.45  # over the two runs that measured it
    assert medians["taskiq-redis"]["w2_p50"] == 0.9
    assert medians["qtasks-redis"]["w3_wall"] is None


def test_the_medians_table_compares_qtasks_with_the_best_peers_median() -> None:
    text = tables().medians_table(RESULTS, "redis", 2_000)
    assert "| qtasks-redis | 3 | 4,350 | 4,351 | 0.45 |" in text
    assert "4,350 / 4,607 / 4,260" in text
    assert "best peer W1 (median): taskiq-redis (2,408.00)" in text
    assert "qtasks-redis: 1.81x the best" in text  # 4,350 / 2,408
    assert "best peer W2 p50 (median): taskiq-redis (0.90)" in text
    assert "qtasks-redis: 2.00x the best" in text  # 0.9 / 0.45
