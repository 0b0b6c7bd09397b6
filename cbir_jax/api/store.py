"""The persistent index on disk (format `cbir_jax.index`, version 2): one folder, its features a feature store.

```
photos.index/
  index.json          the header (below), written last: an index without one is not finished
  labels.npy          int32 (N,): class (sub-folder) of each row, -1 for none; only for a folder with classes
  post.mean.npy       float32 (D,)    } the fitted PCA / PCA-whitening (`features.whiten`), when there is one
  post.projection.npy float32 (D, d)  }
  features/           the raw backbone features: a feature store (`cbir_jax/features/store.py`): fixed-size
                      `.npy` shards, memory-mapped and ranked chunk by chunk, never loaded whole
```

Why the feature store: the gallery is ranked without loading it (`Index.load(..., memory="stream")`), it is
updated in place (`python -m cbir_jax.index` on an existing index extracts only new files and drops deleted
ones; `Index.add` and `Index.remove` rewrite only the shards they touch), and it is the format extraction
writes, so an index of a million images is built, resumed and spread over machines as any store is.

Row r is store row r: its file is the store item's path (relative to `root`, POSIX `/`), its id is r.

Header (`index.json`): `format`, `format_version`, `cbir_jax_version`; `root`, the indexed folder relative to
the folder that holds the index (folder and index move together); `backbone`, `backbone_fingerprint`,
`backbone_config`; `features_config` and `post_l2`; `scorer`; `run` and `run_select`, the training run a
learned scorer comes from (relative like `root`) and its checkpoint, both empty for a fixed scorer;
`class_names`; `skipped` ([file, reason] not indexed); `arrays` (each `.npy` file's SHA-256), `features` (a
SHA-256 over the store's shard names, rows and shard SHA-256s); `sha256`, over all of the header's other
fields. So a changed header field, array or shard is "damaged", never a silently different index.

A header from elsewhere is not trusted: every field is type-checked, paths must stay under `root` (no
absolute path, no `..`), an index of zero rows or with non-finite arrays is refused, and a `root` outside the
index's own folder is used only when the caller passes `root=` (`Index.load`), so a shared index cannot
make `serve` read files the user did not point it at.

Version 1 (one safetensors file of every array, written by cbir_jax before 2026-12) still loads, into memory
and with the same checks; `Index.load("old.index").save("new.index")` converts it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Union

import numpy as np

from cbir_jax.core.cache import digest
from cbir_jax.core.errors import UserError
from cbir_jax.core.files import atomic_write, atomic_write_text, replace_folder, temporary_folder
from cbir_jax.features.store import FeatureStore, Item, StoreError, write_store

log = logging.getLogger(__name__)

FORMAT = "cbir_jax.index"
FORMAT_VERSION = 2
HEADER = "index.json"
FEATURES = "features"
_NO_FILE = -1


class IndexFileError(UserError):
    """A file that is not a usable index: damaged, written by a newer cbir_jax, or for another backbone."""


@dataclasses.dataclass
class Stored:
    """What an index holds, as plain arrays and values (no backbone or scorer built). `features` is the raw
    gallery in memory (N, D), or the feature store it is read from chunk by chunk."""

    features: Union[np.ndarray, FeatureStore]
    paths: list[str]  # relative to `root`, POSIX separators
    labels: Optional[np.ndarray]  # (N,) int32, -1 for none; None for an unlabelled folder
    class_names: list[str]
    root: str  # relative to the index's folder (on disk); absolute in memory
    backbone: str
    backbone_fingerprint: str
    backbone_config: dict[str, Any]
    features_config: dict[str, Any]
    post: dict[str, Any]  # postprocess.fit's parameters
    scorer: str
    run: str  # "" for a fixed scorer
    run_select: str  # which of the run's checkpoints: best | last ("" for a fixed scorer)
    skipped: list[tuple[str, str]]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return int(self.features.dim if isinstance(self.features, FeatureStore) else self.features.shape[1])


# Every header field and the check its value must pass (a crafted header is one line, never a traceback).
def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


_FIELDS: dict[str, tuple[str, Any]] = {
    "root": ("a string", lambda v: isinstance(v, str)),
    "backbone": ("a string", lambda v: isinstance(v, str) and v != ""),
    "backbone_fingerprint": ("a string", lambda v: isinstance(v, str) and v != ""),
    "backbone_config": ("an object", lambda v: isinstance(v, dict)),
    "features_config": ("an object", lambda v: isinstance(v, dict)),
    "post_l2": ("true or false", lambda v: isinstance(v, bool)),
    "scorer": ("a string", lambda v: isinstance(v, str) and v != ""),
    "run": ("a string", lambda v: isinstance(v, str)),
    "run_select": ("'', 'best' or 'last'", lambda v: v in ("", "best", "last")),
    "class_names": ("a list of strings", _is_str_list),
    "skipped": ("a list of [file, reason]", lambda v: isinstance(v, list) and all(_is_str_list(x) and len(x) == 2 for x in v)),
}
_V2_FIELDS: dict[str, tuple[str, Any]] = {
    "arrays": ("an object of SHA-256s", lambda v: isinstance(v, dict) and set(v) <= {"labels", "post.mean", "post.projection"}
               and all(isinstance(x, str) for x in v.values())),
    "features": ("a SHA-256", lambda v: isinstance(v, str)),
    "sha256": ("a SHA-256", lambda v: isinstance(v, str)),
}


def _check_fields(path: Path, header: dict[str, Any], fields: dict[str, tuple[str, Any]]) -> None:
    missing = [k for k in fields if k not in header]
    if missing:
        raise IndexFileError(f"index={path}: damaged header (missing {', '.join(missing)})")
    for key, (what, ok) in fields.items():
        if not ok(header[key]):
            raise IndexFileError(f"index={path}: damaged header ({key} must be {what}, not {header[key]!r:.60})")


def _check_paths(path: Path, paths: list[str]) -> None:
    """Each row's file stays under the root: no absolute path, no `..`, nothing empty."""
    for p in paths:
        parts = PurePosixPath(p).parts
        if not p or p.startswith("/") or "\x00" in p or ".." in parts:
            raise IndexFileError(f"index={path}: damaged (the row path {p!r:.80} leaves the indexed folder)")


