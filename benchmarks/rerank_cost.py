"""Cost of the learned re-ranker against DBA + α-QE at N = 10k gallery items (experiments: learned_reranking).

    python -m benchmarks.rerank_cost [--n 10000] [--rounds 2]

Both sides at the parameters the study uses (k=50, α=3, qe_k=15, qe_α=1; the learned model dim 64, depth
2), each in its own fresh process, alternating (benchmarks/harness.py). Gallery: N clustered unit vectors
of size 1280 (EfficientNet-Lite0's feature size); queries: 256 other vectors of the same clusters, ranked
in chunks of 16 (the (B, N, k+2) coefficient gathers of DBA + α-QE bound the chunk). Cases:
- `prepare`: the per-gallery work, done once (neighbourhoods; the learned side also runs its transformer
  on every item: once per item; with `--loo` also the (k+1) leave-one-out variants per item that
  evaluation with gallery items as queries needs);
- `query`: scoring 256 external queries against the prepared gallery (time per query reported).
The learned model's parameters are random: its cost does not depend on their values.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from benchmarks.harness import Side, alternate
from benchmarks.timing import times

K, ALPHA, QE_K, QE_ALPHA = 50, 3.0, 15, 1.0
QUERIES, CHUNK = 256, 16


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(n // 70, 2), 1280)).astype(np.float32)
    y = rng.integers(0, len(centres), n + QUERIES)
    x = centres[y] + 0.8 * rng.normal(size=(len(y), 1280)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[:n], x[n:]


def _measure(scorer, n: int, reps: int, loo_prepare=None) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    g, q = _data(n)
    g = jnp.asarray(g)
    score = jax.jit(scorer.score)
    minus_one = jnp.full((CHUNK,), -1, jnp.int32)

    def prepare():
        return jax.block_until_ready(scorer.prepare(g))

    state = prepare()

    def query():
        for start in range(0, QUERIES, CHUNK):
            jax.block_until_ready(score(*state, jnp.asarray(q[start:start + CHUNK]), minus_one))

    out = {"prepare": times(prepare, reps), "query (per query)": [t / QUERIES for t in times(query, reps)]}
    if loo_prepare is not None:
        out["prepare with leave-one-out variants"] = times(lambda: jax.block_until_ready(loo_prepare(g)), 1)
    return {"times": out, "info": {"config": f"JAX {jax.__version__}, k={K}, qe_k={QE_K}"}}


def side_dba(n: int, reps: int) -> dict[str, Any]:
    from cbir_jax.scoring import rerank

    return _measure(rerank.build_reranker("dba_alpha_qe", k=K, alpha=ALPHA, qe_k=QE_K, qe_alpha=QE_ALPHA), n, reps)


def side_learned(n: int, reps: int, loo: bool = False) -> dict[str, Any]:
    import jax

    from cbir_jax.core.config import LearnedRerankConfig
    from cbir_jax.scoring import learned_rerank

    spec = LearnedRerankConfig(k=K, alpha=ALPHA, qe_k=QE_K, qe_alpha=QE_ALPHA)
    model = learned_rerank.build_model(spec)
    params = learned_rerank.init_params(model, spec, jax.random.key(0))
    plain = learned_rerank.learned_scorer(model, params, spec, leave_one_out=False)
    loo_prepare = (lambda g: learned_rerank.prepare_gallery(model, params, spec, g, loo=True)) if loo else None
    return _measure(plain, n, reps, loo_prepare=loo_prepare)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rerank_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--loo", action="store_true", help="also time preparing the leave-one-out variants")
    args = parser.parse_args(argv)
    kwargs = {"n": args.n, "reps": args.reps}
    sides = [Side("learned_rerank", "benchmarks.rerank_cost:side_learned", {**kwargs, "loo": args.loo}, peer=False),
             Side("dba_alpha_qe", "benchmarks.rerank_cost:side_dba", kwargs, peer=False)]
    results = alternate(sides, args.rounds)
    ours, peer = results["learned_rerank"], results["dba_alpha_qe"]
    print(f"N = {args.n:,} gallery items, {QUERIES} queries in chunks of {CHUNK}; best / median over "
          f"{args.rounds} processes per side x {args.reps} repetitions (2-core CPU)\n")
    print("| case | learned_rerank best (median) | dba_alpha_qe best (median) | learned ÷ DBA (best) |")
    print("|---|---|---|---|")
    for case in ours.times:
        mine = f"{ours.best(case) * 1e3:.1f} ms ({ours.median(case) * 1e3:.1f})"
        if case in peer.times:
            theirs = f"{peer.best(case) * 1e3:.1f} ms ({peer.median(case) * 1e3:.1f})"
            print(f"| {case} | {mine} | {theirs} | {ours.best(case) / peer.best(case):.1f}× |")
        else:
            print(f"| {case} | {mine} | — (DBA's leave-one-out costs nothing extra) | |")


if __name__ == "__main__":
    main()
