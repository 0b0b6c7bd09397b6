"""Training faults: divergence, resume into a finished or different run, kill -9, Ctrl-C, duplicate logs."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from cbir_jax.training import checkpointing, guards
from cbir_jax.scoring import heads
from cbir_jax.runs.cli import to_typed
from cbir_jax.core.errors import DivergedError

from faults import image_folder, read_only
from helpers import FAST, compose_config, killed_copy
from test_pipeline import _train


def _params(run_dir: Path, *overrides: str):
    cfg = to_typed(compose_config(*overrides))
    head = heads.build_head(cfg.head)
    like = heads.init_params(head, 16 * 16 * 3, jax.random.key(0))
    return checkpointing.restore_params(run_dir, like)


# These tests pin the loss log and checkpoints; validation records and best-on-validation selection
# across a resume are tested in test_selection.py.
NO_VALIDATION = "data.split.val_fraction=0"


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(DivergedError, match=r"diverged at step \d+ \(") as e:
        _train(run, "train.learning_rate=1e30", "train.evaluate=false")
    assert "\n" not in str(e.value)
    for record in _records(run):  # valid JSON, nothing but finite numbers (loss and validation records alike)
        assert all(np.isfinite(v) for v in record.values() if isinstance(v, (int, float)))
    assert not (run / "model.json").exists()  # not a finished run: evaluate refuses it


def test_nan_after_checkpoints_keeps_them_good(tmp_path, monkeypatch):
    """NaN targets from the second epoch on (step 9): checkpoints 5 and 8 stay, finite; nothing after."""
    from cbir_jax.labels import pair_labels

    real = pair_labels.pair_targets
    calls = []

    def poisoned(ctx, i, j):
        calls.append(1)
        t = real(ctx, i, j)
        return t if len(calls) == 1 else np.full_like(t, np.nan)

    monkeypatch.setattr(pair_labels, "pair_targets", poisoned)
    run = tmp_path / "run"
    with pytest.raises(DivergedError, match=r"step 9 \(loss nan\).*last checkpoint: step 8"):
        _train(run, "train.evaluate=false", "train.log_every=4", NO_VALIDATION)
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [5, 8]
    assert guards.all_finite(_params(run))
    assert [r["step"] for r in _records(run)] == [4, 8]  # the good steps, and no NaN line


def test_resume_logs_each_step_once_and_matches_the_uninterrupted_run(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    opts = ("train.max_to_keep=10", "train.log_every=1", "train.evaluate=false", NO_VALIDATION)
    _train(full, *opts)
    # Killed after logging step 9 but with step 5 its last checkpoint, mid-line on step 10.
    killed_copy(full, resumed, checkpoint=5, records=9, cut=12)
    _train(resumed, *opts, "train.resume=true")
    assert _records(resumed) == _records(full)  # each step once, and the same losses (bit-identical resume)


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)


def _one_line_error(out: subprocess.CompletedProcess, code: int = 2) -> str:
    assert out.returncode == code, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    return lines[0]


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_failed_commands_leave_runs_unchanged(tmp_path):
    """A command that cannot use a run folder fails with one line before Hydra writes anything into it."""
    finished = tmp_path / "finished"
    _train(finished, "train.evaluate=false")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(finished, unfinished)
    (unfinished / "model.json").unlink()
    before = {run: _snapshot(run) for run in (finished, unfinished)}
    cases = [
        (finished, ["backbone.image_size=8", "train.resume=true"], "finished run"),
        (finished, [], "finished run"),
        (unfinished, ["head.hidden=[64]", "train.resume=true"], "does not fit"),
        (unfinished, [], "pass train.resume=true"),
    ]
    for run, extra, expected in cases:
        out = _cli("cbir_jax.train", *FAST, *extra, f"hydra.run.dir={run}")
        assert expected in _one_line_error(out)
    assert {run: _snapshot(run) for run in (finished, unfinished)} == before
    from cbir_jax.evaluate import evaluate

    assert "mlp" in evaluate(compose_config(f"checkpoint={finished}"), tmp_path / "eval")  # still evaluable


@pytest.mark.slow
def test_user_errors_are_one_line_on_the_command_line(tmp_path):
    cases = [
        (["train.log_every=0"], "train.log_every=0 must be >= 1"),
        (["train.learning_rate=1e30", "train.evaluate=false"], "training diverged at step"),
    ]
    for extra, expected in cases:
        out = _cli("cbir_jax.train", *FAST, *extra, f"hydra.run.dir={tmp_path / 'run'}")
        assert expected in _one_line_error(out)
        shutil.rmtree(tmp_path / "run")
    one_per_class = image_folder(tmp_path / "singles", classes=3, per_class=1)
    out = _cli("cbir_jax.evaluate", "data=folder", f"data.root={one_per_class}", "backbone=pixels",
               f"hydra.run.dir={tmp_path / 'eval'}")
    assert "no query has a relevant item" in _one_line_error(out)
    with read_only(tmp_path / "locked") as locked:
        out = _cli("cbir_jax.evaluate", "backbone=pixels", f"hydra.run.dir={locked}")
        assert str(locked) in _one_line_error(out)


KILL_AT = str(Path(__file__).with_name("kill_at.py"))


@pytest.mark.slow
def test_kill_9_then_ctrl_c_then_resume_gives_identical_parameters(tmp_path):
    """A real kill -9 at step 7 and a real Ctrl-C (SIGINT) at step 12, each sent at a known step (`kill_at.py`)."""
    opts = ["train.evaluate=false", "train.max_to_keep=3"]
    reference = tmp_path / "reference"
    _train(reference, *opts)
    run = tmp_path / "run"

    def cli(point: str, step: int, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, KILL_AT, point, str(step), "cbir_jax.train", *FAST, *opts, *extra, f"hydra.run.dir={run}"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    assert cli("step", 7).returncode == -signal.SIGKILL
    line = _one_line_error(cli("sigint", 12, "train.resume=true"), code=130)
    assert line == f"error: interrupted at step 12 (last checkpoint: step 10); resume with train.resume=true hydra.run.dir={run}"
    _train(run, *opts, "train.resume=true")
    jax.tree_util.tree_map(np.testing.assert_array_equal, _params(reference), _params(run))
    assert _records(run) == _records(reference)
