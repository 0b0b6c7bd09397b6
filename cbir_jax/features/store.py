"""The sharded on-disk feature store: resumable, incremental, multi-process extraction, read chunk by chunk.

Layout of a store folder:
  manifest.json        the merged view readers open: format, backbone fingerprint, dtype, and per shard its
                       rows, SHA-256, items (id, relative path, size, mtime) and skip list
  shards/NNNNNN.npy    (rows, D) features in `features.storage` dtype: plain `.npy`, memory-mappable
  shards/NNNNNN.json   the shard's commit record (its manifest entry), written after its `.npy`
  plan.json            the shards still to extract (present only while a build is unfinished)
  thumbnails/          label-heuristic thumbnails, apart from the features (cbir_jax/features/extract.py)
  store.lock           serialises builders

Why `.npy` shards: `np.load(mmap_mode="r")` maps them with no extra dependency, any tool reads them, and
the byte layout is fixed by the header alone, so a shard's SHA-256 is the same for the same features (a
resumed build is bit-identical to an uninterrupted one). zarr/tensorstore add chunked compression that
float features barely benefit from; safetensors cannot be appended shard by shard any better.

A shard is committed when its `.json` exists and names the SHA-256 of its `.npy` (both written atomically).
A build: (1) under the lock, checks every committed shard (a damaged one is moved aside and its images are
extracted again), drops rows of files that left the folder or changed, and plans the missing images as new
shards (a plan already on disk, from a killed run, is kept as it was, so shard boundaries and names are the
same); (2) each JAX process extracts its share of the planned shards (every `process_count`-th) and commits
each; (3) process 0 merges the manifest and removes the plan.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
from filelock import FileLock
from tqdm.auto import tqdm

from cbir_jax.core import cache
import cbir_jax.core.progress
from cbir_jax.core.errors import UserError
from cbir_jax.core.files import atomic_write, atomic_write_text
from cbir_jax.data.base import ImageDataset
from cbir_jax.data.pipeline import auto_workers, decode_stream
from cbir_jax.features.forward import forward_batches

log = logging.getLogger(__name__)

FORMAT = "cbir_jax.feature_store/1"
STORAGE: dict[str, np.dtype] = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
_NO_FILE = -1  # size and mtime of an image that is not a file (embedded, tfds): matched by id alone


class StoreError(UserError):
    """A feature store that cannot be used as asked (another backbone, damaged manifest, no space); one line."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One image as the store knows it: a changed size or mtime makes it a different image."""

    id: str
    path: Optional[str]  # relative to the data root; None for images that are not files
    size: int = _NO_FILE
    mtime_ns: int = _NO_FILE

    def row(self) -> list:
        return [self.id, self.path, self.size, self.mtime_ns]

    @classmethod
    def of(cls, row: Sequence) -> "Item":
        return cls(str(row[0]), None if row[1] is None else str(row[1]), int(row[2]), int(row[3]))


def dataset_items(dataset: ImageDataset) -> list[Item]:
    """The dataset's images, in its order, with their file size and mtime where they are files."""
    stats = dataset.stats if dataset.stats is not None else [(_NO_FILE, _NO_FILE)] * len(dataset)
    paths = dataset.ids if dataset.stats is not None else [None] * len(dataset)  # a file's id: its relative path
    return [Item(i, p, int(s), int(m)) for i, p, (s, m) in zip(dataset.ids, paths, stats)]


