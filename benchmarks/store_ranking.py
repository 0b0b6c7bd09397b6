"""Ranking a stored gallery without loading it (issue 18, phase B), against the in-RAM ranking and faiss IVF,
each side in its own fresh process (benchmarks.harness), alternated over rounds.

    python -m benchmarks.store_ranking [--rows 1000000] [--dim 1280] [--batches 3] [--rounds 2] [--out FILE]

A deterministic synthetic index folder (clustered float32 features, `--rows` x `--dim`, from a seed) is
written in a temporary folder and deleted at the end; nothing is committed but the table. Rows:
- streamed: `Index.load(..., memory="stream")`, cosine top-10 of B=256 queries, read from the memory-mapped
  shards chunk by chunk (page cache warm: one untimed batch first, which also compiles);
- in RAM: `Index.load(..., memory="ram")`, the same queries, the gallery loaded and prepared once (untimed);
- peak anonymous RSS (RssAnon) of each side's process over load, warm-up and the timed batches;
- faiss IVF: `Index.to_faiss(FACTORY)` trained on a sample and filled chunk by chunk from the store; its
  recall@10 against the exact ranking and its queries/s at a few `nprobe`.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import ROOT, Side, run_process
from benchmarks.scale import _PeakRss, _load

SEED, CLUSTERS, SHARD_ROWS, B, K = 0, 4000, 4096, 256, 10  # shard_rows: the default (features.shard_rows)


def _rows(first: int, count: int, dim: int, centres: np.ndarray) -> np.ndarray:
    """Rows first..first+count-1 of the synthetic gallery: each near one of the cluster centres."""
    rng = np.random.default_rng([SEED, first])
    which = rng.integers(0, len(centres), count)
    return (centres[which] + 0.6 * rng.standard_normal((count, dim), np.float32)).astype(np.float32)


def make_index(folder: Path, rows: int, dim: int) -> Path:
    """An index folder of `rows` synthetic efficientnet_lite0-shaped features (no images: paths are names)."""
    from cbir_jax.api import store
    from cbir_jax.api.index import _plain
    from cbir_jax.backbones import build_backbone
    from cbir_jax.core.config import BackboneConfig, FeaturesConfig
    from cbir_jax.features.store import Item, write_store

    backbone_cfg = BackboneConfig(name="efficientnet_lite0")
    net = build_backbone(backbone_cfg)
    assert net.feature_dim == dim, f"--dim must be {net.feature_dim} (efficientnet_lite0's)"
    centres = np.random.default_rng(SEED).standard_normal((CLUSTERS, dim), np.float32)
    (folder / "photos").mkdir(parents=True)
    shards = ((_rows(a, min(SHARD_ROWS, rows - a), dim, centres),
               [Item(f"img/{i:07d}.jpg", f"img/{i:07d}.jpg") for i in range(a, min(a + SHARD_ROWS, rows))])
              for a in range(0, rows, SHARD_ROWS))
    path = folder / "gallery.index"
    path.mkdir()
    features = write_store(path / store.FEATURES, shards, fingerprint=net.fingerprint, backbone=net.name, dim=dim,
                           shard_rows=SHARD_ROWS)
    stored = store.Stored(
        features=features, paths=[f"img/{i:07d}.jpg" for i in range(rows)], labels=None, class_names=[],
        root=str(folder / "photos"), backbone=net.name, backbone_fingerprint=net.fingerprint,
        backbone_config=_plain(backbone_cfg), features_config=_plain(FeaturesConfig()), post={"l2": True},
        scorer="cosine", run="", run_select="", skipped=[])
    store.save(stored, path)
    queries = _rows(rows, B, dim, centres)  # new rows of the same distribution (not in the gallery)
    np.save(folder / "queries.npy", queries)
    return path


def side_index(index: str, queries: str, memory: str, batches: int) -> dict[str, Any]:
    """One process: load the index, one untimed batch (compile, page cache, in RAM: load + prepare), then
    `batches` timed batches of B queries, cosine top-10."""
    import cbir_jax
    from cbir_jax.features import postprocess

    with _PeakRss() as rss:
        t0 = time.perf_counter()
        loaded = cbir_jax.Index.load(index, memory=memory, verify=False)
        q = postprocess.apply(loaded.post, np.load(queries))
        _, ids = loaded.rank(q, K)
        warm = time.perf_counter() - t0
        times = []
        for _ in range(batches):
            t = time.perf_counter()
            loaded.rank(q, K)
            times.append(time.perf_counter() - t)
    return {"times": {"batch": times}, "arrays": {"ids": ids},
            "info": {"peak_rss_anon": rss.peak, "warm_s": warm, "rows": len(loaded)}}


def side_faiss(index: str, queries: str, factory: str, nprobes: list[int], train_rows: int) -> dict[str, Any]:
    """One process: build the trained faiss index from the store (timed), then search at each nprobe."""
    import faiss

    import cbir_jax

    loaded = cbir_jax.Index.load(index, memory="stream", verify=False)
    t0 = time.perf_counter()
    ivf = loaded.to_faiss(factory, train_rows=train_rows)
    build = time.perf_counter() - t0
    raw = np.ascontiguousarray(np.load(queries), np.float32)
    inner = faiss.extract_index_ivf(ivf)
    times, arrays = {}, {}
    for nprobe in nprobes:
        inner.nprobe = nprobe
        ivf.search(raw[:8], K)  # warm
        t = time.perf_counter()
        _, ids = ivf.search(raw, K)
        times[f"nprobe{nprobe}"] = [time.perf_counter() - t]
        arrays[f"nprobe{nprobe}"] = ids
    return {"times": times, "arrays": arrays, "info": {"build_s": build, "threads": faiss.omp_get_max_threads()}}


def recall(exact: np.ndarray, approx: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(exact, approx)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--factory", default="IVF1024,PQ64")
    parser.add_argument("--nprobe", default="8,32")
    parser.add_argument("--train-rows", type=int, default=60_000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    need = args.rows * args.dim * 4 * 1.1
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if free < 2 * need:
        raise SystemExit(f"needs {2 * need / 1e9:.1f} GB free in {tempfile.gettempdir()}, has {free / 1e9:.1f}")
    log = []
    with tempfile.TemporaryDirectory(prefix="cbir_store_rank_") as tmp:
        t0 = time.perf_counter()
        index = make_index(Path(tmp), args.rows, args.dim)
        log.append(f"synthetic index: {args.rows} x {args.dim} float32 written in {time.perf_counter() - t0:.0f} s")
        queries = str(Path(tmp) / "queries.npy")
        results: dict[str, list[dict]] = {"stream": [], "ram": []}
        for r in range(args.rounds):
            for memory in ("stream", "ram"):
                log.append(f"{memory} round {r + 1} start, load {_load()}")
                results[memory].append(run_process(Side(memory, "benchmarks.store_ranking:side_index",
                                                         {"index": str(index), "queries": queries, "memory": memory,
                                                          "batches": args.batches}), timeout=3600))
        log.append(f"faiss start, load {_load()}")
        nprobes = [int(x) for x in args.nprobe.split(",")]
        ivf = run_process(Side("faiss", "benchmarks.store_ranking:side_faiss",
                               {"index": str(index), "queries": queries, "factory": args.factory, "nprobes": nprobes,
                                "train_rows": args.train_rows}), timeout=3600)
        log.append(f"faiss end, load {_load()}")
    exact = results["ram"][-1]["arrays"]["ids"]
    same = all(np.array_equal(o["arrays"]["ids"], exact) for o in results["stream"] + results["ram"])

    def qps(outs: list[dict]) -> float:
        return B / float(np.median([t for o in outs for t in o["times"]["batch"]]))

    def rss(outs: list[dict]) -> str:
        return " / ".join(f"{o['info']['peak_rss_anon'] / 2**20:.0f}" for o in outs)

    stream_qps, ram_qps = qps(results["stream"]), qps(results["ram"])
    rows = [
        (f"cosine top-{K}, B={B}, {args.rows:,} x {args.dim} float32 store, page cache warm",
         f"streamed {stream_qps:.1f} q/s · in RAM {ram_qps:.1f} q/s → **{stream_qps / ram_qps:.2f}×**; "
         f"same ids as in RAM: {same}"),
        ("peak RssAnon per process (MiB, each round)",
         f"streamed {rss(results['stream'])} · in RAM {rss(results['ram'])}"),
        ("first batch (load; in RAM: load + prepare; compile)",
         f"streamed {np.median([o['info']['warm_s'] for o in results['stream']]):.1f} s · in RAM "
         f"{np.median([o['info']['warm_s'] for o in results['ram']]):.1f} s"),
    ]
    for nprobe in nprobes:
        seconds = ivf["times"][f"nprobe{nprobe}"][0]
        rows.append((f"faiss {args.factory} (trained on {args.train_rows:,} rows, filled from the store), nprobe={nprobe}",
                     f"recall@10 against exact **{recall(exact, ivf['arrays'][f'nprobe{nprobe}']):.3f}** · "
                     f"{B / seconds:.0f} q/s ({ivf['info']['threads']} threads) vs exact in RAM {ram_qps:.1f} q/s"))
    rows.append((f"faiss {args.factory} build (train + add from the store)", f"{ivf['info']['build_s']:.0f} s"))
    day = datetime.date.today().isoformat()
    text = "\n".join([
        f"# Ranking a stored gallery without loading it, {day}", "",
        "Machine: 2 CPU cores shared with other engineers (load logged below), 24 GiB RAM; no GPU lent to this "
        "session (no GPU row; none simulated). Each side in its own fresh process, alternated over rounds; "
        "medians of the timed batches.", "",
        f"Command: `python -m benchmarks.store_ranking --rows {args.rows} --dim {args.dim} --batches {args.batches} "
        f"--rounds {args.rounds} --factory {args.factory} --nprobe {args.nprobe} --train-rows {args.train_rows}`", "",
        "| row | result |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows], "", "Log:", "",
        *[f"- {line}" for line in log], ""])
    print(text)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"store-ranking-{day}.md"
    out.write_text(text)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
