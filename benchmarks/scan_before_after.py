"""An older scan against this checkout's, in one process, calls alternating:
`python -m benchmarks.scan_before_after --checkout DIR --n 10000 --reps 10 --metrics cosine,L2`.

DIR is another checkout (e.g. `git worktree add --detach DIR da4cbc6`); its `cbir_jax/scoring/ranking.py` and
`scorers.py` are loaded by path beside this checkout's, both rank the same device-resident gallery, and each
repetition calls before then after, so load drift on a shared machine falls on both. Prints queries/s (best
and median) and the least process CPU time per call (which a busy machine inflates less than wall time),
and whether both return the same indices."""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkout", type=Path, required=True)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--metrics", default="cosine,L2")
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.ranking import BATCHES, K, _ours_data
    from cbir_jax.scoring import ranking, scorers

    old_scorers = _load(args.checkout / "cbir_jax/scoring/scorers.py", "before_scorers")
    old_ranking = _load(args.checkout / "cbir_jax/scoring/ranking.py", "before_ranking")
    g, q_all = _ours_data(args.n, max(BATCHES), seed=args.n)
    gallery = jax.device_put(g)
    for metric in args.metrics.split(","):
        name = {"cosine": "cosine", "L2": "euclid"}[metric]
        before, after = old_scorers.fixed_scorer(name), scorers.fixed_scorer(name)
        before_state, after_state = before.prepare(gallery), after.prepare(gallery)
        for b in BATCHES:
            q = jnp.asarray(q_all[:b])
            calls = {"before": lambda: old_ranking.top_k(before, before_state, q, k=K),
                     "after": lambda: ranking.top_k(after, after_state, q, k=K)}
            first = {side: jax.block_until_ready(f()) for side, f in calls.items()}
            wall = {side: [] for side in calls}
            cpu = {side: [] for side in calls}
            for _ in range(args.reps):
                for side, f in calls.items():
                    t, c = time.perf_counter(), time.process_time()
                    jax.block_until_ready(f())
                    wall[side].append(time.perf_counter() - t)
                    cpu[side].append(time.process_time() - c)
            row = {side: {"q/s best": round(b / min(wall[side]), 1), "q/s median": round(b / statistics.median(wall[side]), 1),
                          "cpu ms min": round(min(cpu[side]) * 1e3, 2)} for side in calls}
            row["same indices"] = bool((np.asarray(first["before"][1]) == np.asarray(first["after"][1])).all())
            print(f"{metric} N={args.n} B={b}", json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
