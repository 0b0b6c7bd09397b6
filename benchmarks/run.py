"""Every job of ours against its peer, in one run on one machine: `python -m benchmarks.run [--quick]`.

Prints a markdown table and writes it to benchmarks/results/<date>.md (`<date>-quick.md` with --quick),
with the machine's description and its limits measured in the same run: numpy sgemm GFLOP/s (4096^3)
and a streaming read GB/s (numpy/BLAS sgemv over a 1 GiB matrix), each the best of several tries at the
start and at the end of the run. Every timing excludes a warm-up call (JAX compilation included) and
waits for JAX results (`block_until_ready`); rates are given for the best (min-time) repetition, with
the median in the note. Peers that are not installed (faiss, imagehash, torch) give a row saying so.

    quick (< 3 min): N in {10k, 100k}; full (< 15 min): N up to 1M.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.timing import times

D, K, HIDDEN = 1280, 10, 512
RESULTS = Path(__file__).resolve().parent / "results"
LIMITS: dict[str, float] = {"gflops": 0.0, "gbps": 0.0}


# ---- measuring -------------------------------------------------------------------------------------------


def measure_limits(reps: int = 3) -> None:
    """Updates LIMITS with the best sgemm GFLOP/s and streaming read GB/s seen so far."""
    a = np.random.default_rng(0).random((4096, 4096), dtype=np.float32)
    LIMITS["gflops"] = max(LIMITS["gflops"], 2 * 4096**3 / min(times(lambda: a @ a, reps)) / 1e9)
    m = np.ones((1 << 18, 1024), np.float32)  # 1 GiB; the values do not matter to bandwidth
    v = np.ones(1024, np.float32)
    LIMITS["gbps"] = max(LIMITS["gbps"], m.nbytes / min(times(lambda: m @ v, reps)) / 1e9)


def _fraction(flops: float | None, nbytes: float | None, seconds: float) -> str:
    """The share of the binding machine limit reached (roofline: the larger of compute and read)."""
    parts = []
    if flops:
        parts.append((flops / seconds / 1e9 / LIMITS["gflops"], f"{flops / seconds / 1e9:.0f} GFLOP/s"))
    if nbytes:
        parts.append((nbytes / seconds / 1e9 / LIMITS["gbps"], f"{nbytes / seconds / 1e9:.1f} GB/s"))
    if not parts:
        return ""
    share, what = max(parts)
    return f"{share:.0%} ({what})"


def _row(job, ours, peer, unit, peer_name, note="", limit="", peer_limit=""):
    return {"job": job, "ours": ours, "peer": peer, "unit": unit, "peer_name": peer_name, "note": note,
            "limit": limit, "peer_limit": peer_limit}


def _data(n: int, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered features (1024 centres + uniform noise), gallery 64-byte aligned so JAX need not copy it."""
    from cbir_jax.ranking import aligned_empty

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1024, D), dtype=np.float32)
    g = aligned_empty((n, D))
    for s in range(0, n, 1 << 15):
        e = min(n, s + (1 << 15))
        g[s:e] = centres[rng.integers(0, 1024, e - s)]
        g[s:e] += rng.random((e - s, D), dtype=np.float32) - 0.5
    q = centres[rng.integers(0, 1024, n_queries)] + rng.random((n_queries, D), dtype=np.float32) - 0.5
    return g, q.astype(np.float32)


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / a.shape[1] for x, y in zip(a, b)]))


# ---- fixed metrics: ours vs faiss and numpy ---------------------------------------------------------------


def _numpy_search(metric: str, g: np.ndarray, g_term: np.ndarray, q: np.ndarray) -> np.ndarray:
    s = q @ g.T
    s = s * g_term[None] if metric == "cosine" else 2 * s - g_term[None]  # cosine: / |g|; L2: -|g|^2 + 2 q.g
    part = np.argpartition(-s, K, axis=1)[:, :K]
    return np.take_along_axis(part, np.argsort(-np.take_along_axis(s, part, 1), axis=1), 1)


