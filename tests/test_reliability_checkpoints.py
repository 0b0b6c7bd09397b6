"""Checkpoints that prove themselves: a SHA-256 per step committed after Orbax finishes, verified on
restore, with a fall back to the newest intact step; best.json only after its save; a full disk is one line.

One reference run (validation on, every checkpoint kept) is trained once; each test damages a copy of it.
"""

import errno
import re
import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cbir_jax.core.errors import CheckpointError
from cbir_jax.runs.cli import to_typed
from cbir_jax.scoring import heads
from cbir_jax.training import checkpointing, selection

from helpers import compose_config
from test_pipeline import _train

OPTS = ("train.max_to_keep=10", "train.log_every=3", "train.evaluate=false", "data.split.val_fraction=0.2")
STEPS = [5, 8, 10, 15, 16]  # checkpoint_every=5, and the end of each of the 2 epochs of 8 steps


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    _train(run, *OPTS)
    return run


def _like():
    cfg = to_typed(compose_config(*OPTS))
    return heads.init_params(heads.build_head(cfg.head), 16 * 16 * 3, jax.random.key(0))


def _at(run: Path, step: int, subdir: str = "checkpoints"):
    """The parameters of one step, verified."""
    ckpts = checkpointing.Checkpoints(run, subdir, create=False)
    try:
        return ckpts.restore({"params": _like()}, steps=[step])[1]["params"]
    finally:
        ckpts.close_quietly()


def _same(a, b) -> None:
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def _largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _unfinished_copy(reference: Path, dest: Path, last: int) -> Path:
    """The reference run as a kill after checkpoint `last` leaves it: later steps and model.json gone."""
    shutil.copytree(reference, dest)
    (dest / "model.json").unlink()
    for step in STEPS:
        if step > last:
            shutil.rmtree(dest / "checkpoints" / str(step))
    return dest


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_every_step_commits_the_hash_of_what_it_holds(reference):
    assert sorted(int(p.name) for p in (reference / "checkpoints").iterdir()) == STEPS  # no Orbax temporaries
    for step in STEPS:
        commit = json.loads((reference / "checkpoints" / str(step) / checkpointing.COMMIT_FILE).read_text())
        assert commit["step"] == step
        assert commit["sha256"]["params"] == checkpointing.digest(_at(reference, step))
        assert set(commit["sha256"]) == {"params", "train_state", "loop"}
    best = json.loads((reference / "best.json").read_text())
    assert [p.name for p in (reference / "best").iterdir()] == [str(best["best_step"])]  # best.json names what best/ holds
    assert (reference / "best" / str(best["best_step"]) / checkpointing.COMMIT_FILE).is_file()


