"""A run folder's lifecycle: what may be written into it, and when.

- A finished run (it has `model.json`) is immutable: no command writes into it again, so `evaluate
  checkpoint=RUN` keeps working whatever is typed later.
- A resume must fit the run it continues (same data, backbone, features, head, labels, loss...): checked
  against the run's saved config *before* anything is written, because Hydra rewrites
  `.hydra/config.yaml` before the task starts (hence `cli.RunGuard`).
- After a resume `metrics.jsonl` (and TensorBoard) hold each step once: records past the restored step
  are dropped (`training.metrics_log`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cbir_jax.training.checkpointing import MODEL_FILE
from cbir_jax.core.errors import RunDirError

# Keys a resume may change: how long to train and how often to log, never what is trained.
RESUME_MAY_CHANGE = (
    "train.resume", "train.epochs", "train.log_every", "train.checkpoint_every", "train.max_to_keep",
    "train.evaluate", "eval", "cache_dir", "checkpoint", "query", "k", "experiment", "optimized_metric",
    "out", "index",
)


def is_finished(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / MODEL_FILE).exists()


def has_checkpoints(run_dir: str | os.PathLike) -> bool:
    ckpt = Path(run_dir) / "checkpoints"
    return ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())


def _flat(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], tree


def _typed_dict(cfg: DictConfig) -> dict[str, Any]:
    from cbir_jax.core.config import Config

    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    try:  # defaults filled in, so a key the saved run lacks compares by its default value
        cfg = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    except OmegaConfBaseException:  # a run saved under another schema: compare what is there
        pass
    return OmegaConf.to_container(cfg, resolve=True)


def resume_differences(saved: DictConfig, now: DictConfig) -> list[str]:
    """The keys (outside RESUME_MAY_CHANGE) whose values differ between a run's saved config and today's."""
    try:
        a = dict(_flat(_typed_dict(saved)))
    except OmegaConfBaseException as e:  # e.g. an interpolation that no longer resolves
        raise RunDirError(f"cannot resume: the run's saved .hydra/config.yaml does not resolve ({_first_line(e)})") from None
    b = dict(_flat(_typed_dict(now)))
    may = lambda key: any(key == p or key.startswith(p + ".") for p in RESUME_MAY_CHANGE)  # noqa: E731
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if not may(k) and a.get(k) != b.get(k)]


def saved_config(run_dir: Path) -> DictConfig:
    """A run's `.hydra/config.yaml`, what a resume is checked against. Missing or unreadable, the resume is
    refused (one line) and the file left exactly as it is: it is the only record of how the run was trained."""
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.is_file():
        raise RunDirError(f"cannot resume {run_dir}: {path} is missing, so the resume cannot be checked against "
                          "the run's settings; restore it or train into a new hydra.run.dir")
    try:
        saved = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError, UnicodeDecodeError) as e:
        raise RunDirError(f"cannot resume {run_dir}: {path} is damaged ({_first_line(e)}); it is left as it is: "
                          "restore it or train into a new hydra.run.dir") from None
    if not isinstance(saved, DictConfig):
        raise RunDirError(f"cannot resume {run_dir}: {path} is damaged (not a mapping); it is left as it is: "
                          "restore it or train into a new hydra.run.dir")
    return saved


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:160]


def check_output_dir(out_dir: Path, cfg: DictConfig, app: str) -> None:
    """Fails (one line) unless `app` may write into `out_dir`; checks it is writable without changing it."""
    if is_finished(out_dir):
        raise RunDirError(
            f"{out_dir} is a finished run and is never overwritten; write to a new hydra.run.dir"
            + (f" (evaluate it with checkpoint={out_dir})" if app != "evaluate" else "")
        )
    if app == "train" and has_checkpoints(out_dir):
        if not cfg.train.resume:
            raise RunDirError(f"{out_dir} already holds checkpoints; pass train.resume=true to continue them")
        diff = resume_differences(saved_config(out_dir), cfg)
        if diff:
            more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
            raise RunDirError(
                f"train.resume=true does not fit {out_dir}: {'; '.join(diff[:3])}{more}; "
                "resume with the run's own settings or train into a new hydra.run.dir"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".write-probe-")
    except OSError as e:
        raise type(e)(e.errno, e.strerror, str(out_dir)) from None  # name the folder, not the probe
    os.close(fd)
    os.unlink(probe)
