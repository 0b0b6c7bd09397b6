"""Ours and each peer in separate fresh processes, alternating, so machine-load drift shows up as spread.

A *side* is one implementation of a job: a function `module:function` that measures one or more cases
in the process it runs in and returns `{"times": {case: [seconds, ...]}, "info": {...}, "arrays": {...}}`.
`alternate` starts one fresh `python -m benchmarks.harness` process per side and round, in the order
ours, peer, ours, peer, ... (or ours, peer A, peer B, ... with several peers), and pools each side's
repetitions over its processes: best = the fastest repetition, median = the median of all of them.
No two sides ever share a process, so JAX's thread pool never competes with torch's, OpenMP's or BLAS's.

Peer processes run with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE removed (both together, in that process
alone): where this machine sets them for old OpenBLAS builds they slow a current one, and a peer is
measured at its best. Each process reports the BLAS libraries and kernels it actually ran (`blas_info`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
MARKER = "BENCH-RESULT "


@dataclasses.dataclass(frozen=True)
class Side:
    """One implementation of a job: `target` is "module:function", called with `kwargs` in a fresh process."""

    name: str
    target: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    peer: bool = True  # peers run with the OpenBLAS overrides removed


@dataclasses.dataclass
class SideResult:
    """A side's repetitions pooled over its processes; info and arrays from its last process."""

    times: dict[str, list[float]]
    per_process_best: dict[str, list[float]]
    info: dict[str, Any]
    arrays: dict[str, np.ndarray]
    processes: int

    def best(self, case: str) -> float:
        return min(self.times[case])

    def median(self, case: str) -> float:
        return statistics.median(self.times[case])


def peer_env(env: dict[str, str]) -> dict[str, str]:
    """`env` without the two OpenBLAS overrides (removed together, never one alone)."""
    return {k: v for k, v in env.items() if k not in OPENBLAS_VARS}


def order(sides: list[Side], rounds: int) -> list[Side]:
    """The process schedule: every side once per round, in the given order (ours first), `rounds` times."""
    return [side for _ in range(rounds) for side in sides]


def aggregate(outputs: list[dict[str, Any]]) -> SideResult:
    """Pools one side's worker outputs (in run order): all repetitions, each process's best, the last info."""
    times: dict[str, list[float]] = {}
    bests: dict[str, list[float]] = {}
    for out in outputs:
        for case, ts in out.get("times", {}).items():
            times.setdefault(case, []).extend(ts)
            if ts:
                bests.setdefault(case, []).append(min(ts))
    last = outputs[-1] if outputs else {}
    return SideResult(times, bests, last.get("info", {}), last.get("arrays", {}), len(outputs))


def run_process(side: Side, timeout: float = 1200) -> dict[str, Any]:
    """Runs one side in a fresh `python -m benchmarks.harness` process and returns what it measured."""
    env = peer_env(dict(os.environ)) if side.peer else dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="cbir_bench_") as tmp:
        arrays_path = Path(tmp) / "arrays.npz"
        cmd = [sys.executable, "-m", "benchmarks.harness", side.target, json.dumps(side.kwargs), str(arrays_path)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        line = next((ln for ln in reversed(done.stdout.splitlines()) if ln.startswith(MARKER)), None)
        if done.returncode != 0 or line is None:
            raise RuntimeError(f"{side.name} ({side.target}) failed with code {done.returncode}: "
                               f"{done.stderr.strip()[-400:]}")
        out = json.loads(line[len(MARKER):])
        if arrays_path.exists():
            with np.load(arrays_path) as f:
                out["arrays"] = {k: f[k] for k in f.files}
    return out


def alternate(sides: list[Side], rounds: int,
              spawn: Callable[[Side], dict[str, Any]] = run_process) -> dict[str, SideResult]:
    """Runs `order(sides, rounds)`, each entry in its own process (`spawn`), and aggregates per side."""
    outputs: dict[str, list[dict[str, Any]]] = {side.name: [] for side in sides}
    for side in order(sides, rounds):
        outputs[side.name].append(spawn(side))
    return {name: aggregate(outs) for name, outs in outputs.items()}


# ---- inside a worker process ----------------------------------------------------------------------------


def blas_info() -> list[dict[str, Any]]:
    """The BLAS/OpenMP libraries loaded in this process: library, kernel (corename) and threads.

    Uses threadpoolctl where it is installed; otherwise asks OpenBLAS directly through ctypes.
    """
    try:
        from threadpoolctl import threadpool_info

        return [{"lib": Path(i["filepath"]).name, "api": i.get("internal_api"), "kernel": i.get("architecture"),
                 "threads": i.get("num_threads")} for i in threadpool_info()]
    except ImportError:
        pass
    import ctypes

    found = []
    paths = sorted({ln.split()[-1] for ln in open("/proc/self/maps") if "openblas" in ln.lower() and "/" in ln})
    for path in paths:
        lib = ctypes.CDLL(path)
        for prefix, suffix in (("scipy_", "64_"), ("scipy_", ""), ("", "64_"), ("", "")):
            try:
                corename = getattr(lib, f"{prefix}openblas_get_corename{suffix}")
                threads = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}")
            except AttributeError:
                continue
            corename.restype = ctypes.c_char_p
            found.append({"lib": Path(path).name, "api": "openblas", "kernel": corename().decode(),
                          "threads": int(threads())})
            break
    return found


def describe_blas(info: list[dict[str, Any]]) -> str:
    """One line for the table: e.g. "OpenBLAS kernel SkylakeX, 2 threads (libscipy_openblas64_...)"."""
    parts = [f"{i['api']} {i['kernel'] or ''}, {i['threads']} threads ({i['lib'].split('-')[0]})".replace(" ,", ",")
             for i in info]
    return "; ".join(parts) or "no BLAS loaded"


def selftest(reps: int = 2) -> dict[str, Any]:
    """A trivial side for the harness's own test: times a tiny sum and reports its environment."""
    from benchmarks.timing import times

    x = np.arange(1000, dtype=np.float32)
    return {"times": {"sum": times(lambda: float(x.sum()), reps)},
            "info": {"openblas_vars": sorted(v for v in OPENBLAS_VARS if v in os.environ)},
            "arrays": {"x": x[:3]}}


def worker_main() -> None:
    parser = argparse.ArgumentParser(description="one side of a benchmark, in this process (used by alternate)")
    parser.add_argument("target", help="module:function")
    parser.add_argument("kwargs", help="JSON keyword arguments")
    parser.add_argument("arrays", help="where to save the returned arrays (.npz)")
    args = parser.parse_args()
    module, function = args.target.split(":")
    out = getattr(importlib.import_module(module), function)(**json.loads(args.kwargs))
    arrays = out.pop("arrays", {})
    if arrays:
        np.savez(args.arrays, **arrays)
    out.setdefault("info", {})["blas"] = blas_info()
    print(MARKER + json.dumps(out), flush=True)


if __name__ == "__main__":
    worker_main()