@dataclasses.dataclass
class UpdateReport:
    """What a build did; `python -m cbir_jax.index` on an existing store prints added/removed/kept."""

    added: int  # rows extracted by this run (all processes)
    removed: int  # rows dropped: their file left the folder or changed
    kept: int  # rows that were already in the store and stay
    skipped: list[tuple[str, str]]  # (id, reason): every image the store does not hold, permanent or not
    shards: int  # shards in the store after the run
    written_bytes: int  # shard bytes this process wrote
    seconds: float

    def line(self, images: int) -> str:
        return (f"features: {images} images, {self.shards} shards, {len(self.skipped)} skipped, "
                f"{self.written_bytes / 1e9:.3f} GB written, {self.seconds:.1f} s "
                f"(added {self.added}, removed {self.removed}, kept {self.kept})")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class FeatureStore:
    """Read side of a store (what ranking, search and Index read): rows in manifest order, chunk by chunk.

    Row r of the store is row r of the concatenated shards; `ids[r]` names its image.
    """

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root, self.manifest = root, manifest
        self.shards: list[dict] = manifest["shards"]
        self._offsets = np.cumsum([0] + [s["rows"] for s in self.shards])
        self._maps: dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, path: str | os.PathLike, *, fingerprint: Optional[str] = None) -> "FeatureStore":
        """The store at `path`; StoreError (one line) if it is missing, damaged, or from another backbone."""
        root = Path(os.path.expanduser(path))
        manifest = _read_json(root / "manifest.json")
        if manifest is None or manifest.get("format") != FORMAT:
            raise StoreError(f"{root}: not a finished feature store (no readable manifest.json of {FORMAT}); "
                             "build it again with the same command to resume")
        check_backbone(root, manifest, fingerprint)
        for s in manifest["shards"]:
            if not (root / "shards" / f"{s['name']}.npy").is_file():
                raise StoreError(f"{root}: shard {s['name']} is missing; build the store again to re-extract it")
        return cls(root, manifest)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def items(self) -> list[Item]:
        return [Item.of(r) for s in self.shards for r in s["items"]]

    @property
    def ids(self) -> list[str]:
        return [r[0] for s in self.shards for r in s["items"]]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return [(r[0], r[4]) for s in self.shards for r in s["skipped"] + s.get("unread", [])]

    def shard(self, i: int) -> np.ndarray:
        """Shard i memory-mapped read-only (storage dtype): its pages are read only when touched. Each shard
        is mapped once per store object, so a gallery streamed for every batch of queries is not faulted in
        again each time (its pages are file-backed: the kernel drops them under memory pressure)."""
        if i not in self._maps:
            self._maps[i] = np.load(self.root / "shards" / f"{self.shards[i]['name']}.npy", mmap_mode="r")
        return self._maps[i]

    def features_memmap(self) -> list[np.ndarray]:
        """Every shard memory-mapped, in row order (concatenate only what fits in memory)."""
        return [self.shard(i) for i in range(len(self.shards))]

    def iter_chunks(self, rows: int, dtype=np.float32) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, features[first:first+rows] as `dtype`), across shard boundaries; peak memory ~ one chunk."""
        if rows <= 0:
            raise ValueError(f"rows must be positive, got {rows}")
        buf: list[np.ndarray] = []
        have, first = 0, 0
        for i in range(len(self.shards)):
            m = self.shard(i)
            at = 0
            while at < len(m):
                if not have and at + rows <= len(m) and m.dtype == np.dtype(dtype):  # inside one shard: a view of
                    yield first, m[at : at + rows]  # the mapped file, no copy (its pages are read when used)
                    first, at = first + rows, at + rows
                    continue
                take = min(rows - have, len(m) - at)
                buf.append(np.asarray(m[at : at + take], dtype=dtype))
                have, at = have + take, at + take
                if have == rows:
                    yield first, np.concatenate(buf)
                    first, buf, have = first + rows, [], 0
        if have:
            yield first, np.concatenate(buf)

    def rows(self, positions: Sequence[int], dtype=np.float32) -> np.ndarray:
        """The features of these rows (any order), read from their shards alone."""
        positions = np.asarray(positions, np.int64)
        shard = np.searchsorted(self._offsets, positions, side="right") - 1
        out = np.empty((len(positions), self.dim), dtype)
        for j, (i, r) in enumerate(zip(shard.tolist(), positions.tolist())):
            out[j] = self.shard(i)[r - self._offsets[i]]
        return out

    def features(self, dtype=np.float32) -> np.ndarray:
        """All rows in memory as `dtype` (what the in-memory consumers use)."""
        out = np.empty((len(self), self.dim), dtype)
        for first, chunk in self.iter_chunks(65536, dtype):
            out[first : first + len(chunk)] = chunk
        return out

    def check_shapes(self) -> None:
        """Each shard's `.npy` header agrees with the manifest (rows, dim, dtype): cheap, no feature read; a
        truncated or swapped shard is one line here instead of a wrong ranking later."""
        for i, s in enumerate(self.shards):
            try:
                m = self.shard(i)
            except (OSError, ValueError) as e:  # a truncated .npy: np.load's own complaint, one line
                raise StoreError(f"{self.root}: shard {s['name']} is unreadable ({str(e).splitlines()[0][:80]}); "
                                 "build the store again to re-extract it") from None
            if m.shape != (s["rows"], self.dim) or m.dtype != self.dtype:
                raise StoreError(f"{self.root}: shard {s['name']} holds {m.shape} {m.dtype}, not "
                                 f"({s['rows']}, {self.dim}) {self.dtype}; build the store again")

    def verify(self) -> list[str]:
        """Names of shards whose bytes do not match their manifest SHA-256 (reads every shard)."""
        return [s["name"] for s in self.shards if _sha256_file(self.root / "shards" / f"{s['name']}.npy") != s["sha256"]]


def check_backbone(root: Path, header: dict, fingerprint: Optional[str]) -> None:
    if fingerprint is not None and header.get("fingerprint") != fingerprint:
        raise StoreError(
            f"{root}: this feature store was built by backbone {header.get('backbone')!r} "
            f"({str(header.get('fingerprint'))[:60]}), not the configured one; use that backbone or another "
            "features.store folder")


def _read_json(path: Path) -> Optional[dict]:
    """The JSON object in `path`, None if there is none; a damaged file is moved aside (cache rules)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        return data
    except ValueError as e:  # json.JSONDecodeError is a ValueError: only the parse of this file is caught
        cache.move_aside(path, f"unreadable JSON: {str(e)[:60]}")
        return None