def fixed_metric_rows(sizes: list[int], reps: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from cbir_jax import ranking, scorers

    try:
        import faiss
    except ImportError:
        faiss = None
    rows = []
    for n in sizes:
        g, q_all = _data(n, 256, seed=n)
        r = reps if n < 1_000_000 else max(2, reps - 1)
        # At 1M the L2 rows repeat what cosine shows at twice the time; the full run must stay < 15 min.
        metrics = (("cosine", "cosine"),) if n >= 1_000_000 else (("cosine", "cosine"), ("L2", "euclid"))
        for metric, ours_name in metrics:
            scorer = scorers.fixed_scorer(ours_name)
            state = scorer.prepare(jax.device_put(g))
            jax.block_until_ready(state)
            g_term = (np.asarray(state[0]["inv_norm"]) if metric == "cosine" else np.asarray(state[0]["g2"]))
            res: dict[tuple[str, int], tuple[list[float], np.ndarray]] = {}
            for b in (1, 256):
                qj = jnp.asarray(q_all[:b])
                t = times(lambda: jax.block_until_ready(ranking.top_k(scorer, state, qj, k=K)), r)
                res[("ours", b)] = (t, np.asarray(ranking.top_k(scorer, state, qj, k=K)[1]))
                q = q_all[:b]
                t = times(lambda: _numpy_search(metric, g, g_term, q), r)
                res[("numpy", b)] = (t, _numpy_search(metric, g, g_term, q))
            del state
            if faiss is not None:
                index = faiss.IndexFlatIP(D) if metric == "cosine" else faiss.IndexFlatL2(D)
                for s in range(0, n, 1 << 16):
                    block = g[s:s + (1 << 16)]
                    index.add(block / np.linalg.norm(block, axis=1, keepdims=True) if metric == "cosine" else block)
                for b in (1, 256):
                    q = q_all[:b] / np.linalg.norm(q_all[:b], axis=1, keepdims=True) if metric == "cosine" else q_all[:b]
                    t = times(lambda: index.search(q, K), r)
                    res[("faiss", b)] = (t, index.search(q, K)[1])
                del index
            for b in (1, 256):
                t_ours, i_ours = res[("ours", b)]
                flops, nbytes = 2.0 * b * n * D, 4.0 * n * D
                for peer in ("faiss", "numpy"):
                    job = f"rank {metric} top-{K}, N={n:,}, B={b}"
                    name = {"faiss": f"faiss.IndexFlat{'IP' if metric == 'cosine' else 'L2'}",
                            "numpy": "numpy matmul + argpartition"}[peer]
                    if (peer, b) not in res:
                        rows.append(_row(job, b / min(t_ours), None, "queries/s", name, "faiss not installed",
                                         _fraction(flops, nbytes, min(t_ours))))
                        continue
                    t_peer, i_peer = res[(peer, b)]
                    note = (f"top-{K} agreement {_agreement(i_ours, i_peer):.3f}; median ours "
                            f"{b / statistics.median(t_ours):.1f}, peer {b / statistics.median(t_peer):.1f}; {r} reps")
                    rows.append(_row(job, b / min(t_ours), b / min(t_peer), "queries/s", name, note,
                                     _fraction(flops, nbytes, min(t_ours)), _fraction(flops, nbytes, min(t_peer))))
        del g
    return rows


def storage_rows(n: int, reps: int) -> list[dict]:
    """bfloat16 / float16 gallery storage (float32 arithmetic): speed and recall@10 against float32."""
    import jax
    import jax.numpy as jnp

    from cbir_jax import ranking, scorers

    g, q = _data(n, 256, seed=7)
    qj = jnp.asarray(q)
    base = scorers.fixed_scorer("cosine")
    state = base.prepare(jax.device_put(g))
    t32 = times(lambda: jax.block_until_ready(ranking.top_k(base, state, qj, k=K)), reps)
    i32 = np.asarray(ranking.top_k(base, state, qj, k=K)[1])
    rows = []
    for dtype in (jnp.bfloat16, jnp.float16):
        scorer = scorers.with_storage(base, dtype)
        st = scorer.prepare(jax.device_put(g))
        t = times(lambda: jax.block_until_ready(ranking.top_k(scorer, st, qj, k=K)), reps)
        i = np.asarray(ranking.top_k(scorer, st, qj, k=K)[1])
        note = (f"recall@{K} vs float32 {_agreement(i, i32):.3f}; gallery {g.nbytes / 2**30:.2f} -> "
                f"{st[0]['g'].nbytes / 2**30:.2f} GiB; chunks widened to float32")
        rows.append(_row(f"rank cosine, N={n:,}, B=256, {jnp.dtype(dtype).name} gallery", 256 / min(t),
                         256 / min(t32), "queries/s", "ours, float32 gallery", note,
                         _fraction(2.0 * 256 * n * D, 2.0 * n * D, min(t))))
    return rows


# ---- the learned head: GEMM form vs numpy --------------------------------------------------------------


def _numpy_mlp_top_k(layers, g: np.ndarray, q: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """The head as written, MLP((q - g)^2), per query and gallery chunk, with a running top-k."""
    (w1, b1), (w2, b2) = layers
    out = []
    for qi in q:
        best_s, best_i = np.full(K, -np.inf, np.float32), np.full(K, -1)
        for s in range(0, len(g), chunk):
            h = np.maximum(((g[s:s + chunk] - qi) ** 2) @ w1 + b1, 0)
            sc = (h @ w2)[:, 0] + b2[0]
            all_s, all_i = np.concatenate([best_s, sc]), np.concatenate([best_i, np.arange(s, s + len(sc))])
            top = np.argpartition(-all_s, K)[:K]
            best_s, best_i = all_s[top], all_i[top]
        out.append(best_i[np.argsort(-best_s)])
    return np.stack(out)


def mlp_rows(cases: list[tuple[int, int]], reps: int, naive_cases: list[tuple[int, int]]) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from cbir_jax import heads, ranking, scorers
    from cbir_jax.config import HeadConfig

    head = heads.build_head(HeadConfig(name="mlp", hidden=[HIDDEN]))
    params = heads.init_params(head, D, jax.random.key(0))
    layers = [(np.asarray(w), np.asarray(b)) for w, b in scorers.mlp_layers(params)]
    flops_per_pair = 2 * D * HIDDEN + 2 * HIDDEN
    rows = []
    for fast, b, n in [(True, b, n) for b, n in cases] + [(False, b, n) for b, n in naive_cases]:
        g, q = _data(n, b, seed=11)
        scorer = scorers.pair_scorer("mlp", head, params, fast=fast)
        state = scorer.prepare(jax.device_put(g))
        qj = jnp.asarray(q)
        t = times(lambda: jax.block_until_ready(ranking.top_k(scorer, state, qj, k=K, chunk=2048)), reps)
        pairs = b * n
        if fast:
            i_ours = np.asarray(ranking.top_k(scorer, state, qj, k=K, chunk=2048)[1])
            t_np = times(lambda: _numpy_mlp_top_k(layers, g, q), reps)
            i_np = _numpy_mlp_top_k(layers, g, q)
            note = (f"top-{K} agreement {_agreement(i_ours, i_np):.3f}; ours {pairs * flops_per_pair / min(t) / 1e9:.1f} "
                    f"GFLOP/s, numpy {pairs * flops_per_pair / min(t_np) / 1e9:.1f}; median ours "
                    f"{pairs / statistics.median(t):.3g}, numpy {pairs / statistics.median(t_np):.3g} pairs/s; {reps} reps")
            rows.append(_row(f"rank mlp head {D}->{HIDDEN}->1 (GEMM form), B={b}, N={n:,}", pairs / min(t),
                             pairs / min(t_np), "pairs/s", "numpy, MLP((q-g)^2) per query", note,
                             _fraction(pairs * flops_per_pair, None, min(t)),
                             _fraction(pairs * flops_per_pair, None, min(t_np))))
        else:
            rows.append(_row(f"rank mlp head, naive vmap form, B={b}, N={n:,}", pairs / min(t), None, "pairs/s",
                             "-", f"the pairwise application (fast=False), for reference; {reps} reps",
                             _fraction(pairs * flops_per_pair, None, min(t))))
        del state
    return rows


# ---- memory, other engineers' jobs ----------------------------------------------------------------------


def _rss_worker(n: int, batches: list[int]) -> None:
    import jax
    import jax.numpy as jnp

    from cbir_jax import ranking, scorers

    g = ranking.aligned_empty((n, D))
    rng = np.random.default_rng(0)
    for s in range(0, n, 1 << 15):
        g[s:s + (1 << 15)] = rng.random((min(1 << 15, n - s), D), dtype=np.float32)
    scorer = scorers.fixed_scorer("cosine")
    state = scorer.prepare(jax.device_put(g))
    for b in batches:
        jax.block_until_ready(ranking.top_k(scorer, state, jnp.asarray(g[:b]), k=K))
    # VmHWM, not ru_maxrss: Linux carries the parent's RSS high-water mark into ru_maxrss across fork + exec
    hwm_kib = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
    print(f"RSS {hwm_kib * 1024} {g.nbytes}")


def rss_rows(n: int, batches: list[int]) -> list[dict]:
    cmd = [sys.executable, "-m", "benchmarks.run", "--rss-worker", str(n), "--rss-batches", ",".join(map(str, batches))]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[1])
    line = [x for x in out.stdout.splitlines() if x.startswith("RSS ")]
    if out.returncode != 0 or not line:
        return [_row(f"peak RSS, cosine top-{K}, N={n:,}", None, None, "x gallery bytes", "-",
                     f"worker failed: {out.stderr[-300:]!r}")]
    rss, nbytes = map(int, line[0].split()[1:])
    return [_row(f"peak RSS ranking a {n:,} x {D} float32 gallery (cosine, B={'/'.join(map(str, batches))})",
                 rss / nbytes, 1.3, "x gallery bytes", "target", f"peak RSS {rss / 2**30:.2f} GiB of a "
                 f"{nbytes / 2**30:.2f} GiB gallery (subprocess, whole process incl. Python+JAX); lower is better")]


def module_rows(name: str, quick: bool) -> list[dict]:
    try:
        mod = importlib.import_module(f"benchmarks.{name}")
        return list(mod.run(quick))
    except Exception as e:  # another engineer's module: report it, keep going
        return [_row(f"benchmarks/{name}.py", None, None, "-", "-",
                     f"not run: {type(e).__name__}: {str(e)[:200]}".replace("\n", " "))]


# ---- report --------------------------------------------------------------------------------------------


def machine() -> str:
    import jax

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    mem = next((int(ln.split()[1]) / 2**20 for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0)
    versions = [f"jax {jax.__version__}", f"numpy {np.__version__}"]
    for mod in ("faiss", "imagehash", "torch"):
        try:
            versions.append(f"{mod} {importlib.import_module(mod).__version__}")
        except Exception:
            versions.append(f"{mod} absent")
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.1f} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}; {', '.join(versions)}; JAX devices: {jax.devices()[0].platform}")


