"""Writing files so that a reader never sees half of one: a unique temporary name, then an atomic rename.

A fixed temporary name (`x.tmp`) is shared by every process writing `x`, so two builders overwrite and
then rename each other's file; `mkstemp` gives each writer its own. A failed write (full disk,
permissions) removes its temporary file, leaves the previous file as it was, and names the path.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], mode: int = 0o644) -> Path:
    """Calls `write(f)` on a fresh temporary file beside `path`, syncs it, and renames it onto `path`."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