# ---------------------------------------------------------------------------------------------------- build


@dataclasses.dataclass
class _Plan:
    name: str
    items: list[list]  # Item rows, in dataset order


class _Store:
    """Write side: shard files, commit records, plan and manifest of one store folder."""

    def __init__(self, root: Path, header: dict) -> None:
        self.root, self.header = root, header
        self.shard_dir = root / "shards"

    def npy(self, name: str) -> Path:
        return self.shard_dir / f"{name}.npy"

    def record_path(self, name: str) -> Path:
        return self.shard_dir / f"{name}.json"

    def committed(self, verify: bool) -> dict[str, dict]:
        """Commit records of sound shards; a damaged shard (or record) is moved aside, one line each."""
        out = {}
        for rec_path in sorted(self.shard_dir.glob("*.json")):
            rec = _read_json(rec_path)
            if rec is None:
                continue
            name, npy = rec.get("name"), self.npy(str(rec.get("name")))
            problem = None
            if rec.get("format") == FORMAT:  # another backbone's or dtype's store is refused, never moved aside
                check_backbone(self.root, rec, self.header["fingerprint"])
                if rec.get("dtype") != self.header["dtype"]:
                    raise StoreError(f"{self.root}: this store holds {rec.get('dtype')} features, not "
                                     f"features.storage={self.header['dtype']}; use another features.store folder")
            if rec.get("format") != FORMAT:
                problem = f"format {rec.get('format')}, expected {FORMAT}"
            elif not npy.is_file():
                problem = "its .npy is missing"
            elif verify and _sha256_file(npy) != rec["sha256"]:
                problem = "SHA-256 mismatch (corrupted or partly written)"
            if problem:
                main, others = (npy, (rec_path,)) if npy.exists() else (rec_path, ())
                cache.move_aside(main, f"shard {name}: {problem}", companions=others)
                continue
            out[name] = rec
        return out

    def write_shard(self, name: str, features: np.ndarray, items: list[list], skipped: list[list],
                    unread: list[list]) -> tuple[dict, int]:
        """Commits one shard: its `.npy`, then its record (the commit). A full disk is one clear line."""
        arr = np.ascontiguousarray(features.astype(self.header["dtype"]))
        try:
            atomic_write(self.npy(name), lambda f: np.save(f, arr, allow_pickle=False))
            rec = {"format": FORMAT, "name": name, "rows": len(arr), "sha256": _sha256_file(self.npy(name)),
                   "fingerprint": self.header["fingerprint"], "backbone": self.header["backbone"],
                   "dtype": self.header["dtype"],
                   "dim": int(arr.shape[1]), "items": items, "skipped": skipped, "unread": unread}
            atomic_write_text(self.record_path(name), json.dumps(rec, sort_keys=True))
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise StoreError(f"{e.filename or self.root}: {e.strerror}; the shards committed before it are "
                                 "intact: free space and run the same command again to resume") from None
            raise
        return rec, self.npy(name).stat().st_size

    def remove_rows(self, rec: dict, keep_rows: np.ndarray, keep_skips: list[list]) -> Optional[dict]:
        """Rewrites a shard without the rows of files that left (a copy, no forward pass); None if emptied."""
        name = rec["name"]
        if len(keep_rows) == 0 and not keep_skips:
            for p in (self.record_path(name), self.npy(name)):
                p.unlink(missing_ok=True)
            return None
        arr = np.load(self.npy(name))[keep_rows]
        new, _ = self.write_shard(name, arr, [rec["items"][i] for i in keep_rows], keep_skips, [])
        return new

    def write_manifest(self, records: list[dict]) -> None:
        manifest = {**self.header, "format": FORMAT,
                    "shards": [{k: r[k] for k in ("name", "rows", "sha256", "items", "skipped", "unread")}
                               for r in records]}
        atomic_write_text(self.root / "manifest.json", json.dumps(manifest, sort_keys=True))


