"""The persistent index on disk: one safetensors file (format `cbir_jax.index`, version 1).

Why safetensors: a single file of named arrays with a small JSON header, read without pickle (so an
index from someone else cannot run code), memory-mapped by its reader, and readable from any language.

Tensors (little-endian, C order):

| name | dtype, shape | what |
|---|---|---|
| `features` | float32 (N, D) | raw backbone features, before post-processing |
| `ids` | int64 (N,) | each row's id: 0..N-1 in the order images were added |
| `paths.utf8` | uint8 (bytes,) | each row's file relative to the indexed folder (POSIX `/`), UTF-8, ... |
| `paths.offsets` | int64 (N+1,) | ... row i being `paths.utf8[offsets[i]:offsets[i+1]]` |
| `labels` | int32 (N,) | class (sub-folder) of each row, -1 for none; only for a folder with classes |
| `post.mean`, `post.projection` | float32 (D,), (D, d) | the fitted PCA / PCA-whitening (`features.whiten`) |

Header metadata (strings; JSON where structured): `format` (`cbir_jax.index`), `format_version`,
`cbir_jax_version`; `root`, the indexed folder relative to the index file's own folder (folder and index
move together); `backbone`, `backbone_fingerprint`, `backbone_config` (JSON); `features_config` (JSON: L2,
whitening) and `post_l2`; `scorer` (its name); `run` and `run_select`, the training run a learned scorer
comes from (relative to the index file's folder) and its checkpoint (`best` | `last`), both empty for a
fixed scorer; `class_names` (JSON list); `skipped` (JSON list of [path, reason], files not indexed);
`sha256` of the tensors (`core/cache.py: digest`), so a damaged file fails to load instead of ranking wrong.

Why raw features and not post-processed ones: `Index.add` appends new images post-processed with the
stored parameters, and `Index.refit` re-fits the post-processing on every row; both need the raw rows. The
post-processed gallery is recomputed on load (one pass over N x D).

Paths are a byte tensor, not header text: safetensors caps its header at 100 MB, which a few million
paths would pass.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cbir_jax.core.cache import digest
from cbir_jax.core.errors import UserError
from cbir_jax.core.files import atomic_write

FORMAT = "cbir_jax.index"
FORMAT_VERSION = 1


class IndexFileError(UserError):
    """A file that is not a usable index: damaged, written by a newer cbir_jax, or for another backbone."""


@dataclasses.dataclass
class Stored:
    """What an index file holds, as plain arrays and values (no backbone or scorer built)."""

    features: np.ndarray  # (N, D) float32, raw
    ids: np.ndarray  # (N,) int64
    paths: list[str]  # relative to `root`, POSIX separators
    labels: Optional[np.ndarray]  # (N,) int32, -1 for none; None for an unlabelled folder
    class_names: list[str]
    root: str  # relative to the index file's folder (on disk); absolute in memory
    backbone: str
    backbone_fingerprint: str
    backbone_config: dict[str, Any]
    features_config: dict[str, Any]
    post: dict[str, Any]  # postprocess.fit's parameters
    scorer: str
    run: str  # "" for a fixed scorer
    run_select: str  # which of the run's checkpoints: best | last ("" for a fixed scorer)
    skipped: list[tuple[str, str]]


def _encode_paths(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [p.encode("utf-8") for p in paths]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in encoded])
    return np.frombuffer(b"".join(encoded), np.uint8).copy(), offsets


def _decode_paths(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    data = blob.tobytes()
    return [data[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def _relative_to(target: str | os.PathLike, start: Path) -> str:
    return Path(os.path.relpath(os.path.abspath(target), os.path.abspath(start))).as_posix()


def save(stored: Stored, path: str | os.PathLike) -> Path:
    """Writes `stored` to `path` atomically (a reader never sees half a file); `root` and `run` are made
    relative to the file's folder."""
    from safetensors.numpy import save as to_bytes

    from cbir_jax import __version__

    path = Path(path)
    here = path.absolute().parent
    blob, offsets = _encode_paths(stored.paths)
    tensors = {
        "features": np.ascontiguousarray(stored.features, np.float32),
        "ids": np.ascontiguousarray(stored.ids, np.int64),
        "paths.utf8": blob,
        "paths.offsets": offsets,
    }
    if stored.labels is not None:
        tensors["labels"] = np.ascontiguousarray(stored.labels, np.int32)
    for key in ("mean", "projection"):
        if key in stored.post:
            tensors[f"post.{key}"] = np.ascontiguousarray(stored.post[key], np.float32)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "cbir_jax_version": __version__,
        "root": _relative_to(stored.root, here),
        "backbone": stored.backbone,
        "backbone_fingerprint": stored.backbone_fingerprint,
        "backbone_config": json.dumps(stored.backbone_config),
        "features_config": json.dumps(stored.features_config),
        "post_l2": json.dumps(bool(stored.post["l2"])),
        "scorer": stored.scorer,
        "run": _relative_to(stored.run, here) if stored.run else "",
        "run_select": stored.run_select,
        "class_names": json.dumps(stored.class_names),
        "skipped": json.dumps([list(s) for s in stored.skipped]),
        "sha256": digest(tensors),
    }
    return atomic_write(path, lambda f: f.write(to_bytes(tensors, metadata=metadata)))


