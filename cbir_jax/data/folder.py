"""`data=folder data.root=PATH`: any folder of images; one sub-folder per class gives labels."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from cbir_jax.data.base import DATASETS, DataError, ImageDataset, hash_strings, load_image_file

log = logging.getLogger(__name__)


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _utf8(path: Path) -> bool:
    """Whether a file name can be written as text (JSON caches and index files, logs, the search page); a
    name of undecodable bytes shows up as lone surrogates and cannot."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _members(class_dir: Path) -> tuple[list[Path], str]:
    """The class's image files (hidden ones excluded), or a reason the folder contributes none."""
    try:
        with os.scandir(class_dir) as entries:
            next(entries, None)
    except OSError as e:
        return [], f"unreadable class folder: {e.strerror}"
    # os.walk on strings, not rglob and relative_to on Paths: listing is most of an incremental update's
    # cost at 10k files. As with rglob, links to files count and links to folders are not entered, nor are
    # hidden folders. Sorted as Paths sort (part by part), so the order, and every store built from it, is
    # unchanged.
    found = []
    for top, dirs, names in os.walk(class_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(top, n) for n in names if not n.startswith(".")]
    members = [Path(f) for f in sorted(found, key=lambda f: f.split(os.sep)) if os.path.isfile(f)]
    return members, "" if members else "empty class folder"


@DATASETS.register("folder")
def build(cfg) -> ImageDataset:
    if not cfg.root:
        raise DataError("data=folder needs data.root=PATH (a folder of images, one sub-folder per class)")
    root = Path(os.path.expanduser(cfg.root)).resolve()
    if not root.is_dir():
        raise DataError(f"data.root={cfg.root}: no such folder")
    class_dirs = sorted((d for d in root.iterdir() if d.is_dir() and not _is_hidden(d)), key=lambda d: d.name)
    loose = sorted(f for f in root.iterdir() if f.is_file() and not _is_hidden(f))
    skipped = []
    undecodable = [d for d in class_dirs + loose if not _utf8(d)]
    class_dirs = [d for d in class_dirs if _utf8(d)]
    loose = [f for f in loose if _utf8(f)]
    if class_dirs and loose:  # e.g. a README beside the class folders: belongs to no class
        skipped = [(f.name, "loose file beside class folders (belongs to no class)") for f in loose]
        for name, reason in skipped:
            log.warning("skipped %s: %s", name, reason)
    files: list[Path] = []
    labels: list[int] = []
    if class_dirs:
        kept_dirs, left_out = [], []
        for d in class_dirs:
            members, reason = _members(d)
            if reason:  # named, not silently dropped: rglob alone skips an unreadable folder without a word
                left_out.append((f"{d.name}/", reason))
                continue
            if cfg.max_per_class:
                members = members[: cfg.max_per_class]
            files += members
            labels += [len(kept_dirs)] * len(members)
            kept_dirs.append(d)
        if left_out:
            log.warning("class folders left out: %s", ", ".join(f"{n} ({r})" for n, r in left_out))
        skipped += left_out
        class_dirs = kept_dirs
    else:
        files = loose
    undecodable += [f for f in files if not _utf8(f)]
    if undecodable:  # skipped by name (escaped), as unreadable images are
        names = [ascii(os.fsencode(p.relative_to(root)))[2:-1] for p in undecodable]
        log.warning("skipped %d file or folder names that are not valid UTF-8: %s", len(names), ", ".join(names[:5]))
        skipped += [(n, "name is not valid UTF-8") for n in names]
        keep = [i for i, f in enumerate(files) if _utf8(f)]
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    if not files:
        raise DataError(f"data.root={cfg.root}: no files found")
    paths = [str(f) for f in files]
    prefix = len(os.path.join(str(root), ""))  # every file was listed under root: its id is the rest
    ids = [p[prefix:] for p in paths]
    stats = [os.stat(p) for p in paths]
    key = hash_strings("folder", str(root), *(f"{i}:{s.st_size}:{s.st_mtime_ns}" for i, s in zip(ids, stats)))
    return ImageDataset(
        name=f"folder:{root.name}",
        ids=ids,
        load=lambda i: load_image_file(paths[i]),
        labels=np.asarray(labels, np.int32) if class_dirs else None,
        class_names=[d.name for d in class_dirs],
        content_key=key,
        skipped=skipped,
        paths=paths,
        stats=[(s.st_size, s.st_mtime_ns) for s in stats],
        store_key=hash_strings("folder", str(root), str(cfg.max_per_class)),
    )