def _next_name(names: Sequence[str]) -> Callable[[], str]:
    counter = [max((int(n) for n in names), default=-1)]

    def next_name() -> str:
        counter[0] += 1
        return f"{counter[0]:06d}"

    return next_name


def _header(fingerprint: str, backbone: str, dim: int, storage: str, shard_rows: int) -> dict:
    return {"format": FORMAT, "fingerprint": fingerprint, "backbone": backbone, "dim": int(dim),
            "dtype": STORAGE[storage].name, "shard_rows": int(shard_rows)}


def write_store(
    path: str | os.PathLike,
    shards: Iterable[tuple[np.ndarray, Sequence[Item]]],
    *,
    fingerprint: str,
    backbone: str,
    dim: int,
    storage: str = "float32",
    shard_rows: int = 4096,
    skipped: Sequence[tuple[Item, str]] = (),
) -> "FeatureStore":
    """A new store at `path` (which must not hold one) from features already computed, one (rows, items)
    pair per shard: how an in-memory `Index` is saved, and how a store is copied without the images."""
    root = Path(os.path.expanduser(path))
    if (root / "manifest.json").exists() or (root / "shards").exists():
        raise StoreError(f"{root}: already holds a feature store; write a new one elsewhere")
    store = _Store(root, _header(fingerprint, backbone, dim, storage, shard_rows))
    store.shard_dir.mkdir(parents=True, exist_ok=True)
    next_name = _next_name([])
    records = []
    with FileLock(str(root / "store.lock")):
        for features, items in shards:
            if len(items):
                records.append(store.write_shard(next_name(), np.asarray(features), [it.row() for it in items], [], [])[0])
        if skipped:  # files that were never read: kept with the store, so an update knows them
            rows = [[*it.row(), reason] for it, reason in skipped]
            if records:
                records[-1]["skipped"] = rows
                atomic_write_text(store.record_path(records[-1]["name"]), json.dumps(records[-1], sort_keys=True))
            else:
                records.append(store.write_shard(next_name(), np.zeros((0, dim), np.float32), [], rows, [])[0])
        store.write_manifest(records)
    return FeatureStore.open(root, fingerprint=fingerprint)


def remove_rows(path: str | os.PathLike, rows: np.ndarray) -> "FeatureStore":
    """The store at `path` without these rows (positions in row order): each shard that holds one is
    rewritten (a copy, no forward pass), the others are untouched; under the builders' lock."""
    root = Path(os.path.expanduser(path))
    with FileLock(str(root / "store.lock")):
        current = FeatureStore.open(root)
        store = _Store(root, {k: current.manifest[k] for k in ("format", "fingerprint", "backbone", "dim", "dtype",
                                                                 "shard_rows")})
        drop = np.unique(np.asarray(rows, np.int64))
        records = []
        for i, shard in enumerate(current.shards):
            first, last = current._offsets[i], current._offsets[i + 1]
            mine = drop[(drop >= first) & (drop < last)] - first
            rec = _read_json(store.record_path(shard["name"]))
            if rec is None:
                raise StoreError(f"{root}: the commit record of shard {shard['name']} is missing; build the store again")
            if len(mine):
                keep = np.setdiff1d(np.arange(shard["rows"]), mine)
                rec = store.remove_rows(rec, keep, rec["skipped"])
            if rec is not None:
                records.append(rec)
        store.write_manifest(records)
    return FeatureStore.open(root)


