"""The tables ``run.py`` prints: each run's W1-W3 figures, and the medians over the rounds of
W1-W3 and of the side channel, with qtasks against the best peer."""

from __future__ import annotations

import statistics
from typing import Any


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def figures(result: dict[str, Any]) -> dict[str, float | None]:
    w1 = result.get("W1") or {}
    w2 = result.get("W2") or {}
    w3 = result.get("W3") or {}
    return {
        "w1_rate": w1.get("rate"),
        "w1_enqueue_rate": w1.get("enqueue_rate"),
        "w2_p50": w2.get("p50_ms"),
        "w2_p95": w2.get("p95_ms"),
        "w2_p99": w2.get("p99_ms"),
        "w3_wall": w3.get("wall_s"),
        "sc_p50": (result.get("SC") or {}).get("p50_ms"),
        "rss_c10": result.get("rss_c10_mib"),
        "rss_c100": w3.get("rss_c100_mib"),
    }


# Which direction is better for each figure.
HIGHER_IS_BETTER = {"w1_rate": True, "w2_p50": False, "w2_p95": False, "w3_wall": False}


def best_peers(results: list[dict[str, Any]], broker: str) -> dict[str, tuple[str, float]]:
    best: dict[str, tuple[str, float]] = {}
    for result in results:
        if result["broker"] != broker or result["peer"].startswith("qtasks"):
            continue
        figs = figures(result)
        for key, higher in HIGHER_IS_BETTER.items():
            value = figs[key]
            if value is None:
                continue
            current = best.get(key)
            if current is None or (value > current[1] if higher else value < current[1]):
                best[key] = (result["peer"], value)
    return best


