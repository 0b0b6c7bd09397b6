"""Fault injection for the reliability tests: real faults where the OS allows, one seam where it does not.

Root ignores file modes, so a read-only folder is made with `chattr +i` when running as root (the test
skips only where neither works). Tiny labelled image folders stand in for a user's dataset.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def image_folder(root: Path, classes: int = 4, per_class: int = 3, size: int = 24, seed: int = 0) -> Path:
    """`classes` sub-folders of `per_class` random PNGs each (class c is brighter than class c-1)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (rng.random((size, size + 4, 3)) * 60 + c * 50).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")
    return root


@contextlib.contextmanager
def read_only(path: Path):
    """`path` (a folder) cannot be written into while the context is open."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o555)
    immutable = False
    if os.geteuid() == 0:  # root writes through file modes
        immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    try:
        probe = path / ".probe"
        try:
            probe.write_text("x")
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip("cannot make a read-only folder here (root without chattr)")
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        os.chmod(path, 0o755)