_REQUIRED = ("root", "backbone", "backbone_fingerprint", "backbone_config", "features_config", "post_l2", "scorer",
             "run", "run_select", "class_names", "skipped", "sha256")


def load(path: str | os.PathLike) -> Stored:
    """Reads an index file; anything but a complete index of a format this version knows is a one-line
    `IndexFileError`. `root` and `run` come back absolute."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise IndexFileError(f"index={path}: no such file")
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            _check_header(path, metadata)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:
        raise IndexFileError(f"index={path}: not a readable index file ({_first_line(e)})") from None
    if digest(tensors) != metadata["sha256"]:
        raise IndexFileError(f"index={path}: damaged (its arrays do not match their SHA-256)")
    try:
        config = {k: json.loads(metadata[k]) for k in ("backbone_config", "features_config", "post_l2",
                                                        "class_names", "skipped")}
    except json.JSONDecodeError as e:
        raise IndexFileError(f"index={path}: damaged header ({e.msg})") from None
    _check_tensors(path, tensors, len(config["class_names"]))
    try:
        paths = _decode_paths(tensors["paths.utf8"], tensors["paths.offsets"])
    except UnicodeDecodeError:
        raise IndexFileError(f"index={path}: damaged (paths are not UTF-8)") from None
    here = path.absolute().parent
    post: dict[str, Any] = {"l2": bool(config["post_l2"])}
    for key in ("mean", "projection"):
        if f"post.{key}" in tensors:
            post[key] = tensors[f"post.{key}"]
    return Stored(
        features=tensors["features"],
        ids=tensors["ids"],
        paths=paths,
        labels=tensors.get("labels"),
        class_names=list(config["class_names"]),
        root=os.path.normpath(here / metadata["root"]),
        backbone=metadata["backbone"],
        backbone_fingerprint=metadata["backbone_fingerprint"],
        backbone_config=config["backbone_config"],
        features_config=config["features_config"],
        post=post,
        scorer=metadata["scorer"],
        run=os.path.normpath(here / metadata["run"]) if metadata["run"] else "",
        run_select=metadata["run_select"],
        skipped=[(str(a), str(b)) for a, b in config["skipped"]],
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _check_header(path: Path, metadata: dict[str, str]) -> None:
    if metadata.get("format") != FORMAT:
        raise IndexFileError(f"index={path}: not a cbir_jax index (a safetensors file without format={FORMAT})")
    version = metadata.get("format_version", "")
    if not version.isdigit():
        raise IndexFileError(f"index={path}: damaged header (format_version={version!r})")
    if int(version) > FORMAT_VERSION:
        raise IndexFileError(
            f"index={path}: written in index format {version} by cbir_jax {metadata.get('cbir_jax_version', '?')}; "
            f"this cbir_jax reads format {FORMAT_VERSION} and older: upgrade cbir_jax"
        )
    missing = [k for k in _REQUIRED if k not in metadata]
    if missing:
        raise IndexFileError(f"index={path}: damaged header (missing {', '.join(missing)})")


def _check_tensors(path: Path, t: dict[str, np.ndarray], n_classes: int) -> None:
    """Shapes and dtypes agree with each other: a file that passes is safe to index into."""
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
    if "labels" in t and (t["labels"].dtype != np.int32 or t["labels"].shape != (n,)
                          or np.any(t["labels"] < -1) or np.any(t["labels"] >= n_classes)):
        raise bad("labels do not match the rows or the class names")
    if ("post.mean" in t) != ("post.projection" in t):
        raise bad("half of the fitted whitening")
    d = t["features"].shape[1]
    if "post.mean" in t and (t["post.mean"].shape != (d,) or t["post.projection"].ndim != 2
                             or t["post.projection"].shape[0] != d):
        raise bad("whitening does not match the features")
    if not np.all(np.isfinite(t["features"])):
        raise bad("non-finite features")