def _relative_to(target: str | os.PathLike, start: Path) -> str:
    return Path(os.path.relpath(os.path.abspath(target), os.path.abspath(start))).as_posix()


def _features_digest(store: FeatureStore) -> str:
    return hashlib.sha256(json.dumps([[s["name"], s["rows"], s["sha256"]] for s in store.shards]).encode()).hexdigest()


def _header_digest(header: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True).encode()).hexdigest()


def _arrays(stored: Stored) -> dict[str, np.ndarray]:
    arrays = {}
    if stored.labels is not None:
        arrays["labels"] = np.ascontiguousarray(stored.labels, np.int32)
    for key in ("mean", "projection"):
        if key in stored.post:
            arrays[f"post.{key}"] = np.ascontiguousarray(stored.post[key], np.float32)
    return arrays


def _items(stored: Stored) -> list[Item]:
    """Each row as the store knows it: a file's size and mtime now, so an update sees later changes."""
    out = []
    for p in stored.paths:
        try:
            st = os.stat(os.path.join(stored.root, p))
            out.append(Item(p, p, int(st.st_size), int(st.st_mtime_ns)))
        except OSError:  # gone since it was indexed: matched by name alone
            out.append(Item(p, p))
    return out


def is_index_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / HEADER).is_file()


def save(stored: Stored, path: str | os.PathLike, *, storage: str = "float32", shard_rows: int = 4096) -> Path:
    """Writes `stored` as the index folder `path` (a reader never sees half of one); `root` and `run` are
    made relative to the folder that holds it. An index read from `path`'s own feature store only has its
    header and arrays rewritten; any other is written whole beside `path`, then put in its place."""
    path = Path(os.path.expanduser(path))
    if isinstance(stored.features, FeatureStore) and stored.features.root.resolve() == (path / FEATURES).resolve():
        _write_header(stored, path, stored.features)
        return path
    if path.exists() and not (path.is_file() or is_index_folder(path) or (path.is_dir() and not any(path.iterdir()))):
        raise IndexFileError(f"index={path}: exists and is not an index; choose another name")
    tmp = temporary_folder(path)
    if isinstance(stored.features, FeatureStore):  # copied shard by shard, with its items
        src = stored.features
        shards = ((src.shard(i), [Item.of(r) for r in s["items"]]) for i, s in enumerate(src.shards))
        dtype = str(src.dtype)
    else:
        items, x = _items(stored), np.asarray(stored.features, np.float32)
        shards = ((x[a:a + shard_rows], items[a:a + shard_rows]) for a in range(0, len(items), shard_rows))
        dtype = storage
    skipped = [(Item(f, f), reason) for f, reason in stored.skipped]
    features = write_store(tmp / FEATURES, shards, fingerprint=stored.backbone_fingerprint, backbone=stored.backbone,
                           dim=stored.dim, storage=dtype, shard_rows=shard_rows, skipped=skipped)
    _write_header(stored, tmp, features, relative_to=path.absolute().parent)
    return replace_folder(tmp, path)


