"""The report command on a fake multirun folder whose expected table is known."""

import csv
import json

import pytest
import yaml

from cbir_jax import report

BASE = {"cosine": 0.7, "dba_alpha_qe": 0.8}


def _metrics(value):
    return {m: value for m in report.COLUMNS} | {"queries": 100, "skipped_queries": 0}


def _job(root, num, overrides, head, learned):
    job = root / f"{num}_{','.join(overrides)}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"head": {"name": head}, "seed": 0}))
    metrics = {head: _metrics(learned)} | {k: _metrics(v) for k, v in BASE.items()}
    (job / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def multirun(tmp_path):
    root = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    num = 0
    for head, values in (("mlp", (0.1, 0.2, 0.3)), ("simnet", (0.5, 0.5, 0.5))):
        for seed, v in enumerate(values):
            _job(root, num, ["+experiment=x", "data=folder", f"head={head}", "labels=class", f"seed={seed}"], head, v)
            num += 1
    failed = root / "99_head=mlp,seed=9" / ".hydra"
    failed.mkdir(parents=True)
    (failed / "overrides.yaml").write_text(yaml.safe_dump(["head=mlp", "seed=9"]))
    (failed / "config.yaml").write_text(yaml.safe_dump({"head": {"name": "mlp"}}))
    return root


def test_groups_by_overrides_without_seed_and_reports_baselines_once(multirun, tmp_path):
    md = report.report(multirun, tmp_path / "out" / "table.md")
    lines = md.splitlines()
    assert "data=folder labels=class" in lines[0] and "6 jobs" in lines[0]
    rows = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[1] for r in rows] == ["cosine", "dba_alpha_qe", "head=simnet", "head=mlp"]
    # mean and sample std of 0.1, 0.2, 0.3 are 0.2 and 0.1; the baselines are identical in all 6 jobs.
    assert "| learned | head=mlp | 0.2000 ± 0.1000 |" in md
    assert "| learned | head=simnet | 0.5000 ± 0.0000 |" in md
    assert "| baseline | cosine | 0.7000 ± 0.0000 |" in md and rows[0].endswith("| 6 | 100 |")
    assert "99_head=mlp,seed=9" in md  # the failed job is named, not silently dropped
    with (tmp_path / "out" / "table.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["scorer"] for r in table] == ["cosine", "dba_alpha_qe", "head=simnet", "head=mlp"]
    assert float(table[3]["map_at_r"]) == pytest.approx(0.2) and float(table[3]["map_at_r_std"]) == pytest.approx(0.1)
    assert (tmp_path / "out" / "table.md").read_text().strip() == md


def test_default_output_lies_next_to_the_multirun_folder(multirun, capsys):
    assert report.main([str(multirun)]) == 0
    out = capsys.readouterr().out
    assert "head=mlp" in out
    assert (multirun.parent / "12-00-00_report.md").exists() and (multirun.parent / "12-00-00_report.csv").exists()
    # the last line says where it wrote and what, not the other multirun folders beside it
    assert out.strip().splitlines()[-1] == f"outputs: {multirun.parent}/ (12-00-00_report.csv, 12-00-00_report.md)"


def test_chart_draws_a_bar_per_row_beside_the_table(multirun, tmp_path, capsys):
    from PIL import Image

    assert report.main([str(multirun), "--out", str(tmp_path / "out" / "table"), "--chart"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"outputs: {tmp_path / 'out'}/ (table.csv, table.md, table.png)"
    with Image.open(tmp_path / "out" / "table.png") as image:
        assert image.format == "PNG" and image.size == (800, 268)  # 4 rows: 1 + 0.42 inch each, at 100 dpi


def test_a_folder_without_jobs_fails_with_a_message(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 1
    assert "no job folder" in capsys.readouterr().err


def _diagnostics(map_held_out, auc):
    block = {"fit_train_pairs": 0.9, "fit_fresh_pairs": 0.8,
             "pairs": {"spearman_pair_part": 0.1, "additive_share": 0.6, "auc_same_class": auc},
             "train_rows": {"map_at_r": 0.5}, "held_out_rows": {"map_at_r": map_held_out, "n10_skewness": 2.0,
                                                               "n10_top1pct_share": 0.05}}
    label = {"auc_same_class": 0.7, "additive_share": 0.65, "spearman_with_cosine": 0.5}
    return {"label": {"train": label}, "rows": {"held_out": 50},
            "scorers": {"cosine": {**block, "held_out_rows": {**block["held_out_rows"], "map_at_r": 0.8}}, "mlp": block}}


def test_diagnostics_table_groups_like_the_metrics_table(tmp_path):
    root = tmp_path / "multirun" / "d"
    for seed, (value, auc) in enumerate(((0.1, 0.4), (0.3, 0.6))):
        job = root / str(seed)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["head=mlp", "labels=ssim", f"seed={seed}"]))
        (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"head": {"name": "mlp"}}))
        (job / "diagnostics.json").write_text(json.dumps(_diagnostics(value, auc)))
    md = report.report(root, tmp_path / "diag", diagnostics=True)
    assert "target AUC" in md and "MAP@R held-out rows" in md
    learned = next(line for line in md.splitlines() if line.startswith("| learned"))
    # label columns, then fit columns, ... mean ± std of the two seeds (AUC 0.4, 0.6; MAP@R 0.1, 0.3)
    assert learned.startswith("| learned | mlp | 0.7000 ± 0.0000 | 0.6500 ± 0.0000 |")
    assert "| 0.5000 ± 0.1414 |" in learned and "| 0.2000 ± 0.1414 |" in learned
    baseline = next(line for line in md.splitlines() if line.startswith("| baseline | cosine"))
    assert baseline.startswith("| baseline | cosine | nan | nan | nan | nan | nan | nan | 0.6000 ± 0.0000 |")
    with pytest.raises(FileNotFoundError, match="diagnostics.json"):
        report.report(_empty(tmp_path), tmp_path / "x", diagnostics=True)


def _empty(tmp_path):
    job = tmp_path / "empty" / "0" / ".hydra"
    job.mkdir(parents=True)
    (job / "overrides.yaml").write_text(yaml.safe_dump(["seed=0"]))
    (job / "config.yaml").write_text(yaml.safe_dump({"head": {"name": "mlp"}}))
    return tmp_path / "empty"
