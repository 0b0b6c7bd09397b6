"""Decoding on Grain worker processes, in parallel with the backbone's forward pass.

`decode_stream` yields one `Decoded` per requested image, in the requested order (deterministic whatever the
number of workers), while `data.workers` processes decode and preprocess the next ones into Grain's prefetch
buffers. Why Grain: it is the JAX ecosystem's loader (worker processes, shared-memory transfer, in-order
round-robin over workers, checkpointable position), so nothing here is a home-made process pool.

Bad images never stop a run:
- a file that cannot be decoded, or read (vanished since the listing, permissions), comes back as a
  `Decoded` with `error` set, named, and the stream goes on;
- a *poisoned* image that kills its worker (a decoder crash) or hangs it (each worker arms an alarm of
  `timeout_s` per image, whose default action ends the process even inside C code) is found through the
  per-worker "in flight" markers, confirmed in a fresh one-worker pipeline, skipped by name, and the stream
  restarts from the position it had reached (`start=`: the loader's checkpointable state).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from cbir_jax.data.base import ImageLoadError, ImageReadError, load_image_file

log = logging.getLogger(__name__)

# Grain's message when one of its worker processes ends without a result (its only signal for it).
_WORKER_DIED = "terminated unexpectedly"
_IDLE = -1


@dataclasses.dataclass(frozen=True)
class Decoded:
    """One requested image: `array` (the transform's output), or `error` (one line) and no array."""

    position: int  # in the requested order
    index: int  # dataset index
    array: Optional[np.ndarray]
    error: str = ""
    transient: bool = False  # a read error (may pass): retried by the next run, never stored as a skip


# A worker costs about a second to start (a fresh interpreter importing grain): fewer images than this per
# worker are decoded faster in the main process (e.g. the 1% a grown folder adds).
MIN_IMAGES_PER_WORKER = 128


def auto_workers(n_images: int, workers: Optional[int]) -> int:
    """Decode processes for `n_images`: `data.workers` (None: one per core), never more than the images
    can keep busy, 0 (the main process) for a handful."""
    wanted = (os.cpu_count() or 1) if workers is None else int(workers)
    return max(0, min(wanted, n_images // MIN_IMAGES_PER_WORKER))


class _Decode:
    """Runs in a worker: (position, index, source) -> Decoded-like tuple. Pickled once per worker."""

    def __init__(self, load: Optional[Callable[[int], np.ndarray]], transform: Callable[[np.ndarray], np.ndarray],
                 poisoned: dict[int, str], marks: Optional[str], timeout_s: float) -> None:
        self.load, self.transform, self.poisoned = load, transform, poisoned
        self.marks, self.timeout_s = marks, timeout_s
        self._fd: Optional[int] = None

    def _mark(self, position: int) -> None:
        if self.marks is None:
            return
        if self._fd is None:
            self._fd = os.open(os.path.join(self.marks, str(os.getpid())), os.O_CREAT | os.O_WRONLY, 0o600)
        os.pwrite(self._fd, b"%20d" % position, 0)

    def __call__(self, item: tuple[int, int, str]) -> tuple:
        position, index, path = item
        if index in self.poisoned:
            return position, index, None, self.poisoned[index], False
        self._mark(position)
        if self.marks is not None and self.timeout_s > 0:  # only in a worker: the default action ends the process
            signal.alarm(max(1, math.ceil(self.timeout_s)))
        try:
            image = load_image_file(path) if path else self.load(index)
            return position, index, self.transform(image), "", False
        except ImageReadError as e:
            return position, index, None, str(e), True
        except ImageLoadError as e:
            return position, index, None, str(e), False
        finally:
            if self.marks is not None and self.timeout_s > 0:
                signal.alarm(0)
            self._mark(_IDLE)


def _absl_flags_parsed() -> None:
    """Grain reads absl flags in its workers; a program that never parsed them (ours) marks them parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _iterator(items: Sequence[tuple[int, int, str]], start: int, decode: _Decode, workers: int, prefetch: int):
    import grain

    ds = grain.MapDataset.source(list(items[start:])).map(decode)
    if workers <= 0:
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
    _absl_flags_parsed()
    # In each worker the map runs in its main thread (num_threads=0), where SIGALRM keeps its default action.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    return iter(it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch)))


def decode_stream(
    indices: Sequence[int],
    transform: Callable[[np.ndarray], np.ndarray],
    *,
    load: Optional[Callable[[int], np.ndarray]] = None,
    paths: Optional[Sequence[str]] = None,
    workers: int = 0,
    timeout_s: float = 60.0,
    prefetch: int = 32,
    start: int = 0,
) -> Iterator[Decoded]:
    """`transform(image)` of each dataset index in `indices`, in order, decoded by `workers` processes.

    Images are read from `paths[index]` when given (workers receive only the paths they need), else through
    `load(index)` (pickled to each worker). `start` resumes the stream at that position. `prefetch`: images
    decoded ahead, over all workers (about a batch: workers keep decoding while the backbone runs).
    """
    if paths is None and load is None:
        raise TypeError("decode_stream needs paths= or load=")
    items = [(p, int(i), paths[i] if paths is not None else "") for p, i in enumerate(indices)]
    poisoned: dict[int, str] = {}
    marks = tempfile.mkdtemp(prefix="cbir_jax-decode-") if workers > 0 else None
    position, stuck = start, 0
    try:
        while position < len(items):
            decode = _Decode(load, transform, dict(poisoned), marks, timeout_s)
            it = _iterator(items, position, decode, workers, max(1, -(-prefetch // max(workers, 1))))
            try:
                for position_, index, array, error, transient in it:
                    yield Decoded(position_, index, array, error, transient)
                    position, stuck = position_ + 1, 0
                return
            except RuntimeError as e:
                if marks is None or _WORKER_DIED not in str(e):
                    raise
                found = _culprits(items, position, marks, decode, timeout_s)
                stuck = 0 if found else stuck + 1
                if stuck > 2:
                    raise RuntimeError(f"decode workers keep dying at image {position} with no image to blame: {e}") from e
                poisoned.update(found)
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
    finally:
        if marks is not None:
            shutil.rmtree(marks, ignore_errors=True)


def _culprits(items, position: int, marks: str, decode: _Decode, timeout_s: float) -> dict[int, str]:
    """Images in flight when a worker died: {index: reason}. With several in flight (grain stops every worker
    when one dies), each is tried alone in a fresh worker, and only those that kill or hang it are blamed."""
    in_flight = set()
    for f in Path(marks).iterdir():
        try:
            p = int(f.read_bytes() or _IDLE)
        except ValueError:
            continue
        if p >= position:
            in_flight.add(p)
        f.unlink()
    reason = f"killed or hung its decode worker (limit {timeout_s:g} s an image)"
    if len(in_flight) == 1:  # the only image being decoded when the worker died: no need to try it again
        return {items[in_flight.pop()][1]: reason}
    found = {}
    for p in sorted(in_flight):
        _, index, _ = items[p]
        probe = _Decode(decode.load, decode.transform, {}, marks, timeout_s)
        try:
            list(_iterator([items[p]], 0, probe, 1, 1))
        except RuntimeError as e:
            if _WORKER_DIED not in str(e):
                raise
            found[index] = reason
        for f in Path(marks).iterdir():
            f.unlink()
    return found
