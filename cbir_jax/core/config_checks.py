"""Range checks on the typed config, in one table, run once when an entry point starts.

Why a table: the schema (`config.py`) types every key and every closed choice (an Enum, checked when the
config is composed), but a type cannot say "at least 1" or "in [0, 1]".
Without these checks `train.log_every=0` dies with a ZeroDivisionError deep in the loop and
`train.learning_rate=-1` trains happily uphill. Each rule is (key, test, what the value must be); all
failing rules are reported together, on one line, as a `ConfigError`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from cbir_jax.core.errors import ConfigError

Check = Callable[[Any], bool]


def _positive(v: Any) -> bool:
    return v is not None and math.isfinite(v) and v > 0


def _at_least(n: int) -> Check:
    return lambda v: v is not None and v >= n


def _optional(check: Check) -> Check:
    return lambda v: v is None or check(v)


def _fraction(v: Any) -> bool:
    return v is not None and math.isfinite(v) and 0.0 <= v <= 1.0


def _non_negative(v: Any) -> bool:
    return v is not None and math.isfinite(v) and v >= 0


def _all(check: Check) -> Check:
    return lambda v: all(check(x) for x in v)


def _odd_at_least_3(v: Any) -> bool:
    return v >= 3 and v % 2 == 1


# (dotted key, test, what the value must be). Keys a config lacks (another branch's schema) are skipped.
RULES: list[tuple[str, Check, str]] = [
    ("seed", _at_least(0), ">= 0"),
    ("data.seed", _at_least(0), ">= 0"),
    ("data.split.seed", _at_least(0), ">= 0"),
    ("train.patience", _optional(_at_least(1)), ">= 1 or null"),
    ("serve.port", lambda v: v is not None and 0 <= v <= 65535, "in [0, 65535]"),
    ("train.learning_rate", _positive, "> 0"),
    ("train.epochs", _at_least(1), ">= 1"),
    ("train.batch_size", _at_least(1), ">= 1"),
    ("train.log_every", _at_least(1), ">= 1"),
    ("train.checkpoint_every", _at_least(1), ">= 1"),
    ("train.max_to_keep", _at_least(1), ">= 1"),
    ("train.warmup_steps", _at_least(0), ">= 0"),
    ("train.weight_decay", _non_negative, ">= 0"),
    ("train.grad_clip", _optional(_positive), "> 0 or null"),
    ("pairs.pairs_per_epoch", _at_least(1), ">= 1"),
    ("pairs.hard_fraction", _fraction, "in [0, 1]"),
    ("pairs.hard_k", _at_least(1), ">= 1"),
    ("data.views_per_image", _at_least(1), ">= 1"),
    ("data.max_per_class", _optional(_at_least(1)), ">= 1 or null"),
    ("data.split.train_fraction", _fraction, "in [0, 1]"),
    ("data.split.query_fraction", _optional(_fraction), "in [0, 1] or null"),
    ("data.split.val_fraction", _fraction, "in [0, 1]"),
    ("backbone.image_size", _at_least(1), ">= 1"),
    ("backbone.batch_size", _at_least(1), ">= 1"),
    ("backbone.gem_p", _positive, "> 0"),
    ("backbone.rmac_levels", _at_least(1), ">= 1"),
    ("features.whiten_dim", _optional(_at_least(1)), ">= 1 or null"),
    ("features.shard_rows", _at_least(1), ">= 1"),
    ("features.barrier_timeout_s", _positive, "> 0"),
    ("data.workers", _optional(_at_least(0)), ">= 0 or null"),
    ("data.decode_timeout_s", _positive, "> 0"),
    ("labels.image_size", _at_least(1), ">= 1"),
    ("labels.ssim_win_size", _odd_at_least_3, "odd and >= 3"),
    ("labels.hash_size", _at_least(2), ">= 2"),
    ("labels.eps", _positive, "> 0"),
    ("head.hidden", _all(_at_least(1)), "a list of sizes >= 1"),
    ("head.rank", _at_least(1), ">= 1"),
    ("loss.margin", _non_negative, ">= 0"),
    ("eval.k", _at_least(1), ">= 1"),
    ("eval.query_chunk", _at_least(1), ">= 1"),
    ("eval.gallery_chunk", _optional(_at_least(1)), ">= 1 or null"),
    ("k", _at_least(1), ">= 1"),
    ("head.reranker.k", _at_least(1), ">= 1"),
    ("head.reranker.alpha", _non_negative, ">= 0"),
    ("head.reranker.qe_k", _at_least(1), ">= 1"),
    ("head.reranker.qe_alpha", _non_negative, ">= 0"),
    ("head.reranker.dim", _at_least(1), ">= 1"),
    ("head.reranker.depth", _at_least(0), ">= 0"),
    ("head.reranker.heads", _at_least(1), ">= 1"),
    ("head.reranker.pseudo_positives", _at_least(1), ">= 1"),
    ("head.reranker.queries_per_step", _at_least(1), ">= 1"),
    ("head.reranker.temperature", _positive, "> 0"),
    ("head.reranker.val_every", _at_least(1), ">= 1"),
]
# Rules between keys: (keys named in the message, test on the whole config, what must hold).
RELATIONS: list[tuple[str, Callable[[Any], bool], str]] = [
    ("labels.ssim_win_size", lambda c: c.labels.ssim_win_size <= c.labels.image_size, "<= labels.image_size"),
    ("head.reranker.dim", lambda c: c.head.reranker.dim % c.head.reranker.heads == 0, "a multiple of head.reranker.heads"),
]
_MISSING = object()


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part, _MISSING)
        if cfg is _MISSING:
            return _MISSING
    return cfg


def problems(cfg: Any) -> list[str]:
    """Every rule `cfg` breaks, as `key=value must be ...`."""
    out = []
    for key, check, must in RULES:
        value = _get(cfg, key)
        if value is not _MISSING and not check(value):
            out.append(f"{key}={value!r} must be {must}")
    if not out:  # relations assume each key is in range
        out = [f"{key}={_get(cfg, key)!r} must be {must}" for key, check, must in RELATIONS if not check(cfg)]
    return out


def _path_problems(cfg: Any) -> list[str]:
    """Paths that must be folders: a file there fails much later, with a traceback from deep inside."""
    cache = _get(cfg, "cache_dir")
    if isinstance(cache, str) and Path(cache).expanduser().exists() and not Path(cache).expanduser().is_dir():
        return [f"cache_dir={cache} is a file, not a folder"]
    return []


def validate(cfg: Any) -> Any:
    """Returns `cfg` unchanged, or raises one `ConfigError` naming every value out of its range."""
    found = problems(cfg) + _path_problems(cfg)
    if found:
        raise ConfigError("; ".join(found))
    return cfg
