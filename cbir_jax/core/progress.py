"""Progress for long loops: a tqdm bar on a terminal, plain lines anywhere else.

A bar redraws its line with `\\r`; written to a file or a pipe that leaves mangled lines, so off a terminal
progress is a few plain lines (one at most every `PLAIN_EVERY_S` seconds, one when a kept bar ends; a bar
that is not kept says nothing unless it ran long). In a notebook, tqdm's widget. Either way the ETA waits
for the first step: JAX compiles on it, and a rate that counts the compilation promised 6 minutes for a
6-second epoch.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, Optional

from tqdm.auto import tqdm as auto_tqdm
from tqdm.std import tqdm as std_tqdm

PLAIN_EVERY_S = 30.0
NO_ETA_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<?{postfix}]"


def interactive() -> bool:
    """A terminal (or a notebook) that shows a bar redrawn in place."""
    return "ipykernel" in sys.modules or sys.stderr.isatty()


class _WarmRate:
    """The rate since the first step ended (compilation excluded), None before it."""

    def __init__(self, initial: int) -> None:
        self.warm: Optional[tuple[float, float]] = None
        self.initial = initial

    def step(self, n: float) -> None:
        if self.warm is None and n > self.initial:
            self.warm = (n, time.monotonic())

    def rate(self, n: float) -> Optional[float]:
        if self.warm is None:
            return None
        done, dt = n - self.warm[0], time.monotonic() - self.warm[1]
        return done / dt if done > 0 and dt > 0 else None


def _counted(bar: Any) -> Iterator:
    """A bar's iterable, each item counted through `bar.update` (so the warm-up rate sees it); closed at the end."""
    try:
        for item in bar.iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()


class Bar(std_tqdm):
    """tqdm whose rate (and so ETA) starts after the first step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._warm_rate = _WarmRate(kwargs.get("initial", 0) or 0)
        super().__init__(*args, **kwargs)

    def update(self, n: float = 1) -> Optional[bool]:
        self._warm_rate.step(self.n + n)
        return super().update(n)

    def __iter__(self) -> Iterator:
        """Through `update`, which tqdm's own fast loop bypasses."""
        return _counted(self)

    @property
    def format_dict(self) -> dict[str, Any]:
        d = super().format_dict
        if hasattr(self, "_warm_rate"):
            d["rate"] = self._warm_rate.rate(self.n)
            if d["rate"] is None:  # tqdm would fall back to the average since the start, compile included
                d["bar_format"] = NO_ETA_FORMAT
        return d


class PlainProgress:
    """tqdm's interface (update, set_postfix, close, iteration) as plain lines on stderr."""

    def __init__(self, iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
                 unit: str = "it", initial: int = 0, leave: bool = True, **_: Any) -> None:
        self.iterable, self.desc, self.unit, self.leave = iterable, desc, unit, leave
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = self.initial = initial
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.closed = False
        self._warm_rate = _WarmRate(initial)

    def _line(self, final: bool) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        text = f"{self.desc}: {self.n}{of} {self.unit}{'' if self.n == 1 else 's'}"
        elapsed = time.monotonic() - self.start
        if final:
            text += f" in {_duration(elapsed)}"
        else:
            rate = self._warm_rate.rate(self.n)
            if rate:
                text += f", {rate:.3g} {self.unit}/s"
                if self.total is not None:
                    text += f", about {_duration((self.total - self.n) / rate)} left"
        return text + (f" ({self.postfix})" if self.postfix else "")

    def update(self, n: int = 1) -> None:
        self.n += n
        self._warm_rate.step(self.n)
        now = time.monotonic()
        if now - self.last >= PLAIN_EVERY_S:
            self.last = now
            print(self._line(final=False), file=sys.stderr, flush=True)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.leave or time.monotonic() - self.start >= PLAIN_EVERY_S:
            print(self._line(final=True), file=sys.stderr, flush=True)

    def __iter__(self) -> Iterator:
        return _counted(self)

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(iterable: Optional[Iterable] = None, **kwargs: Any) -> Any:
    """A progress bar (tqdm's arguments: total, desc, unit, initial, leave, mininterval) fitted to where
    the output goes."""
    if "ipykernel" in sys.modules:
        return auto_tqdm(iterable, **kwargs)
    if sys.stderr.isatty():
        return Bar(iterable, **kwargs)
    return PlainProgress(iterable, **kwargs)


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes}m{s:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"