def _write_header(stored: Stored, folder: Path, features: FeatureStore, relative_to: Optional[Path] = None) -> None:
    from cbir_jax import __version__

    here = relative_to or folder.absolute().parent
    arrays = _arrays(stored)
    for name in ("labels", "post.mean", "post.projection"):
        if name in arrays:
            atomic_write(folder / f"{name}.npy", lambda f, a=arrays[name]: np.save(f, a, allow_pickle=False))
        else:
            (folder / f"{name}.npy").unlink(missing_ok=True)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "cbir_jax_version": __version__,
        "root": _relative_to(stored.root, here),
        "backbone": stored.backbone,
        "backbone_fingerprint": stored.backbone_fingerprint,
        "backbone_config": stored.backbone_config,
        "features_config": stored.features_config,
        "post_l2": bool(stored.post["l2"]),
        "scorer": stored.scorer,
        "run": _relative_to(stored.run, here) if stored.run else "",
        "run_select": stored.run_select,
        "class_names": list(stored.class_names),
        "skipped": [list(s) for s in stored.skipped],
        "arrays": {name: digest({name: a}) for name, a in arrays.items()},
        "features": _features_digest(features),
    }
    header["sha256"] = _header_digest(header)
    atomic_write_text(folder / HEADER, json.dumps(header, indent=1))  # last: the commit


VERIFY_BYTES = 1 << 30  # load(verify=None): shards are re-hashed and checked finite up to this size


