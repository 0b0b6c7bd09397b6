"""Where the fixed-metric scan's CPU time goes: `python -m benchmarks.profile_scan [--checkout DIR]`.

For each (metric, N, B) row a fresh process ranks the benchmark's clustered features (`ranking.top_k`, top-10)
in a loop; `perf record` samples it for a few seconds after the warm-up call, and the samples are summed by
what they hit: the GEMM kernel (YNNPACK's `ynn::dot_*`), the GEMM's operand packing, XLA's TopK (a partial
sort per row), memcpy, the kernel (page faults on fresh temporary buffers), and XLA's own compiled kernels
(`[JIT]`: the masks, the cosine scale, block maxima, concatenations, label arrays and slice copies).

Shares of sampled CPU cycles do not depend on how busy a shared machine is, which wall times do. With
`--checkout DIR` the process runs DIR's `cbir_jax` (e.g. a `git worktree` of an older commit), so a change
can be profiled before and after. Needs Linux `perf` (with permission to attach to a child process).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("cosine:10000:256", "cosine:100000:256", "cosine:1000000:256", "cosine:10000:1", "cosine:100000:1",
        "cosine:1000000:1")
CATEGORIES = (
    ("GEMM kernel", ("ynn::dot",)),
    ("GEMM packing", ("ynn::transpose", "ynn::pack")),
    ("top-k (XLA TopK)", ("TopK", "partial_sort", "adjust_heap", "heap_select", "introsort", "insertion_sort")),
    ("memcpy", ("memmove", "memcpy")),
    ("kernel (page faults)", ("[k]",)),
    ("XLA compiled kernels", ("[JIT]",)),
)


def worker(metric: str, n: int, b: int, ready: str) -> None:
    """Ranks in a loop until killed; writes `ready` after the warm-up (compiling) call."""
    import jax
    import jax.numpy as jnp

    from benchmarks.ranking import K, _ours_data
    from cbir_jax.scoring import ranking, scorers

    g, q = _ours_data(n, b, seed=n)
    scorer = scorers.fixed_scorer({"cosine": "cosine", "L2": "euclid"}[metric])
    state = scorer.prepare(jax.device_put(g))
    q = jnp.asarray(q)
    jax.block_until_ready(ranking.top_k(scorer, state, q, k=K))
    Path(ready).write_text(ranking.__file__)
    while True:
        jax.block_until_ready(ranking.top_k(scorer, state, q, k=K))


def categorise(report: str) -> dict[str, float]:
    """Percent of samples per category from `perf report --sort dso,sym` text."""
    out = {name: 0.0 for name, _ in CATEGORIES} | {"other (runtime, threads)": 0.0}
    for line in report.splitlines():
        m = re.match(r"\s+([\d.]+)%\s+(.*)", line)
        if not m:
            continue
        name = next((c for c, keys in CATEGORIES if any(k in m.group(2) for k in keys)), "other (runtime, threads)")
        out[name] += float(m.group(1))
    return out


def profile(row: str, seconds: float, checkout: Path) -> tuple[dict[str, float], str]:
    metric, n, b = row.split(":")
    with tempfile.TemporaryDirectory(prefix="cbir_prof_") as tmp:
        ready, data = f"{tmp}/ready", f"{tmp}/perf.data"
        env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout's benchmarks, DIR's cbir_jax
        code = (f"import sys; from benchmarks.profile_scan import worker; sys.path.insert(0, {str(checkout)!r}); "
                f"worker({metric!r}, {n}, {b}, {ready!r})")
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp, env=env)
        try:
            while not os.path.exists(ready):
                if proc.poll() is not None:
                    raise RuntimeError(f"worker for {row} exited with {proc.returncode}")
                time.sleep(0.2)
            subprocess.run(["perf", "record", "-F", "499", "-p", str(proc.pid), "-o", data, "--", "sleep", str(seconds)],
                           check=True, capture_output=True)
            source = Path(ready).read_text()
        finally:
            proc.kill()
            proc.wait()
        report = subprocess.run(["perf", "report", "-i", data, "--no-children", "-g", "none", "--sort", "dso,sym"],
                                check=True, capture_output=True, text=True).stdout
    return categorise(report), source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="metric:N:B,... (default: the issue-21 rows)")
    parser.add_argument("--seconds", type=float, default=8.0, help="sampling time per row")
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the checkout whose cbir_jax is profiled")
    args = parser.parse_args()
    if shutil.which("perf") is None:
        sys.exit("profile_scan needs Linux perf on PATH")
    names = [c for c, _ in CATEGORIES] + ["other (runtime, threads)"]
    print("| row | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
    for row in args.rows.split(","):
        shares, source = profile(row, args.seconds, args.checkout.resolve())
        print(f"| {row} | " + " | ".join(f"{shares[c]:.1f}%" for c in names) + " |", flush=True)
    where = "" if args.checkout.resolve() == ROOT else f" --checkout {args.checkout}"
    print(f"\nranking from {source}; `python -m benchmarks.profile_scan --rows {args.rows} --seconds {args.seconds:g}{where}`")


if __name__ == "__main__":
    main()
