"""Writing files so that a reader never sees half of one: a unique temporary name, then an atomic rename.

A fixed temporary name (`x.tmp`) is shared by every process writing `x`, so two builders overwrite and
then rename each other's file; `mkstemp` gives each writer its own. A failed write (full disk,
permissions) removes its temporary file, leaves the previous file as it was, and names the path.

A kill -9 mid-write leaves its temporary file behind (an index can be 100+ MB). Each temporary name holds
the writer's host and process id, so the next writer of the same file removes those whose process is gone
(on this host), and any older than a day (another host's, or a name without a process id).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable

log = logging.getLogger(__name__)
ORPHAN_AGE_S = 24 * 3600  # a temporary file whose writer cannot be checked is an orphan after this long
_HOST = socket.gethostname().replace(os.sep, "_") or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_orphans(path: Path) -> list[Path]:
    """Removes the temporary files of `path` that killed writers left; returns them."""
    prefix = f".{path.name}."
    removed = []
    for name in glob.glob(glob.escape(str(path.parent / prefix)) + "*.tmp"):
        tmp = Path(name)
        parts = tmp.name[len(prefix):-len(".tmp")].rsplit(".", 2)  # host, pid, mkstemp's random part
        try:
            age = time.time() - tmp.stat().st_mtime
            if len(parts) == 3 and parts[1].isdigit() and parts[0] == _HOST:
                orphan = not _alive(int(parts[1]))
            else:
                orphan = age > ORPHAN_AGE_S
            if orphan:
                if tmp.is_dir() and not tmp.is_symlink():  # a folder written whole (an index), then renamed
                    shutil.rmtree(tmp)
                else:
                    tmp.unlink()
                removed.append(tmp)
        except OSError:  # gone already (its writer finished), or not ours to remove
            continue
    if removed:
        log.info("removed %d temporary file(s) left by killed writers of %s", len(removed), path)
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], mode: int = 0o644) -> Path:
    """Calls `write(f)` on a fresh temporary file beside `path`, syncs it, and renames it onto `path`."""
    path = Path(path)
    tmp = None
    try:
        remove_orphans(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600; caches are shared with the other users of the folder
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        if e.filename is None:  # a failed write() does not say which file: name it
            raise type(e)(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def temporary_folder(path: str | os.PathLike) -> Path:
    """A fresh folder beside `path`, named as `atomic_write`'s temporary files (so a killed writer's is
    removed by the next one): fill it, then `replace_folder` it onto `path`."""
    path = Path(path)
    remove_orphans(path)
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp"))


def replace_folder(tmp: Path, path: str | os.PathLike) -> Path:
    """Moves the finished folder `tmp` onto `path`, replacing what was there (a folder cannot be renamed over
    a non-empty one, so the old one is renamed aside first, then removed)."""
    path = Path(path)
    old = None
    if path.exists() or path.is_symlink():
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp"))
        os.replace(path, old / "previous")
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path