def load(path: str | os.PathLike, *, verify: Optional[bool] = None) -> Stored:
    """Reads an index (a version-2 folder, or a version-1 file); anything but a complete index of a format
    this version knows is a one-line `IndexFileError`. `root` and `run` come back absolute; the features
    stay on disk (a `FeatureStore`) for a folder, in memory for a version-1 file.

    `verify`: re-hash every shard and check its features are finite (reads them all); default: when the
    features are under 1 GiB. A larger index is checked cheaply (header, hashes of the shard list, shard
    shapes), and each chunk is checked finite as it is ranked."""
    path = Path(os.path.expanduser(path))
    if path.is_file():
        return _load_v1(path)
    if not path.is_dir():
        raise IndexFileError(f"index={path}: no such index")
    try:
        header = json.loads((path / HEADER).read_text())
    except FileNotFoundError:
        raise IndexFileError(f"index={path}: not an index (no {HEADER}; an unfinished write leaves none)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFileError(f"index={path}: damaged header ({HEADER}: {type(e).__name__})") from None
    if not isinstance(header, dict):
        raise IndexFileError(f"index={path}: damaged header ({HEADER} is not an object)")
    _check_version(path, header.get("format"), header.get("format_version"), header.get("cbir_jax_version"))
    _check_fields(path, header, {**_FIELDS, **_V2_FIELDS})
    if _header_digest(header) != header["sha256"]:
        raise IndexFileError(f"index={path}: damaged (its header does not match its SHA-256)")
    arrays = {}
    for name, sha in header["arrays"].items():
        try:
            arrays[name] = np.load(path / f"{name}.npy", allow_pickle=False)
        except (OSError, ValueError) as e:  # missing, truncated, or not an .npy: only this file's read is caught
            raise IndexFileError(f"index={path}: damaged ({name}.npy: {str(e).splitlines()[0][:80]})") from None
        if digest({name: arrays[name]}) != sha:
            raise IndexFileError(f"index={path}: damaged ({name}.npy does not match its SHA-256)")
    try:
        features = FeatureStore.open(path / FEATURES, fingerprint=header["backbone_fingerprint"])
        features.check_shapes()
    except StoreError as e:
        raise IndexFileError(f"index={path}: damaged features ({e})") from None
    if _features_digest(features) != header["features"]:
        raise IndexFileError(f"index={path}: damaged (its feature shards are not the ones its header names)")
    if verify or (verify is None and len(features) * features.dim * features.dtype.itemsize <= VERIFY_BYTES):
        damaged = features.verify()
        if damaged:
            raise IndexFileError(f"index={path}: damaged (shards {', '.join(damaged[:5])} do not match their SHA-256)")
        if not all(np.all(np.isfinite(chunk)) for _, chunk in features.iter_chunks(65536, features.dtype)):
            raise IndexFileError(f"index={path}: damaged (non-finite features)")
    # the manifest's own strings, not copies: a million paths are held once
    paths = [r[1] if r[1] is not None else r[0] for s in features.shards for r in s["items"]]
    return _stored(path, header, features, paths, arrays)


def _stored(path: Path, header: dict[str, Any], features: Any, paths: list[str], arrays: dict[str, np.ndarray]) -> Stored:
    """A checked `Stored` from a header's typed fields (either version); `root` and `run` made absolute."""
    here = path.absolute().parent
    stored = Stored(
        features=features, paths=paths, labels=arrays.get("labels"), class_names=list(header["class_names"]),
        root=os.path.normpath(here / header["root"]), backbone=header["backbone"],
        backbone_fingerprint=header["backbone_fingerprint"], backbone_config=header["backbone_config"],
        features_config=header["features_config"], post=_post(header["post_l2"], arrays), scorer=header["scorer"],
        run=os.path.normpath(here / header["run"]) if header["run"] else "", run_select=header["run_select"],
        skipped=[(a, b) for a, b in header["skipped"]],
    )
    _check_contents(path, stored)
    return stored


def _post(l2: bool, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    post: dict[str, Any] = {"l2": bool(l2)}
    for key in ("mean", "projection"):
        if f"post.{key}" in arrays:
            post[key] = arrays[f"post.{key}"]
    return post


def _check_version(path: Path, fmt: Any, version: Any, writer: Any) -> None:
    if fmt != FORMAT:
        raise IndexFileError(f"index={path}: not a cbir_jax index (no format={FORMAT})")
    if isinstance(version, str) and version.isdigit():
        version = int(version)
    if isinstance(version, bool) or not isinstance(version, int):
        raise IndexFileError(f"index={path}: damaged header (format_version={version!r:.40})")
    if version > FORMAT_VERSION:
        raise IndexFileError(
            f"index={path}: written in index format {version} by cbir_jax {writer}; this cbir_jax reads format "
            f"{FORMAT_VERSION} and older: upgrade cbir_jax"
        )


def _check_contents(path: Path, stored: Stored) -> None:
    """What every loaded index must satisfy, whatever its version (safe to index into, finite, not empty)."""
    def bad(why: str) -> IndexFileError:
        return IndexFileError(f"index={path}: damaged ({why})")

    n, d = len(stored), stored.dim
    if n == 0:
        raise IndexFileError(f"index={path}: holds no images; build it from a folder with at least one image")
    _check_paths(path, stored.paths)
    labels = stored.labels
    if labels is not None and (labels.dtype != np.int32 or labels.shape != (n,) or np.any(labels < -1)
                               or np.any(labels >= len(stored.class_names))):
        raise bad("labels do not match the rows or the class names")
    post = stored.post
    if ("mean" in post) != ("projection" in post):
        raise bad("half of the fitted whitening")
    if "mean" in post:
        mean, proj = post["mean"], post["projection"]
        if (mean.dtype != np.float32 or proj.dtype != np.float32 or mean.shape != (d,) or proj.ndim != 2
                or proj.shape[0] != d or proj.shape[1] == 0):
            raise bad("whitening does not match the features")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(proj))):
            raise bad("non-finite whitening")


