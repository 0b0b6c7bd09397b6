"""Resume is exact, logs included, after a real kill -9 at chosen points; SIGTERM is Ctrl-C; a run's saved
config is never overwritten by a resume that cannot be checked; a full disk (a real small tmpfs) is one line.

The kills are real (`kill_at.py`: the training process kill -9s itself at an exact point, Orbax saves in
flight included); the resumed runs are compared record for record with one uninterrupted run.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from cbir_jax.runs.cli import to_typed
from cbir_jax.scoring import heads
from cbir_jax.training import checkpointing

from helpers import FAST, compose_config
from test_pipeline import _train

KILL_AT = str(Path(__file__).with_name("kill_at.py"))
# Validation after each epoch (steps 0, 8, 16); losses logged every 3 steps; checkpoints at 5, 8, 10, 15, 16.
OPTS = ("train.log_every=3", "train.evaluate=false", "data.split.val_fraction=0.2")


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _last_params(run: Path):
    like = heads.init_params(heads.build_head(to_typed(compose_config(*OPTS)).head), 16 * 16 * 3, jax.random.key(0))
    return checkpointing.restore_params(run, like, "last")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every resumed one is compared with."""
    run = tmp_path_factory.mktemp("reference") / "run"
    _train(run, *OPTS)
    return run


def _killed_at(point: str, step: int, run: Path, *extra: str, code: int = -9) -> subprocess.CompletedProcess:
    cmd = [sys.executable, KILL_AT, point, str(step), "cbir_jax.train", *FAST, *OPTS, *extra, f"hydra.run.dir={run}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == code, out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_kill_9_at_several_points_then_resume_logs_exactly_what_the_uninterrupted_run_logged(reference, tmp_path):
    points = [
        ("step", 7),  # inside a logging window: checkpoint 5 holds steps 4-5 of the window that logs at 6
        ("validated", 8),  # right after the validation at the end of epoch 1 reached metrics.jsonl
        ("best.json", 8),  # between best.json and the validation's record: the record is written on resume
    ]
    for point, step in points:
        run = tmp_path / f"{point}-{step}"
        _killed_at(point, step, run)
        assert not (run / "model.json").exists()
        _train(run, *OPTS, "train.resume=true")
        assert _records(run) == _records(reference), point  # record for record: losses, validations, steps
        jax.tree_util.tree_map(np.testing.assert_array_equal, _last_params(run), _last_params(reference))
        assert json.loads((run / "best.json").read_text()) == json.loads((reference / "best.json").read_text())


@pytest.mark.slow
def test_sigterm_stops_at_a_step_boundary_keeps_the_checkpoint_and_says_how_to_resume(reference, tmp_path):
    run = tmp_path / "run"
    out = _killed_at("sigterm", 11, run, code=143)
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert lines == [f"error: terminated (SIGTERM) at step 11 (last checkpoint: step 10); "
                     f"resume with train.resume=true hydra.run.dir={run}"], out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert (run / "checkpoints" / "10" / checkpointing.COMMIT_FILE).is_file()
    _train(run, *OPTS, "train.resume=true")
    assert _records(run) == _records(reference)
    jax.tree_util.tree_map(np.testing.assert_array_equal, _last_params(run), _last_params(reference))


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def _one_line_error(out: subprocess.CompletedProcess, code: int = 2) -> str:
    assert out.returncode == code, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_a_resume_that_cannot_read_the_saved_config_is_refused_and_leaves_it_untouched(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "model.json").unlink()  # an unfinished run: its checkpoints wait for a resume
    saved = run / ".hydra" / "config.yaml"
    for content, expected in [(b"data: {name: [embedded\n\xff", "is damaged"), (None, "is missing")]:
        if content is None:
            saved.unlink()
        else:
            saved.write_bytes(content)
        before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        out = _cli("cbir_jax.train", *FAST, *OPTS, "train.learning_rate=0.5", "train.resume=true", f"hydra.run.dir={run}")
        assert expected in _one_line_error(out)
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing written, nothing moved
        assert not saved.exists() if content is None else saved.read_bytes() == content
    # evaluate of a folder that does not exist: one line, and no <folder>/eval/.../.hydra made for it
    out = _cli("cbir_jax.evaluate", f"checkpoint={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert "no such run folder" in _one_line_error(out)
    assert not (tmp_path / "nowhere").exists()


def _can_mount_tmpfs(where: Path) -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {where}"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_one_line_and_earlier_checkpoints_stay_intact(tmp_path):
    """A real full disk: a 600 KiB tmpfs (in a private mount namespace) holds checkpoint 5 but not 8."""
    small = tmp_path / "small"
    small.mkdir()
    if not _can_mount_tmpfs(small):
        pytest.skip("cannot mount a tmpfs here (no unprivileged user namespaces)")
    after = tmp_path / "after"
    train = " ".join([sys.executable, "-m", "cbir_jax.train", *FAST, *OPTS, f"hydra.run.dir={small / 'run'}"])
    script = (f"mount -t tmpfs -o size=600k tmpfs {small} && {{ {train}; echo $? > {tmp_path / 'rc'}; }}; "
              f"cp -r {small / 'run'} {after}")
    out = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    out.returncode = int((tmp_path / "rc").read_text())
    line = _one_line_error(out)
    assert "disk full while writing checkpoint" in line and "earlier checkpoints kept: steps 5" in line, line
    ckpts = checkpointing.Checkpoints(after, create=False)
    like = heads.init_params(heads.build_head(to_typed(compose_config(*OPTS)).head), 16 * 16 * 3, jax.random.key(0))
    step, _ = ckpts.restore({"params": like})  # verified against its committed hash
    ckpts.close_quietly()
    assert step == 5