def build_store(
    path: str | os.PathLike,
    dataset: ImageDataset,
    backbone,
    *,
    storage: str = "float32",
    shard_rows: int = 4096,
    batch_size: int = 32,
    workers: Optional[int] = None,
    decode_timeout_s: float = 60.0,
    process_index: int = 0,
    process_count: int = 1,
    barrier: Optional[Callable[[str], None]] = None,
    verify: bool = True,
    progress: bool = True,
) -> UpdateReport:
    """Brings the store at `path` up to date with `dataset`: extracts only images it lacks, drops the rows
    of images that are gone, resumes a killed build; returns what it added, removed and kept.

    Multi-process: every process calls this with its `process_index` and a `barrier(name)` that all
    processes pass together (`jax_barrier`); each extracts every `process_count`-th planned shard.
    """
    if storage not in STORAGE:
        raise StoreError(f"features.storage={storage}: valid: {', '.join(STORAGE)}")
    if shard_rows <= 0:
        raise StoreError(f"features.shard_rows={shard_rows}: must be positive")
    t0 = time.time()
    root = Path(os.path.expanduser(path))
    store = _Store(root, _header(backbone.fingerprint, backbone.name, backbone.feature_dim, storage, shard_rows))
    items = dataset_items(dataset)
    index_of = {it: i for i, it in enumerate(items)}
    lock = None
    sync = barrier or (lambda name: None)
    if process_index == 0:
        store.shard_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(root / "store.lock"))
        lock.acquire()
    try:
        if process_index == 0:
            removed, kept = _prepare(store, items, index_of, shard_rows, verify)
        sync("cbir_jax-store-planned")
        plan = _read_json(root / "plan.json") or {"shards": []}
        if process_index != 0:
            removed, kept = plan["removed"], plan["kept"]
        planned = [_Plan(s["name"], s["items"]) for s in plan["shards"]]
        mine = planned[process_index::process_count]
        if process_count == 1:  # one bar over the whole store: a resumed run starts where the killed one stopped
            initial, total, desc = kept, kept + sum(len(p.items) for p in planned), backbone.name
        else:  # each process's bar counts its own share
            initial, total = 0, sum(len(p.items) for p in mine)
            desc = f"{backbone.name}, process {process_index}/{process_count}"
        written = _extract_shards(store, mine, dataset, index_of, backbone, batch_size, workers, decode_timeout_s,
                                  progress, initial=initial, total=total, desc=desc)
        sync("cbir_jax-store-extracted")
        records = store.committed(verify=False)
        if process_index == 0:
            missing = [p.name for p in planned if p.name not in records]
            if missing:  # a process failed without the barrier noticing: never publish a partial manifest
                raise StoreError(f"{root}: shards {', '.join(missing[:5])} were not written; run again to resume")
            ordered = [records[n] for n in sorted(records)]
            store.write_manifest(ordered)
            (root / "plan.json").unlink(missing_ok=True)
        sync("cbir_jax-store-merged")
    finally:
        if lock is not None:
            lock.release()
    manifest = _read_json(root / "manifest.json")
    shards = manifest["shards"] if manifest else []
    skipped = [(r[0], r[4]) for s in shards for r in s["skipped"] + s["unread"]]
    added = sum(s["rows"] for s in shards) - kept
    report = UpdateReport(added=added, removed=removed, kept=kept, skipped=skipped, shards=len(shards),
                          written_bytes=written, seconds=time.time() - t0)
    log.info("%s", report.line(sum(s["rows"] for s in shards)))
    return report


