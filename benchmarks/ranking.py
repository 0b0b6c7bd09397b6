"""Ranking jobs: fixed metrics against faiss and numpy, half-precision storage, the mlp head, peak memory.

Each function named `side_*` runs in its own process (see benchmarks.harness) and measures one side;
each `*_rows` function alternates the sides of a job and turns their results into table rows.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from benchmarks import table
from benchmarks.harness import Side, alternate, describe_blas
from benchmarks.timing import times

D, K, HIDDEN = 1280, 10, 512
BATCHES = (1, 256)


def _data(n: int, n_queries: int, seed: int,
          empty: Callable[..., np.ndarray] = np.empty) -> tuple[np.ndarray, np.ndarray]:
    """Clustered features (1024 centres + uniform noise); the same for every side given the seed."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1024, D), dtype=np.float32)
    g = empty((n, D), np.float32)
    for s in range(0, n, 1 << 15):
        e = min(n, s + (1 << 15))
        g[s:e] = centres[rng.integers(0, 1024, e - s)]
        g[s:e] += rng.random((e - s, D), dtype=np.float32) - 0.5
    q = centres[rng.integers(0, 1024, n_queries)] + rng.random((n_queries, D), dtype=np.float32) - 0.5
    return g, q.astype(np.float32)


def _ours_data(n: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from cbir_jax.scoring.ranking import aligned_empty  # 64-byte aligned, so jax.device_put aliases it

    return _data(n, n_queries, seed, aligned_empty)


# ---- machine limits (a peer-environment process: numpy at its best) ---------------------------------------


def side_limits(reps: int = 5) -> dict[str, Any]:
    """Best sgemm (4096^3) and streaming read (sgemv over 1 GiB) of numpy's BLAS."""
    a = np.random.default_rng(0).random((4096, 4096), dtype=np.float32)
    t_mm = times(lambda: a @ a, reps)
    m = np.ones((1 << 18, 1024), np.float32)  # 1 GiB; the values do not matter to bandwidth
    v = np.ones(1024, np.float32)
    t_mv = times(lambda: m @ v, reps)
    return {"times": {}, "info": {"gflops": 2 * 4096**3 / min(t_mm) / 1e9, "gbps": m.nbytes / min(t_mv) / 1e9}}


# ---- fixed metrics: ours vs faiss and numpy ---------------------------------------------------------------


def side_fixed_ours(n: int, metrics: list[str], reps: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from cbir_jax.scoring import ranking, scorers

    g, q_all = _ours_data(n, max(BATCHES), seed=n)
    out: dict[str, Any] = {"times": {}, "arrays": {}}
    for metric in metrics:
        scorer = scorers.fixed_scorer({"cosine": "cosine", "L2": "euclid"}[metric])
        state = scorer.prepare(jax.device_put(g))
        jax.block_until_ready(state)
        for b in BATCHES:
            q = jnp.asarray(q_all[:b])
            search = lambda: jax.block_until_ready(ranking.top_k(scorer, state, q, k=K))  # noqa: E731
            out["times"][f"{metric} B={b}"] = times(search, reps)
            out["arrays"][f"{metric} B={b}"] = np.asarray(search()[1])
        del state
    out["info"] = {"config": f"JAX {jax.__version__} on {jax.devices()[0].platform}"}
    return out


def _numpy_search(metric: str, g: np.ndarray, g_term: np.ndarray, q: np.ndarray) -> np.ndarray:
    s = q @ g.T
    s = s * g_term[None] if metric == "cosine" else 2 * s - g_term[None]  # cosine: / |g|; L2: -|g|^2 + 2 q.g
    part = np.argpartition(-s, K, axis=1)[:, :K]
    return np.take_along_axis(part, np.argsort(-np.take_along_axis(s, part, 1), axis=1), 1)


def side_fixed_numpy(n: int, metrics: list[str], reps: int) -> dict[str, Any]:
    g, q_all = _data(n, max(BATCHES), seed=n)
    out: dict[str, Any] = {"times": {}, "arrays": {}}
    for metric in metrics:
        g_term = 1 / np.linalg.norm(g, axis=1) if metric == "cosine" else np.einsum("ij,ij->i", g, g)
        for b in BATCHES:
            q = q_all[:b]
            out["times"][f"{metric} B={b}"] = times(lambda: _numpy_search(metric, g, g_term, q), reps)
            out["arrays"][f"{metric} B={b}"] = _numpy_search(metric, g, g_term, q)
    out["info"] = {"config": f"numpy {np.__version__} matmul + argpartition"}
    return out


def side_fixed_faiss(n: int, metrics: list[str], reps: int) -> dict[str, Any]:
    import faiss

    g, q_all = _data(n, max(BATCHES), seed=n)
    out: dict[str, Any] = {"times": {}, "arrays": {}}
    for metric in metrics:
        index = faiss.IndexFlatIP(D) if metric == "cosine" else faiss.IndexFlatL2(D)
        for s in range(0, n, 1 << 16):
            block = g[s:s + (1 << 16)]
            index.add(block / np.linalg.norm(block, axis=1, keepdims=True) if metric == "cosine" else block)
        for b in BATCHES:
            q = q_all[:b] / np.linalg.norm(q_all[:b], axis=1, keepdims=True) if metric == "cosine" else q_all[:b]
            out["times"][f"{metric} B={b}"] = times(lambda: index.search(q, K), reps)
            out["arrays"][f"{metric} B={b}"] = index.search(q, K)[1]
        del index
    out["info"] = {"config": f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads (its default)"}
    return out


def fixed_metric_rows(sizes: list[int], rounds: int, reps: int, big_rounds: int, big_reps: int) -> list[dict]:
    """Per N: ours, faiss, numpy alternating; at N >= 1M cosine only (L2 repeats it at twice the time)."""
    try:
        import faiss  # noqa: F401
        peers = ["faiss", "numpy"]
    except ImportError:
        peers = ["numpy"]
    rows = []
    for n in sizes:
        big = n >= 1_000_000
        metrics = ["cosine"] if big else ["cosine", "L2"]
        kw = {"n": n, "metrics": metrics, "reps": big_reps if big else reps}
        sides = [Side("ours", "benchmarks.ranking:side_fixed_ours", kw, peer=False)]
        sides += [Side(p, f"benchmarks.ranking:side_fixed_{p}", kw) for p in peers]
        res = alternate(sides, big_rounds if big else rounds)
        ours = res["ours"]
        for metric in metrics:
            for b in BATCHES:
                case = f"{metric} B={b}"
                flops, nbytes = 2.0 * b * n * D, 4.0 * n * D
                for p in ("faiss", "numpy"):
                    name = {"faiss": f"faiss.IndexFlat{'IP' if metric == 'cosine' else 'L2'}",
                            "numpy": "numpy matmul + argpartition"}[p]
                    job = f"rank {metric} top-{K}, N={n:,}, B={b}"
                    if p not in res:
                        rows.append(table.rate_row(job, "queries/s", name, b, ours, None, case,
                                                   note="faiss not installed"))
                        continue
                    peer = res[p]
                    note = (f"top-{K} agreement {table.agreement(ours.arrays[case], peer.arrays[case]):.3f}; "
                            f"{ours.processes}+{peer.processes} processes × {kw['reps']} reps")
                    rows.append(table.rate_row(
                        job, "queries/s", f"{name}: {peer.info['config']}; {describe_blas(peer.info['blas'])}",
                        b, ours, peer, case, note=note, limit=table.fraction(flops, nbytes, ours.best(case)),
                        peer_limit=table.fraction(flops, nbytes, peer.best(case))))
    return rows


# ---- half-precision gallery storage: ours vs ours --------------------------------------------------------


def side_storage(n: int, dtype: str, reps: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from cbir_jax.scoring import ranking, scorers

    g, q = _ours_data(n, 256, seed=7)
    qj = jnp.asarray(q)
    scorer = scorers.fixed_scorer("cosine")
    if dtype != "float32":
        scorer = scorers.with_storage(scorer, jnp.dtype(dtype))
    state = scorer.prepare(jax.device_put(g))
    search = lambda: jax.block_until_ready(ranking.top_k(scorer, state, qj, k=K))  # noqa: E731
    return {"times": {"B=256": times(search, reps)}, "arrays": {"B=256": np.asarray(search()[1])},
            "info": {"gallery_gib": g.nbytes / 2**30, "stored_gib": state[0]["g"].nbytes / 2**30}}


def storage_rows(n: int, rounds: int, reps: int) -> list[dict]:
    """bfloat16 / float16 gallery storage (float32 arithmetic): speed and recall@10 against float32."""
    dtypes = ["float32", "bfloat16", "float16"]
    res = alternate([Side(d, "benchmarks.ranking:side_storage", {"n": n, "dtype": d, "reps": reps}, peer=False)
                     for d in dtypes], rounds)
    base = res["float32"]
    rows = []
    for d in dtypes[1:]:
        r = res[d]
        note = (f"recall@{K} vs float32 {table.agreement(r.arrays['B=256'], base.arrays['B=256']):.3f}; gallery "
                f"{r.info['gallery_gib']:.2f} -> {r.info['stored_gib']:.2f} GiB; chunks widened to float32; "
                f"{r.processes}+{base.processes} processes × {reps} reps")
        rows.append(table.rate_row(f"rank cosine, N={n:,}, B=256, {d} gallery", "queries/s",
                                   "ours, float32 gallery (own process)", 256, r, base, "B=256", note=note,
                                   limit=table.fraction(2.0 * 256 * n * D, 2.0 * n * D, r.best("B=256"))))
    return rows


# ---- the learned head: GEMM form vs numpy --------------------------------------------------------------


def _mlp_layers() -> tuple[Any, Any, list[tuple[np.ndarray, np.ndarray]]]:
    """The head, its parameters (key 0) and its layers as numpy arrays (the numpy side gets the same values)."""
    import jax

    from cbir_jax.scoring import heads, scorers
    from cbir_jax.core.config import HeadConfig

    head = heads.build_head(HeadConfig(name="mlp", hidden=[HIDDEN]))
    params = heads.init_params(head, D, jax.random.key(0))
    return head, params, [(np.asarray(w), np.asarray(b)) for w, b in scorers.mlp_layers(params)]


def side_mlp_ours(cases: list[list[int]], reps: int, fast: bool) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from cbir_jax.scoring import ranking, scorers

    head, params, _ = _mlp_layers()
    out: dict[str, Any] = {"times": {}, "arrays": {}, "info": {}}
    scorer = scorers.pair_scorer("mlp", head, params, fast=fast)
    for b, n in cases:
        g, q = _ours_data(n, b, seed=11)
        state = scorer.prepare(jax.device_put(g))
        qj = jnp.asarray(q)
        search = lambda: jax.block_until_ready(ranking.top_k(scorer, state, qj, k=K, chunk=2048))  # noqa: E731
        out["times"][f"B={b} N={n}"] = times(search, reps)
        out["arrays"][f"B={b} N={n}"] = np.asarray(search()[1])
    return out


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


def side_mlp_numpy(cases: list[list[int]], reps: int, layers_path: str) -> dict[str, Any]:
    with np.load(layers_path) as f:
        layers = [(f["w1"], f["b1"]), (f["w2"], f["b2"])]
    out: dict[str, Any] = {"times": {}, "arrays": {}, "info": {"config": f"numpy {np.__version__}"}}
    for b, n in cases:
        g, q = _data(n, b, seed=11)
        out["times"][f"B={b} N={n}"] = times(lambda: _numpy_mlp_top_k(layers, g, q), reps)
        out["arrays"][f"B={b} N={n}"] = _numpy_mlp_top_k(layers, g, q)
    return out


def side_mlp_layers(path: str) -> dict[str, Any]:
    """Writes the head's layers for the numpy side (its own process: the parent never imports JAX)."""
    _, _, layers = _mlp_layers()
    np.savez(path, w1=layers[0][0], b1=layers[0][1], w2=layers[1][0], b2=layers[1][1])
    return {"times": {}}


def mlp_rows(cases: list[tuple[int, int]], naive_cases: list[tuple[int, int]], rounds: int, reps: int,
             layers_path: str) -> list[dict]:
    """Ours (GEMM form), numpy (the head as written, per query) and, for reference, ours' naive vmap form."""
    alternate([Side("layers", "benchmarks.ranking:side_mlp_layers", {"path": layers_path}, peer=False)], 1)
    sides = [Side("ours", "benchmarks.ranking:side_mlp_ours", {"cases": cases, "reps": reps, "fast": True}, peer=False),
             Side("numpy", "benchmarks.ranking:side_mlp_numpy",
                  {"cases": cases, "reps": reps, "layers_path": layers_path})]
    if naive_cases:
        sides.append(Side("naive", "benchmarks.ranking:side_mlp_ours",
                          {"cases": naive_cases, "reps": reps, "fast": False}, peer=False))
    res = alternate(sides, rounds)
    ours, peer = res["ours"], res["numpy"]
    flops_per_pair = 2 * D * HIDDEN + 2 * HIDDEN
    rows = []
    for b, n in cases:
        case, pairs = f"B={b} N={n}", b * n
        note = (f"top-{K} agreement {table.agreement(ours.arrays[case], peer.arrays[case]):.3f}; "
                f"{ours.processes}+{peer.processes} processes × {reps} reps")
        rows.append(table.rate_row(
            f"rank mlp head {D}->{HIDDEN}->1 (GEMM form), B={b}, N={n:,}", "pairs/s",
            f"numpy, MLP((q-g)^2) per query: {peer.info['config']}; {describe_blas(peer.info['blas'])}",
            pairs, ours, peer, case, note=note, limit=table.fraction(pairs * flops_per_pair, None, ours.best(case)),
            peer_limit=table.fraction(pairs * flops_per_pair, None, peer.best(case))))
    for b, n in naive_cases:
        case, pairs = f"B={b} N={n}", b * n
        rows.append(table.rate_row(
            f"rank mlp head, naive vmap form, B={b}, N={n:,}", "pairs/s", "ours, GEMM form (own process)",
            pairs, res["naive"], ours if case in ours.times else None, case,
            note=f"the pairwise application (fast=False), for reference; "
                 f"{res['naive'].processes} processes × {reps} reps",
            limit=table.fraction(pairs * flops_per_pair, None, res["naive"].best(case))))
    return rows


# ---- memory ------------------------------------------------------------------------------------------------


def side_rss(n: int, batches: list[int]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from cbir_jax.scoring import ranking, scorers

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
    return {"times": {}, "info": {"rss": hwm_kib * 1024, "nbytes": g.nbytes}}


def rss_rows(n: int, batches: list[int]) -> list[dict]:
    r = alternate([Side("ours", "benchmarks.ranking:side_rss", {"n": n, "batches": batches}, peer=False)], 1)["ours"]
    rss, nbytes = r.info["rss"], r.info["nbytes"]
    return [table.row(f"peak RSS ranking a {n:,} x {D} float32 gallery (cosine, B={'/'.join(map(str, batches))})",
                      "x gallery bytes", "target", ours=rss / nbytes, peer=1.3,
                      note=f"peak RSS {rss / 2**30:.2f} GiB of a {nbytes / 2**30:.2f} GiB gallery (own process, "
                           f"whole process incl. Python+JAX); lower is better; {os.cpu_count()} cores")]