def _fmt(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def render(rows: list[dict], quick: bool, seconds: float) -> str:
    out = [f"# Benchmarks {datetime.date.today()}{' (quick)' if quick else ''}", "",
           f"Machine: {machine()}", "",
           f"Measured limits (best of start and end of run): sgemm {LIMITS['gflops']:.1f} GFLOP/s (numpy, 4096^3), "
           f"streaming read {LIMITS['gbps']:.1f} GB/s (numpy sgemv over 1 GiB).", "",
           f"Command: `python -m benchmarks.run{' --quick' if quick else ''}` ({seconds / 60:.1f} min).", "",
           "| job | ours | peer | unit | ours ÷ peer | peer name | ours: limit reached | peer: limit reached | note |",
           "|---|---:|---:|---|---:|---|---|---|---|"]
    for r in rows:
        ratio = r["ours"] / r["peer"] if r.get("ours") and r.get("peer") else None
        out.append(f"| {r['job']} | {_fmt(r.get('ours'))} | {_fmt(r.get('peer'))} | {r['unit']} | {_fmt(ratio)} | "
                   f"{r['peer_name']} | {r.get('limit', '')} | {r.get('peer_limit', '')} | {r.get('note', '')} |")
    out += ["", "Notes:",
            "- Rates (higher is better) from the fastest repetition after a warm-up call; medians in the notes. "
            "ours ÷ peer > 1 means ours is faster (for the RSS row: ratio to the 1.3x target, < 1 meets it).",
            "- Limit reached: the larger of GFLOP/s ÷ sgemm peak and GB/s ÷ streaming read (roofline). Fixed "
            "metrics count 2·B·N·D flops and N·D·4 gallery bytes per search; the mlp head counts "
            f"2·D·H + 2·H flops per pair (D={D}, H={HIDDEN}: the first layer as a GEMM plus the output layer; "
            "adds and the activation are not counted).",
            "- Agreement: mean share of the top-10 indices that ours and the peer have in common.",
            "- Data: clustered synthetic features (1024 centres + uniform noise); ranking excludes the one-off "
            "gallery preparation (norms, g²·W₁, faiss index build) for all."]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller galleries, fewer repetitions (< 3 min)")
    parser.add_argument("--rss-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rss-batches", default="1", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_worker:
        return _rss_worker(args.rss_worker, [int(b) for b in args.rss_batches.split(",")])
    start = time.perf_counter()
    quick = args.quick
    reps = 2 if quick else 3
    measure_limits()
    jobs: list[tuple[str, Callable[[], list[dict]]]] = [
        ("fixed metrics", lambda: fixed_metric_rows([10_000, 100_000] if quick else [10_000, 100_000, 1_000_000], reps)),
        ("half-precision storage", lambda: storage_rows(50_000 if quick else 100_000, reps)),
        ("mlp head", lambda: mlp_rows([(1, 100_000), (64, 2048 if quick else 8192)], reps,
                                      naive_cases=[] if quick else [(1, 100_000), (64, 4096)])),
        ("memory", lambda: rss_rows(1_000_000, [1] if quick else [1, 256])),
        ("heuristics", lambda: module_rows("heuristics", quick)),
        ("extraction", lambda: module_rows("extraction", quick)),
    ]
    rows: list[dict] = []
    for name, job in jobs:
        t = time.perf_counter()
        try:
            rows += job()
        except Exception as e:
            traceback.print_exc()
            rows.append(_row(name, None, None, "-", "-", f"failed: {type(e).__name__}: {e}"[:300]))
        print(f"[{name}: {time.perf_counter() - t:.0f} s]", file=sys.stderr, flush=True)
    measure_limits()
    text = render(rows, quick, time.perf_counter() - start)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{datetime.date.today()}{'-quick' if quick else ''}.md"
    path.write_text(text)
    print(f"written: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