# ---------------------------------------------------------------------------------------------- version 1


def _decode_paths(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    data = blob.tobytes()
    return [data[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def _load_v1(path: Path) -> Stored:
    """A version-1 index file (one safetensors file), into memory; `save` writes it as a version-2 folder."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            _check_version(path, metadata.get("format"), metadata.get("format_version", ""), metadata.get("cbir_jax_version"))
            if "sha256" not in metadata:
                raise IndexFileError(f"index={path}: damaged header (missing sha256)")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:
        raise IndexFileError(f"index={path}: not a readable index file ({_first_line(e)})") from None
    if digest(tensors) != metadata["sha256"]:
        raise IndexFileError(f"index={path}: damaged (its arrays do not match their SHA-256)")
    header: dict[str, Any] = {k: metadata.get(k) for k in _FIELDS}
    try:
        for k in ("backbone_config", "features_config", "post_l2", "class_names", "skipped"):
            if isinstance(header[k], str):
                header[k] = json.loads(header[k])
    except json.JSONDecodeError as e:
        raise IndexFileError(f"index={path}: damaged header ({e.msg})") from None
    _check_fields(path, {k: v for k, v in header.items() if v is not None}, _FIELDS)
    _check_tensors(path, tensors)
    try:
        paths = _decode_paths(tensors["paths.utf8"], tensors["paths.offsets"])
    except UnicodeDecodeError:
        raise IndexFileError(f"index={path}: damaged (paths are not UTF-8)") from None
    log.info("index=%s is a version-1 file: loaded into memory; Index.load(...).save(NEW) converts it", path)
    stored = _stored(path, header, tensors["features"], paths, tensors)
    if not np.all(np.isfinite(stored.features)):
        raise IndexFileError(f"index={path}: damaged (non-finite features)")
    return stored


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _check_tensors(path: Path, t: dict[str, np.ndarray]) -> None:
    """A version-1 file's arrays agree with each other: a file that passes is safe to index into."""
    def bad(why: str) -> IndexFileError:
        return IndexFileError(f"index={path}: damaged ({why})")

    expected = {"features": np.float32, "ids": np.int64, "paths.utf8": np.uint8, "paths.offsets": np.int64}
    for name, dtype in expected.items():
        if name not in t:
            raise bad(f"no tensor {name!r}")
        if t[name].dtype != dtype:
            raise bad(f"{name} is {t[name].dtype}, not {np.dtype(dtype).name}")
    if t["features"].ndim != 2:
        raise bad(f"features have shape {t['features'].shape}")
    n = t["features"].shape[0]
    if t["ids"].shape != (n,) or not np.array_equal(t["ids"], np.arange(n)):
        raise bad("ids are not 0..N-1")
    offsets = t["paths.offsets"]
    if (offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != t["paths.utf8"].size
            or np.any(np.diff(offsets) < 0)):
        raise bad("paths do not match the rows")
