"""Cache files that heal and never lie (features, thumbnails, converted weights).

Each cache file is an `.npz` whose header names its format version, the key it was built for (dataset,
backbone, settings) and a SHA-256 of its arrays. On load all three are checked: a truncated, bit-flipped,
outdated or misplaced file is named in one warning line, moved aside as `<name>.bad-<time>` (kept for
inspection, never deleted) and rebuilt. Builders of the same file are serialised by a file lock, so
concurrent runs do the work once and leave one file. A cache folder that cannot be written is not an
error: the result is computed, returned and not stored (with one warning line).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from filelock import FileLock

from cbir_jax.core.files import atomic_write

log = logging.getLogger(__name__)
FORMAT_VERSION = "2"
_HEADER = ("__cbir_jax_format__", "__cbir_jax_key__", "__cbir_jax_sha256__")
Arrays = dict[str, np.ndarray]
# Errors that mean "this folder cannot hold a cache", not "this program is wrong".
_UNWRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class DamagedCacheError(Exception):
    """Internal: a cache file that is unreadable or does not match its header or key."""


def digest(arrays: Arrays) -> str:
    """SHA-256 over every array's name, dtype, shape and bytes (in name order)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save(path: str | os.PathLike, arrays: Arrays, key: str) -> None:
    """Writes `arrays` with their header, atomically."""
    header = dict(zip(_HEADER, (FORMAT_VERSION, key, digest(arrays))))
    atomic_write(path, lambda f: np.savez(f, **arrays, **{k: np.asarray(v) for k, v in header.items()}))


def read(path: str | os.PathLike, key: str) -> Arrays:
    """The arrays of a cache file built for `key`; DamagedCacheError if it is anything else."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except OSError:
        raise  # cannot read the file at all (permissions, I/O): not damage, and not ours to move
    except Exception as e:  # a damaged zip or npy header fails in many ways (BadZipFile, ValueError, ...)
        raise DamagedCacheError(f"unreadable ({type(e).__name__}: {str(e)[:80]})") from None
    header = {k: str(arrays.pop(k)) for k in _HEADER if k in arrays}
    if header.get(_HEADER[0]) != FORMAT_VERSION:
        raise DamagedCacheError(f"format {header.get(_HEADER[0], 'unknown')}, expected {FORMAT_VERSION}")
    if header.get(_HEADER[1]) != key:
        raise DamagedCacheError("built for other data or settings (key mismatch)")
    if header.get(_HEADER[2]) != digest(arrays):
        raise DamagedCacheError("content hash mismatch (corrupted)")
    return arrays


def move_aside(path: Path, reason: str, *, companions: tuple[Path, ...] = ()) -> None:
    """Renames a damaged file to `<name>.bad-<time>-<pid>` (kept for inspection) with one warning line;
    `companions` (e.g. a feature-store shard's commit record) are moved with it under the same suffix."""
    suffix = f".bad-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    aside = path.with_name(f"{path.name}{suffix}")
    try:
        for other in companions:
            if other.exists():
                os.replace(other, other.with_name(f"{other.name}{suffix}"))
        os.replace(path, aside)
        log.warning("cache file %s is damaged (%s): moved to %s, rebuilding", path, reason, aside.name)
    except OSError as e:
        log.warning("cache file %s is damaged (%s) and cannot be moved (%s): rebuilding without it", path, reason, e.strerror)


def cached(
    path: str | os.PathLike,
    key: str,
    build: Callable[[], Arrays],
    *,
    still_valid: Optional[Callable[[Arrays], bool]] = None,
) -> Arrays:
    """The arrays stored at `path` for `key`, or `build()`'s, stored there once (under a file lock).

    `still_valid(arrays)` may reject a sound file whose content is out of date (e.g. it recorded images
    that could not be read then); it is rebuilt without a warning.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        lock.acquire()
    except OSError as e:
        if e.errno not in _UNWRITABLE:
            raise
        log.warning("cache folder %s is not writable (%s): results are not cached", path.parent, e.strerror)
        arrays = _load(path, key, still_valid, may_move=False)
        return arrays if arrays is not None else build()
    try:
        arrays = _load(path, key, still_valid, may_move=True)
        if arrays is None:
            arrays = build()
            try:
                save(path, arrays, key)
            except OSError as e:
                if e.errno not in _UNWRITABLE:
                    raise
                log.warning("cannot write cache file %s (%s): results are not cached", path, e.strerror)
        return arrays
    finally:
        lock.release()


def _load(path: Path, key: str, still_valid, may_move: bool) -> Optional[Arrays]:
    if not path.exists():
        return None
    try:
        arrays = read(path, key)
    except DamagedCacheError as e:
        if may_move:
            move_aside(path, str(e))
        else:
            log.warning("cache file %s is damaged (%s): ignored", path, e)
        return None
    if still_valid is not None and not still_valid(arrays):
        return None
    return arrays
