"""What a command prints: progress as a bar on a terminal and plain lines elsewhere (never a `\\r` in a file),
no ETA until the first (compiling) step is done, a table from `diagnose`, and a multirun's closing lines.
The commands themselves, their output piped, are checked in tests/test_pipeline.py::test_command_lines."""

from __future__ import annotations

import io
import sys
import time

from cbir_jax.core import progress
from cbir_jax.core.progress import Bar, PlainProgress
from cbir_jax.diagnose import summary
from cbir_jax.runs.cli import sweep_summary


def test_a_bar_shows_no_eta_until_the_first_step_is_done_and_then_ignores_its_time():
    bar = Bar(total=100, desc="train", unit="step", file=io.StringIO(), mininterval=0)
    assert bar.format_dict["rate"] is None and "?" in str(bar)  # before any step: no ETA at all
    time.sleep(0.6)  # the first step: compilation
    bar.update(1)
    assert bar.format_dict["rate"] is None  # one step says nothing about the speed after compiling
    assert str(bar).endswith("<?]") and "step/s" not in str(bar)  # and tqdm does not fill in its own average
    for _ in range(5):
        time.sleep(0.02)
        bar.update(1)
    rate = bar.format_dict["rate"]
    assert rate is not None and rate > 6 / 0.6 * 2, rate  # counted with the compile, it would be < 10 steps/s
    assert "<00:" in str(bar)  # a few seconds left, not minutes
    bar.close()


def test_a_bar_over_an_iterable_gets_its_eta_too():
    bar = Bar(range(4), desc="eval", file=io.StringIO(), mininterval=0)
    seen = []
    for i in bar:
        seen.append(i)
        time.sleep(0.01)
        if i == 2:
            assert bar.format_dict["rate"] is not None
    assert seen == [0, 1, 2, 3]


def test_plain_progress_writes_whole_lines_only(capsys, monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    with PlainProgress(total=3, desc="train", unit="step") as p:
        for _ in range(3):
            time.sleep(0.01)
            p.update(1)
            p.set_postfix(loss="0.5000")
    err = capsys.readouterr().err
    assert "\r" not in err and err.endswith("\n")
    lines = err.splitlines()
    assert lines[0] == "train: 1/3 step"  # no rate yet: the first step compiles
    assert lines[-1].startswith("train: 3/3 steps in ") and lines[-1].endswith(" s (loss=0.5000)")
    assert "left" in lines[-2]


def test_plain_progress_of_a_short_temporary_bar_says_nothing(capsys):
    assert list(PlainProgress(range(3), desc="eval cosine", unit="chunk", leave=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_progress_is_plain_off_a_terminal(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert isinstance(progress.progress(total=2, desc="x"), PlainProgress)


def test_diagnose_prints_tables_not_json():
    result = {
        "label": {"name": "ssim_ratio",
                  "train": {"auc_same_class": 0.75, "spearman_with_cosine": 0.5, "additive_share": 0.25,
                            "mean_target_same": 0.6, "mean_target_different": 0.4},
                  "held_out": {"auc_same_class": 0.7, "spearman_with_cosine": 0.6, "additive_share": 0.3,
                               "mean_target_same": 0.5, "mean_target_different": 0.45}},
        "rows": {"train": 64, "held_out": 88, "pairs": 19968},
        "scorers": {"cosine": {"fit_train_pairs": 0.66, "fit_fresh_pairs": 0.65, "pairs": {"auc_same_class": 0.68},
                               "held_out_rows": {"map_at_r": 0.2266, "precision_at_1": 0.5}}},
    }
    text = summary(result)
    assert "{" not in text
    lines = text.splitlines()
    assert lines[0] == "**label ssim_ratio** (64 training rows, 88 held-out rows, 19,968 training pairs)"
    assert "| train | 0.7500 | 0.5000 | 0.2500 | 0.6000 | 0.4000 |" in lines
    assert lines[-1] == "| cosine | 0.6600 | 0.6500 | 0.6800 | – | 0.2266 | 0.5000 | – | – |"  # unlabelled rows: –


def test_the_sweep_summary_names_the_folder_its_jobs_and_the_report_command(tmp_path):
    for job in ("0_head=mlp", "1_head=cosine"):
        (tmp_path / job / ".hydra").mkdir(parents=True)
    (tmp_path / "multirun.yaml").write_text("")
    assert sweep_summary(tmp_path).splitlines() == [
        f"sweep: {tmp_path}/ (2 jobs: 0_head=mlp, 1_head=cosine)",
        f"report: python -m cbir_jax.report {tmp_path}",
    ]
