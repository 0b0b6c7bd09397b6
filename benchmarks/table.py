"""Rows of the results table, the machine limits they are read against, and the markdown they print as."""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.harness import SideResult

# Best sgemm GFLOP/s and streaming read GB/s measured in this run (benchmarks.ranking.limits).
LIMITS: dict[str, float] = {"gflops": 0.0, "gbps": 0.0}


def fraction(flops: float | None, nbytes: float | None, seconds: float) -> str:
    """The share of the binding machine limit reached (roofline: the larger of compute and read)."""
    parts = []
    if flops and LIMITS["gflops"]:
        parts.append((flops / seconds / 1e9 / LIMITS["gflops"], f"{flops / seconds / 1e9:.0f} GFLOP/s"))
    if nbytes and LIMITS["gbps"]:
        parts.append((nbytes / seconds / 1e9 / LIMITS["gbps"], f"{nbytes / seconds / 1e9:.1f} GB/s"))
    if not parts:
        return ""
    share, what = max(parts)
    return f"{share:.0%} ({what})"


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean share of the top-k indices that two (B, k) results have in common."""
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / a.shape[1] for x, y in zip(a, b)]))


def row(job: str, unit: str, peer_name: str, **fields: Any) -> dict[str, Any]:
    """A table row; rates (higher is better) in ours/peer (bests) and ours_median/peer_median."""
    return {"job": job, "unit": unit, "peer_name": peer_name, "ours": None, "peer": None, "ours_median": None,
            "peer_median": None, "note": "", "limit": "", "peer_limit": "", **fields}


def rate_row(job: str, unit: str, peer_name: str, work: float, ours: SideResult, peer: SideResult | None,
             case: str, peer_case: str | None = None, **fields: Any) -> dict[str, Any]:
    """A row of `work` units per second from the best and median repetition of each side."""
    pc = peer_case or case
    return row(job, unit, peer_name, ours=work / ours.best(case), ours_median=work / ours.median(case),
               peer=work / peer.best(pc) if peer else None, peer_median=work / peer.median(pc) if peer else None,
               **fields)


def failed_row(job: str, error: BaseException) -> dict[str, Any]:
    return row(job, "-", "-", note=f"not run: {type(error).__name__}: {str(error)[:300]}".replace("\n", " "))


def fmt(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| job | ours best | ours median | peer best | peer median | unit | ours ÷ peer (bests) | peer and its "
           "configuration | ours: limit reached | peer: limit reached | note |",
           "|---|---:|---:|---:|---:|---|---:|---|---|---|---|"]
    for r in rows:
        ratio = r["ours"] / r["peer"] if r["ours"] and r["peer"] else None
        out.append(f"| {r['job']} | {fmt(r['ours'])} | {fmt(r['ours_median'])} | {fmt(r['peer'])} | "
                   f"{fmt(r['peer_median'])} | {r['unit']} | {fmt(ratio)} | {r['peer_name']} | {r['limit']} | "
                   f"{r['peer_limit']} | {r['note']} |")
    return out
