"""Every job of ours against its peer at its best, each in its own process: `python -m benchmarks.run [--quick]`.

Prints a markdown table and writes it to benchmarks/results/<date>.md (`<date>-quick.md` with --quick).
Every job runs ours and each peer in separate fresh processes, alternating ours, peer, ours, peer, ...
(benchmarks.harness), so JAX never shares a process with torch, faiss or BLAS threads and drift in the
machine's load shows up as spread rather than bias. Each side's rows give its best and median
repetition (pooled over its processes, each after a warm-up call that excludes JAX compilation), and
the ratio of the bests. Peers run at their best documented configuration, stated in the table; those
that are not installed give a row saying so. The machine's limits (numpy sgemm GFLOP/s and streaming
read GB/s) are measured in a peer-environment process at the start and the end of the run.

    quick (< 4 min on an idle machine): N = 10k; full (< 20 min): N up to 1M.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

from benchmarks import table
from benchmarks.harness import OPENBLAS_VARS, Side, alternate, describe_blas

RESULTS = Path(__file__).resolve().parent / "results"


def measure_limits() -> str:
    """Updates table.LIMITS with the best seen so far; returns the BLAS the measuring process ran."""
    r = alternate([Side("limits", "benchmarks.ranking:side_limits", {})], 1)["limits"]
    table.LIMITS["gflops"] = max(table.LIMITS["gflops"], r.info["gflops"])
    table.LIMITS["gbps"] = max(table.LIMITS["gbps"], r.info["gbps"])
    return describe_blas(r.info["blas"])


def module_rows(name: str, quick: bool) -> list[dict]:
    try:
        return list(importlib.import_module(f"benchmarks.{name}").run(quick))
    except Exception as e:  # another engineer's module: report it, keep going
        return [table.failed_row(f"benchmarks/{name}.py", e)]


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    mem = next((int(ln.split()[1]) / 2**20 for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0)
    versions = []
    for dist in ("jax", "numpy", "faiss-cpu", "imagehash", "scikit-image", "torch"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} absent")
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.1f} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}; {', '.join(versions)}")


def render(rows: list[dict], quick: bool, seconds: float, blas: str, log: list[str], command: str) -> str:
    env = ", ".join(f"{v}={os.environ[v]}" for v in OPENBLAS_VARS if v in os.environ) or "neither set on this machine"
    out = [f"# Benchmarks {datetime.date.today()}{' (quick)' if quick else ''}", "",
           f"Machine: {machine()}. No GPU: this run had none (a GPU row needs a GPU machine; none was simulated).",
           "",
           "Other jobs may share the machine: the 1-minute load average at each job's start and end is "
           "logged below. Ours and each peer alternate in fresh processes, so load falls on both sides as "
           "spread, and the ratio is taken of the bests.",
           "",
           f"Measured limits (best of start and end of run, in a peer-environment process: {blas}): sgemm "
           f"{table.LIMITS['gflops']:.1f} GFLOP/s (numpy, 4096^3), streaming read {table.LIMITS['gbps']:.1f} GB/s "
           f"(numpy sgemv over 1 GiB).", "",
           f"OpenBLAS overrides ({', '.join(OPENBLAS_VARS)}): {env}; both are removed together for every peer "
           "process (and the limits process) alone, never for ours, tests or CI; the kernel each peer then ran "
           "is named in its row.", "",
           f"Command: `{command}` ({seconds / 60:.1f} min).", ""]
    out += table.markdown(rows)
    out += ["", "| job | wall time | 1-min load average at start → end (2 cores) |", "|---|---:|---|", *log]
    out += ["", "Notes:",
            "- Rates (higher is better). Best: the fastest repetition of the side over all its processes; median: "
            "of all its repetitions. Each process makes one warm-up call first. ours ÷ peer is the ratio of the "
            "bests; > 1 means ours is faster (for the RSS row: ratio to the 1.3x target, < 1 meets it).",
            "- Ours: JAX on CPU with XLA's own thread pool, in processes with the environment unchanged.",
            "- Limit reached: the larger of GFLOP/s ÷ sgemm peak and GB/s ÷ streaming read (roofline). Fixed "
            "metrics count 2·B·N·D flops and N·D·4 gallery bytes per search; the mlp head counts "
            "2·D·H + 2·H flops per pair (D=1280, H=512: the first layer as a GEMM plus the output layer; "
            "adds and the activation are not counted). The limits are measured in the same run, under the same shared "
            "load; over 100% means the limit was measured in a busier moment than the job (or, at N=10k, that "
            "the gallery sat in cache).",
            "- Agreement: mean share of the top-10 indices that ours and the peer have in common.",
            "- Data: clustered synthetic features (1024 centres + uniform noise), generated identically in every "
            "process; ranking excludes the one-off gallery preparation (norms, g²·W₁, faiss index build) for all."]
    return "\n".join(out) + "\n"


def jobs(quick: bool, tmp: str) -> list[tuple[str, Callable[[], list[dict]]]]:
    from benchmarks import ranking

    if quick:
        return [
            ("fixed metrics", lambda: ranking.fixed_metric_rows([10_000], 2, 2, 0, 0)),
            ("half-precision storage", lambda: ranking.storage_rows(50_000, 2, 2)),
            ("mlp head", lambda: ranking.mlp_rows([(1, 50_000), (64, 1024)], [], 2, 2, f"{tmp}/mlp.npz")),
            ("memory", lambda: ranking.rss_rows(250_000, [1])),
            ("heuristics", lambda: module_rows("heuristics", quick)),
            ("extraction", lambda: module_rows("extraction", quick)),
            ("vit extraction", lambda: module_rows("vit_extraction", quick)),
        ]
    return [
        ("fixed metrics", lambda: ranking.fixed_metric_rows([10_000, 100_000, 1_000_000], 3, 3, 2, 2)),
        ("half-precision storage", lambda: ranking.storage_rows(100_000, 2, 3)),
        ("mlp head", lambda: ranking.mlp_rows([(1, 100_000), (64, 8192)], [(1, 100_000), (64, 8192)], 2, 3,
                                                  f"{tmp}/mlp.npz")),
        ("memory", lambda: ranking.rss_rows(1_000_000, [1, 256])),
        ("heuristics", lambda: module_rows("heuristics", quick)),
        ("extraction", lambda: module_rows("extraction", quick)),
        ("vit extraction", lambda: module_rows("vit_extraction", quick)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller galleries, fewer repetitions (< 4 min)")
    parser.add_argument("--only", help="comma-separated job names to run; the table goes to <date>-<names>.md")
    args = parser.parse_args()
    start = time.perf_counter()
    blas = measure_limits()
    rows: list[dict] = []
    log: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cbir_bench_") as tmp:
        for name, job in jobs(args.quick, tmp):
            if args.only and name not in args.only.split(","):
                continue
            t, load = time.perf_counter(), os.getloadavg()[0]
            try:
                rows += job()
            except Exception as e:
                traceback.print_exc()
                rows.append(table.failed_row(name, e))
            log.append(f"| {name} | {time.perf_counter() - t:.0f} s | {load:.1f} → {os.getloadavg()[0]:.1f} |")
            print(log[-1], file=sys.stderr, flush=True)
    measure_limits()
    command = "python -m benchmarks.run" + " --quick" * args.quick + (f' --only "{args.only}"' if args.only else "")
    text = render(rows, args.quick, time.perf_counter() - start, blas, log, command)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    only = "-" + args.only.replace(" ", "-").replace(",", "+") if args.only else ""
    path = RESULTS / f"{datetime.date.today()}{'-quick' if args.quick else ''}{only}.md"
    path.write_text(text)
    print(f"written: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
