"""The one timing loop every benchmark uses: a warm-up call (compilation), then timed repetitions."""

from __future__ import annotations

import time
from typing import Any, Callable


def times(fn: Callable[[], Any], reps: int) -> list[float]:
    """Seconds of each of `reps` calls of `fn`, after one untimed warm-up call."""
    fn()
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out
