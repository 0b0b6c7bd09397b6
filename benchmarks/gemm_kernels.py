"""The GEMM alone, at the batched scan's shapes: XLA:CPU's dot against numpy's (OpenBLAS) sgemm.

`python -m benchmarks.gemm_kernels [--rows 3232,10000,100000] [--rounds 3] [--reps 10]`

At B = 256 the fixed-metric scan spends most of its cycles in the GEMM (benchmarks/README.md), and faiss's
IndexFlat search is OpenBLAS's sgemm plus a heap. So the scan can beat faiss there only if XLA's GEMM
matches OpenBLAS's on the same operands. This measures exactly that: (rows x D) gallery times (B x D)
queries, D = 1280, B = 256, in both operand orders XLA can be given (`gallery @ queries.T`, the form
`scorers.gallery_major` uses from 16 queries on, and `queries @ gallery.T`), and numpy's `gallery @ queries.T`,
each side in its own fresh process (benchmarks/harness.py), alternating; GFLOP/s = 2 * rows * B * D / s.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from benchmarks.harness import Side, alternate, blas_info, describe_blas
from benchmarks.timing import times

D, B = 1280, 256


def _operands(rows: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(rows)
    return rng.random((rows, D), dtype=np.float32), rng.random((B, D), dtype=np.float32)


def side_xla(sizes: list[int], reps: int) -> dict[str, Any]:
    import jax

    gallery_major = jax.jit(lambda g, q: g @ q.T)
    query_major = jax.jit(lambda g, q: q @ g.T)
    out: dict[str, Any] = {"times": {}, "info": {"config": f"jax {jax.__version__}, XLA:CPU dot"}}
    for rows in sizes:
        g, q = (jax.device_put(a) for a in _operands(rows))
        for name, f in (("g@q.T", gallery_major), ("q@g.T", query_major)):
            out["times"][f"{rows} {name}"] = times(lambda: jax.block_until_ready(f(g, q)), reps)
    return out


def side_numpy(sizes: list[int], reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {"times": {}, "info": {"config": f"numpy {np.__version__}", "blas": blas_info()}}
    for rows in sizes:
        g, q = _operands(rows)
        out["times"][f"{rows} g@q.T"] = times(lambda: g @ q.T, reps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="3232,10000,100000", help="gallery rows per GEMM, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    sizes = [int(r) for r in args.rows.split(",")]
    kw = {"sizes": sizes, "reps": args.reps}
    res = alternate([Side("xla", "benchmarks.gemm_kernels:side_xla", kw, peer=False),
                     Side("numpy", "benchmarks.gemm_kernels:side_numpy", kw)], args.rounds)
    print(f"D={D}, B={B}; best of {args.rounds} processes x {args.reps} reps per side; "
          f"numpy: {describe_blas(res['numpy'].info['blas'])}")
    print("| rows | XLA gallery @ queries.T | XLA queries @ gallery.T | numpy (OpenBLAS) | best XLA ÷ numpy |")
    print("|---:|---:|---:|---:|---:|")
    for rows in sizes:
        flops = 2.0 * rows * B * D
        xla_g = flops / res["xla"].best(f"{rows} g@q.T") / 1e9
        xla_q = flops / res["xla"].best(f"{rows} q@g.T") / 1e9
        blas = flops / res["numpy"].best(f"{rows} g@q.T") / 1e9
        print(f"| {rows:,} | {xla_g:.0f} GFLOP/s | {xla_q:.0f} GFLOP/s | {blas:.0f} GFLOP/s | "
              f"{max(xla_g, xla_q) / blas:.2f} |")


if __name__ == "__main__":
    main()