def test_a_flipped_bit_is_named_and_the_newest_intact_checkpoint_is_used(reference, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    flip_bit(_largest_file(run / "checkpoints" / "16" / "params"))
    with caplog.at_level(logging.WARNING):
        restored = checkpointing.restore_params(run, _like(), "last")  # what `evaluate eval.select=last` loads
    _same(restored, _at(reference, 15))
    lines = [r.getMessage() for r in caplog.records if r.name == "cbir_jax.training.checkpointing"]
    assert any("checkpoints/16 is damaged" in m and "SHA-256" in m for m in lines), lines
    assert any("using checkpoint" in m and "checkpoints/15" in m for m in lines), lines
    assert all("\n" not in m for m in lines)


def test_no_intact_checkpoint_is_one_line(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for step in STEPS:
        flip_bit(_largest_file(run / "checkpoints" / str(step) / "params"))
    with pytest.raises(CheckpointError, match="no intact checkpoint") as e:
        checkpointing.restore_params(run, _like(), "last")
    assert "\n" not in str(e.value)
    best = next((run / "best").iterdir())
    (_largest_file(best / "params")).write_bytes(b"")  # emptied: unreadable, not silently zeros
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        checkpointing.restore_params(run, _like(), "best")


def test_a_step_killed_before_its_commit_is_skipped(reference, tmp_path):
    run = _unfinished_copy(reference, tmp_path / "run", last=10)
    (run / "checkpoints" / "10" / checkpointing.COMMIT_FILE).unlink()  # finished by Orbax, never committed
    ckpts = checkpointing.Checkpoints(run, create=False)
    step, _ = ckpts.restore({"params": _like()})
    ckpts.close_quietly()
    assert step == 8


def test_truncated_latest_checkpoint_resumes_from_the_intact_one_and_matches(reference, tmp_path):
    run = _unfinished_copy(reference, tmp_path / "run", last=10)
    f = _largest_file(run / "checkpoints" / "10" / "params")
    f.write_bytes(f.read_bytes()[:1000])
    _train(run, *OPTS, "train.resume=true")  # from step 8: re-done steps give the same records
    assert _records(run) == _records(reference)
    _same(_at(run, 16), _at(reference, 16))
    assert json.loads((run / "best.json").read_text()) == json.loads((reference / "best.json").read_text())


def test_resume_validates_again_when_best_is_not_intact(reference, tmp_path, caplog):
    run = _unfinished_copy(reference, tmp_path / "run", last=10)
    best = json.loads((reference / "best.json").read_text())["best_step"]
    flip_bit(_largest_file(run / "best" / str(best) / "params"))
    with caplog.at_level(logging.WARNING):
        _train(run, *OPTS, "train.resume=true")
    assert best <= 10  # the premise: the damaged best step is one the resumed run does not redo
    assert any("does not hold the best step" in r.getMessage() for r in caplog.records)
    assert json.loads((run / "best.json").read_text()) == json.loads((reference / "best.json").read_text())
    _same(_at(run, best, "best"), _at(reference, best, "best"))
    assert _records(run) == _records(reference)


def test_best_json_never_names_a_save_that_has_not_finished(tmp_path, monkeypatch):
    seen = []
    real = selection.Selection.save

    def save(self, run_dir):
        folder = Path(run_dir) / selection.BEST_DIR / str(self.best_step)
        seen.append((folder / checkpointing.COMMIT_FILE).is_file())  # committed before best.json names it
        real(self, run_dir)

    monkeypatch.setattr(selection.Selection, "save", save)
    _train(tmp_path / "run", "train.evaluate=false", "data.split.val_fraction=0.2")
    assert seen and all(seen)


@pytest.mark.parametrize("where", ["save", "wait", "commit"])
def test_full_disk_while_checkpointing_is_one_line_and_keeps_earlier_checkpoints(tmp_path, monkeypatch, where):
    """ENOSPC injected where Orbax reports it: from `save` (synchronous part) or from the background write
    (surfacing at `wait_until_finished`, as TensorStore's RESOURCE_EXHAUSTED); or where ours does, when step
    8's data fit but its commit file did not (step 8 is then removed: it can never be restored)."""
    real_save, real_wait = ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished
    real_write = checkpointing.atomic_write_text
    failing = {"on": False}

    def write(path, text):
        if where == "commit" and path.parent.name == "8" and path.name == checkpointing.COMMIT_FILE:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, text)

    monkeypatch.setattr(checkpointing, "atomic_write_text", write)

    def save(self, step, *args, **kwargs):
        if "checkpoints" in str(self.directory) and step >= 8 and where != "commit":
            if where == "save":
                raise OSError(errno.ENOSPC, "No space left on device", str(self.directory / str(step)))
            failing["on"] = True
        return real_save(self, step, *args, **kwargs)

    def wait(self):
        real_wait(self)
        if failing["on"]:
            failing["on"] = False
            raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device [os_error_code='28']")

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", wait)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"disk full while writing checkpoint 8 .*earlier checkpoints kept: steps 5") as e:
        _train(run, "train.evaluate=false", "data.split.val_fraction=0.2")
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    ckpts = checkpointing.Checkpoints(run, create=False)
    step, out = ckpts.restore({"params": _like()})  # verified against its hash
    ckpts.close_quietly()
    assert step == 5
    assert not (run / "model.json").exists()
    assert not (run / "checkpoints" / "8").exists()


@pytest.mark.parametrize(
    "name, damage, names",
    [
        ("model.json", lambda p: p.write_text(p.read_text()[:40]), "model.json is damaged (not valid JSON"),
        ("model.json", lambda p: p.write_text("[]"), "model.json is damaged (not a JSON object)"),
        ("model.json", lambda p: p.write_text('{"head": "mlp", "feature_dim": "768"}'), "model.json is damaged (feature_dim"),
        (".hydra/config.yaml", lambda p: p.write_text("data: {name: [oops\n"), "config.yaml is damaged"),
        (".hydra/config.yaml", lambda p: p.write_text("train: {epochs: many}\n"), "config.yaml is damaged"),
    ],
)
def test_a_damaged_run_file_is_named_in_one_line(reference, tmp_path, name, damage, names):
    from cbir_jax.evaluate import evaluate
    import cbir_jax

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    damage(run / name)
    with pytest.raises(CheckpointError, match=re.escape(names)) as e:
        evaluate(compose_config(f"checkpoint={run}"), tmp_path / "eval")
    assert "\n" not in str(e.value) and str(run / name) in str(e.value)
    with pytest.raises(CheckpointError, match=re.escape(names)):
        cbir_jax.load_run(run)  # the API reads runs the same way


def test_a_damaged_best_json_is_named_when_resuming(reference, tmp_path):
    run = _unfinished_copy(reference, tmp_path / "run", last=10)
    (run / "best.json").write_text((run / "best.json").read_text()[:30])
    with pytest.raises(CheckpointError, match=r"best.json is damaged") as e:
        _train(run, *OPTS, "train.resume=true")
    assert "\n" not in str(e.value)