def table(results: list[dict[str, Any]], broker: str, w3_tasks: int) -> str:
    """One run's W1-W3 figures per framework, then qtasks against the best peer's.
    ``w3_tasks``: W3's size (its ideal wall time is that many 10 ms tasks over 100)."""
    ideal = w3_tasks * 0.010 / 100
    rows = [
        "| framework | W1 tasks/s | W1 enqueue/s | W2 p50 ms | W2 p95 ms | W2 p99 ms "
        f"| W3 wall s (ideal {ideal:.2f}) | RSS c=10 MiB | RSS c=100 MiB |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for result in results:
        if result["broker"] != broker:
            continue
        if "skipped" in result:
            rows.append(f"| {result['peer']} | skipped: {result['skipped']} |||||||| ")
            continue
        f = figures(result)
        w3 = "-" if f["w3_wall"] is None else f"{f['w3_wall']:.3f} ({f['w3_wall'] / ideal:.2f}x)"
        rows.append(
            f"| {result['peer']} | {_fmt(f['w1_rate'])} | {_fmt(f['w1_enqueue_rate'])} "
            f"| {_fmt(f['w2_p50'], 2)} | {_fmt(f['w2_p95'], 2)} | {_fmt(f['w2_p99'], 2)} "
            f"| {w3} | {_fmt(f['rss_c10'], 0)} | {_fmt(f['rss_c100'], 0)} |"
        )
    best = best_peers(results, broker)
    if best:
        rows.append("")
        names = {"w1_rate": "W1", "w2_p50": "W2 p50", "w2_p95": "W2 p95", "w3_wall": "W3"}
        for key, (name, value) in best.items():
            rows.append(f"- best peer {names[key]}: {name} ({value:,.2f})")
        for result in results:
            if result["broker"] != broker or not result["peer"].startswith("qtasks"):
                continue
            f = figures(result)
            ratios = []
            for key, (_, value) in best.items():
                mine = f[key]
                if mine:
                    ratio = mine / value if HIGHER_IS_BETTER[key] else value / mine
                    ratios.append(f"{names[key]} {ratio:.2f}x")
            if ratios:
                rows.append(f"- {result['peer']} vs best peer (>1 is better): {', '.join(ratios)}")
    errors = [f"- {r['peer']}: {e}" for r in results if r["broker"] == broker for e in r["errors"]]
    if errors:
        rows += ["", "Errors:", *errors]
    return "\n".join(rows)


SC_FIGURES = ("p50_ms", "p95_ms", "p99_ms", "mean_ms")


def sc_medians(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per framework, the median of each SC figure over all its runs that measured SC."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        if result.get("SC"):
            runs.setdefault(result["peer"], []).append(result["SC"])
    out: dict[str, dict[str, Any]] = {}
    for peer, scs in runs.items():
        out[peer] = {
            "runs": len(scs),
            **{key: round(statistics.median(sc[key] for sc in scs), 3) for key in SC_FIGURES},
            "p50_ms_per_run": [sc["p50_ms"] for sc in scs],
        }
    return out


def sc_table(results: list[dict[str, Any]], broker: str) -> str:
    """SC medians over the runs, one row per framework, then qtasks against the best peer."""
    medians = sc_medians([r for r in results if r["broker"] == broker])
    rows = [
        "| framework | runs | p50 ms | p95 ms | p99 ms | mean ms | p50 per run |",
        "|---|--:|--:|--:|--:|--:|---|",
    ]
    for peer, m in medians.items():
        per_run = " / ".join(f"{x:.3f}" for x in m["p50_ms_per_run"])
        rows.append(
            f"| {peer} | {m['runs']} | {m['p50_ms']:.3f} | {m['p95_ms']:.3f} "
            f"| {m['p99_ms']:.3f} | {m['mean_ms']:.3f} | {per_run} |"
        )
    peers = {k: v for k, v in medians.items() if not k.startswith("qtasks")}
    if peers:
        rows.append("")
        for key in ("p50_ms", "p99_ms"):
            name = min(peers, key=lambda k: peers[k][key])
            best = peers[name][key]
            rows.append(f"- best peer SC {key[:3]}: {name} ({best:.3f} ms)")
            for peer, m in medians.items():
                if peer.startswith("qtasks") and m[key]:
                    rows.append(f"  - {peer}: {best / m[key]:.2f}x the best (>1 is faster)")
    errors = [
        f"- {r['peer']} (round {r.get('round', 1)}): {e}"
        for r in results
        if r["broker"] == broker
        for e in r["errors"]
        if e.startswith("SC")
    ]
    if errors:
        rows += ["", "Errors:", *errors]
    return "\n".join(rows)


W_FIGURES = ("w1_rate", "w1_enqueue_rate", "w2_p50", "w2_p95", "w2_p99", "w3_wall")


def w_medians(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per framework, the median of each W1-W3 figure over all its runs that measured it,
    and W1's rate per run (in the order of the rounds)."""
    runs: dict[str, list[dict[str, float | None]]] = {}
    for result in results:
        if "skipped" not in result:
            runs.setdefault(result["peer"], []).append(figures(result))
    out: dict[str, dict[str, Any]] = {}
    for peer, figs in runs.items():
        medians: dict[str, Any] = {"runs": len(figs)}
        for key in W_FIGURES:
            values = [f[key] for f in figs if f[key] is not None]
            medians[key] = statistics.median(values) if values else None
        medians["w1_rate_per_run"] = [f["w1_rate"] for f in figs if f["w1_rate"] is not None]
        out[peer] = medians
    return out


def medians_table(results: list[dict[str, Any]], broker: str, w3_tasks: int) -> str:
    """W1-W3 medians over the rounds, one row per framework, then qtasks against the best
    peer's median (what a figure on the docs page is taken from: never one round's)."""
    ideal = w3_tasks * 0.010 / 100
    medians = w_medians([r for r in results if r["broker"] == broker])
    rows = [
        "| framework | runs | W1 tasks/s | W1 enqueue/s | W2 p50 ms | W2 p95 ms | W2 p99 ms "
        f"| W3 wall s (ideal {ideal:.2f}) | W1 per run |",
        "|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for peer, m in medians.items():
        per_run = " / ".join(f"{x:,.0f}" for x in m["w1_rate_per_run"]) or "-"
        wall = m["w3_wall"]
        w3 = "-" if wall is None else f"{wall:.3f} ({wall / ideal:.2f}x)"
        rows.append(
            f"| {peer} | {m['runs']} | {_fmt(m['w1_rate'])} | {_fmt(m['w1_enqueue_rate'])} "
            f"| {_fmt(m['w2_p50'], 2)} | {_fmt(m['w2_p95'], 2)} | {_fmt(m['w2_p99'], 2)} "
            f"| {w3} | {per_run} |"
        )
    names = {"w1_rate": "W1", "w2_p50": "W2 p50", "w2_p95": "W2 p95", "w3_wall": "W3"}
    peers = {k: v for k, v in medians.items() if not k.startswith("qtasks")}
    lines = []
    for key, higher in HIGHER_IS_BETTER.items():
        known = {k: v[key] for k, v in peers.items() if v[key] is not None}
        if not known:
            continue
        name = (max if higher else min)(known, key=lambda k: known[k])
        best = known[name]
        lines.append(f"- best peer {names[key]} (median): {name} ({best:,.2f})")
        for peer, m in medians.items():
            mine = m[key]
            if peer.startswith("qtasks") and mine:
                ratio = mine / best if higher else best / mine
                lines.append(f"  - {peer}: {ratio:.2f}x the best (>1 is better)")
    if lines:
        rows += ["", *lines]
    return "\n".join(rows)