def _prepare(store: _Store, items: list[Item], index_of: dict, shard_rows: int, verify: bool) -> tuple[int, int]:
    """Under the lock: checks the store, drops gone rows, writes the plan. Returns (removed, kept) rows."""
    root = store.root
    for tmp in store.shard_dir.glob(".*.tmp"):  # a write cut short by a kill; under the lock, nobody else's
        tmp.unlink(missing_ok=True)
    existing = _read_json(root / "manifest.json")
    if existing is not None:
        check_backbone(root, existing, store.header["fingerprint"])
        if existing.get("dtype") != store.header["dtype"]:
            raise StoreError(f"{root}: this store holds {existing.get('dtype')} features, not "
                             f"features.storage={store.header['dtype']}; use another features.store folder")
    records = store.committed(verify)
    present = set(index_of)
    covered: set[Item] = set()
    removed = kept = 0
    for name, rec in sorted(records.items()):
        rows = [Item.of(r) for r in rec["items"]]
        keep_rows = np.asarray([i for i, it in enumerate(rows) if it in present], np.int64)
        keep_skips = [s for s in rec["skipped"] if Item.of(s) in present]
        if len(keep_rows) < len(rows) or rec["unread"] or len(keep_skips) < len(rec["skipped"]):
            removed += len(rows) - len(keep_rows)
            store.remove_rows(rec, keep_rows, keep_skips)
        kept += len(keep_rows)
        covered.update(rows[i] for i in keep_rows)
        covered.update(Item.of(s) for s in keep_skips)
    old_plan = _read_json(root / "plan.json") or {"shards": []}
    planned = []
    for s in old_plan.get("shards", []):  # a killed run's plan: same boundaries and names, if still valid
        its = [Item.of(r) for r in s["items"]]
        if s["name"] not in records and all(it in present and it not in covered for it in its):
            planned.append(s)
            covered.update(its)
    pending = [it for it in items if it not in covered]
    next_name = _next_name([*records, *(s["name"] for s in old_plan.get("shards", []))])
    for start in range(0, len(pending), shard_rows):
        planned.append({"name": next_name(), "items": [it.row() for it in pending[start : start + shard_rows]]})
    atomic_write_text(root / "plan.json", json.dumps({"shards": planned, "removed": removed, "kept": kept}))
    if removed:
        log.info("features: %d rows of files that left or changed removed from %s", removed, root)
    return removed, kept


def _extract_shards(store: _Store, shards: list[_Plan], dataset: ImageDataset, index_of: dict, backbone,
                    batch_size: int, workers: Optional[int], timeout_s: float, progress: bool, *,
                    initial: int, total: int, desc: str) -> int:
    """Decodes this process's planned shards in one stream (workers prefetch across shard boundaries),
    forwards each shard in fixed batches, and commits it. Returns the bytes written."""
    indices = [index_of[Item.of(r)] for p in shards for r in p.items]
    n_workers = auto_workers(len(indices), workers)
    stream = decode_stream(indices, backbone.preprocess, load=dataset.load, paths=dataset.paths,
                           workers=n_workers, timeout_s=timeout_s, prefetch=2 * batch_size)
    bar = (cbir_jax.core.progress.progress(total=total, initial=initial, desc=f"features ({desc})", unit="img", mininterval=2.0) if progress
           else tqdm(total=total, disable=True))  # a bar on a terminal, plain lines in a log file (core/progress.py)
    written = 0
    try:
        for plan in shards:
            rows, skipped, unread = [], [], []

            def decoded(plan: _Plan = plan) -> Iterator[np.ndarray]:
                """The shard's images as they arrive: only a batch (and the prefetch buffers) in memory."""
                for row in plan.items:
                    d = next(stream)
                    bar.update(1)
                    if d.error:
                        log.warning("skipped %s: %s", row[0], d.error)
                        (unread if d.transient else skipped).append([*row, d.error])
                        continue
                    rows.append(row)
                    yield d.array

            feats = forward_batches(backbone, decoded(), batch_size, preprocessed=True)
            _, size = store.write_shard(plan.name, feats, rows, skipped, unread)
            written += size
    finally:
        bar.close()
        stream.close()
    return written


def jax_barrier(timeout_s: float = 600.0) -> Callable[[str], None]:
    """A barrier over the processes of `jax.distributed.initialize()`; one that does not arrive within
    `timeout_s` (it died) makes every other process fail with an error instead of waiting forever."""
    import jax
    from jax._src import distributed

    if jax.process_count() == 1:
        return lambda name: None

    def barrier(name: str) -> None:
        try:
            distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))
        except Exception as e:  # noqa: BLE001  the coordination service reports a missing peer many ways
            raise StoreError(f"multi-host extraction: a process did not reach {name} within {timeout_s:g} s "
                             f"({str(e).splitlines()[0][:120]}); shards committed so far are kept: run again "
                             "to resume") from None

    return barrier
