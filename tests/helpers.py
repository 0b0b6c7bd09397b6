"""Composing configs the way the entry points do, a run as a kill would leave it, and re-ranker scores on
hand-made galleries, for tests."""

import shutil
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from cbir_jax.core.config import CONFIG_DIR
from cbir_jax.scoring import ranking

# Small enough to train and evaluate in seconds; real photos (data=embedded), real code paths.
FAST = [
    "backbone=pixels",
    "backbone.image_size=16",
    "data.views_per_image=4",
    "pairs.pairs_per_epoch=512",
    "train.batch_size=64",
    "train.epochs=2",
    "train.warmup_steps=2",
    "train.checkpoint_every=5",
    "head.hidden=[32]",
    "labels.image_size=32",
    "eval.figure=false",
]


def compose_config(*overrides: str, fast: bool = True) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=(FAST if fast else []) + list(overrides))


def killed_copy(full: Path, killed: Path, checkpoint: int, records: int, cut: int = 0) -> None:
    """`killed`: the finished run `full` as a kill would have left it, with `checkpoint` its last checkpoint
    and `records` lines of metrics.jsonl (then `cut` characters of the next: a line cut off mid-write)."""
    killed.mkdir()
    shutil.copytree(full / ".hydra", killed / ".hydra")
    shutil.copytree(full / "checkpoints" / str(checkpoint), killed / "checkpoints" / str(checkpoint))
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text("\n".join(lines[:records]) + "\n" + lines[records][:cut])


def run_two_processes(argv_of, tmp_path: Path, cwd, env: dict, timeout: float) -> tuple[list, str]:
    """Starts processes 0 and 1 (`argv_of(p)`), their output in tmp_path/log{p}.txt; waits, killing any that
    outlives `timeout`. Returns their exit codes and the tails of their logs, for an assertion's message."""
    import subprocess

    logs = [open(tmp_path / f"log{p}.txt", "w") for p in range(2)]
    procs = [subprocess.Popen(argv_of(p), cwd=cwd, env=env, stdout=logs[p], stderr=subprocess.STDOUT) for p in range(2)]
    try:
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    out = "\n".join(f"--- process {p}:\n" + (tmp_path / f"log{p}.txt").read_text()[-3000:] for p in range(2))
    return [p.returncode for p in procs], out


def unit_circle(*angles_deg) -> np.ndarray:
    """Unit vectors in 2-D at these angles: galleries whose neighbour orders can be read off by hand."""
    a = np.deg2rad(np.asarray(angles_deg, np.float64))
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def all_scores(scorer, gallery, queries, self_index) -> np.ndarray:
    """(B, N) every gallery score of each query, through `ranking.score_all` as evaluation computes them."""
    state = scorer.prepare(np.asarray(gallery))
    return np.asarray(ranking.score_all(scorer, state, np.asarray(queries), np.asarray(self_index, np.int32)))
