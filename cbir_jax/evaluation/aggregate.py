"""Aggregating a multirun: its jobs' metrics (or diagnostics) grouped by overrides as mean ± std over seeds,
baselines once each, as markdown, CSV and a chart, and paired comparisons with a baseline.
`python -m cbir_jax.report` is the entry point over it."""

from __future__ import annotations

import csv
import json
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import yaml

COLUMNS = OrderedDict(
    [
        ("precision_at_1", "P@1"),
        ("precision_at_10", "P@10"),
        ("map_at_r", "mAP@R"),
        ("r_precision", "R-precision"),
        ("map", "mAP"),
    ]
)
# `--diagnostics`: one row per scorer from each job's diagnostics.json (cbir_jax/diagnose.py).
DIAGNOSTIC_COLUMNS = OrderedDict(
    [
        ("label_auc", "target AUC"),
        ("label_per_image", "target per-image share"),
        ("label_cosine", "ρ(target, cosine)"),
        ("fit_train", "fit ρ train pairs"),
        ("fit_fresh", "fit ρ fresh pairs"),
        ("fit_pair_part", "fit ρ pair part"),
        ("output_per_image", "output per-image share"),
        ("output_auc", "output AUC"),
        ("map_at_r_train", "MAP@R train rows"),
        ("map_at_r_held_out", "MAP@R held-out rows"),
        ("n10_skewness", "N10 skew"),
        ("n10_top1pct_share", "top-1% share"),
    ]
)
_UNGROUPED = ("seed", "experiment")


def flatten_diagnostics(d: dict) -> dict[str, dict[str, float]]:
    """diagnostics.json as {scorer: {column: value}}; label and fit columns only on the learned (non-cosine) rows."""
    label = d["label"]["train"]
    out = {}
    for name, b in d["scorers"].items():
        learned = name != "cosine"
        out[name] = {
            "label_auc": label.get("auc_same_class", math.nan) if learned else math.nan,
            "label_per_image": label["additive_share"] if learned else math.nan,
            "label_cosine": label["spearman_with_cosine"] if learned else math.nan,
            # cosine's "fit" is the label's correlation with it (the learned row's ρ(target, cosine)); it
            # would average over different labels here
            "fit_train": b["fit_train_pairs"] if learned else math.nan,
            "fit_fresh": b["fit_fresh_pairs"] if learned else math.nan,
            "fit_pair_part": b["pairs"]["spearman_pair_part"] if learned else math.nan,
            "output_per_image": b["pairs"]["additive_share"],
            "output_auc": b["pairs"].get("auc_same_class", math.nan),
            "map_at_r_train": b.get("train_rows", {}).get("map_at_r", math.nan),
            "map_at_r_held_out": b.get("held_out_rows", {}).get("map_at_r", math.nan),
            "n10_skewness": b.get("held_out_rows", {}).get("n10_skewness", math.nan),
            "n10_top1pct_share": b.get("held_out_rows", {}).get("n10_top1pct_share", math.nan),
            "queries": d["rows"]["held_out"],
        }
    return out


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def load_jobs(multirun: Path, diagnostics: bool = False) -> tuple[list[dict], list[Path]]:
    """Every job folder under `multirun` with its overrides, head name and metrics (or, with `diagnostics`,
    its flattened diagnostics.json); and the ones without that file (failed or unfinished jobs)."""
    jobs, missing = [], []
    for overrides_file in sorted(multirun.glob("**/.hydra/overrides.yaml")):
        job = overrides_file.parent.parent
        overrides = yaml.safe_load(overrides_file.read_text()) or []
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text()) or {}
        metrics_file = job / ("diagnostics.json" if diagnostics else "metrics.json")
        if not metrics_file.exists():
            missing.append(job)
            continue
        metrics = json.loads(metrics_file.read_text())
        jobs.append(
            {
                "dir": job,
                "overrides": [o for o in overrides if _key(o) not in _UNGROUPED],
                "head": (config.get("head") or {}).get("name"),
                "checkpoint": config.get("checkpoint"),
                "metrics": flatten_diagnostics(metrics) if diagnostics else metrics,
            }
        )
    return jobs, missing


def _summary(values: list[dict], columns=COLUMNS) -> dict:
    out = {"n": len(values), "queries": sorted({int(v.get("queries", 0)) for v in values})}
    for metric in columns:
        x = np.array([v.get(metric, math.nan) for v in values], np.float64)
        out[metric] = (float(np.mean(x)), float(np.std(x, ddof=1)) if len(x) > 1 else math.nan)
    return out


def summarise(jobs: list[dict], columns=COLUMNS) -> tuple[list[str], list[tuple[str, str, dict]]]:
    """(overrides common to all jobs, rows as (kind, label, summary)) with baselines first."""
    if not jobs:
        return [], []
    common = [o for o in jobs[0]["overrides"] if all(o in j["overrides"] for j in jobs)]
    learned: "OrderedDict[str, list[dict]]" = OrderedDict()
    baselines: "OrderedDict[str, list[dict]]" = OrderedDict()
    for job in jobs:
        trained = job["head"] if job["head"] in job["metrics"] else None
        varying = [o for o in job["overrides"] if o not in common]
        for scorer, metrics in job["metrics"].items():
            if scorer == trained and not _is_fixed(scorer):
                label = " ".join(varying) or scorer
                learned.setdefault(label, []).append(metrics)
            else:
                baselines.setdefault(scorer, []).append(metrics)
    rows = [("baseline", name, _summary(v, columns)) for name, v in baselines.items()]
    learned_rows = [("learned", label, _summary(v, columns)) for label, v in learned.items()]
    key = headline(columns)
    learned_rows.sort(key=lambda r: -np.nan_to_num(r[2][key][0], nan=-1.0))
    return common, rows + learned_rows


def headline(columns=COLUMNS) -> str:
    """The column rows are sorted and charted by: MAP@R (on the held-out rows, for diagnostics)."""
    return "map_at_r" if "map_at_r" in columns else "map_at_r_held_out"


def write_chart(path: Path, title: str, rows: list[tuple[str, str, dict]], columns=COLUMNS) -> Path:
    """PATH.png: one bar per row of the table, its mean MAP@R with the sample std over its jobs as error bar."""
    from cbir_jax.evaluation.figures import bar_chart

    key = headline(columns)
    bars = [(f"{label} (n={s['n']})", *s[key], kind == "learned") for kind, label, s in rows]
    return bar_chart(bars, path, f"{columns[key]} (mean ± sample std over each row's jobs; blue: learned)", title)


def _is_fixed(name: str) -> bool:
    from cbir_jax.scoring import heads

    return name in heads.FIXED_METRICS


def _cell(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "nan"
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def to_markdown(title: str, rows: list[tuple[str, str, dict]], missing: list[Path] = (), columns=COLUMNS) -> str:
    header = "| kind | scorer / overrides | " + " | ".join(columns.values()) + " | n | queries |"
    lines = [f"**{title}**", "", header, "|" + "---|" * (len(columns) + 4)]
    for kind, label, s in rows:
        cells = [_cell(*s[m]) for m in columns]
        queries = "/".join(str(q) for q in s["queries"])
        lines.append(f"| {kind} | {label} | " + " | ".join(cells) + f" | {s['n']} | {queries} |")
    lines += ["", "Mean ± sample std over the n jobs (seeds) of each row; baselines are evaluated in every job."]
    if missing:
        lines.append(f"Jobs without metrics.json (failed or unfinished), left out: {', '.join(p.name for p in missing)}")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[tuple[str, str, dict]], columns=COLUMNS) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "scorer", *(c for m in columns for c in (m, f"{m}_std")), "n", "queries"])
        for kind, label, s in rows:
            values = [f"{v:.6f}" for m in columns for v in s[m]]
            w.writerow([kind, label, *values, s["n"], "/".join(str(q) for q in s["queries"])])


def paired_rows(jobs: list[dict], versus: str) -> list[str]:
    """For each learned row: its MAP@R minus the baseline whose name starts with `versus`, per query
    (seeds averaged per query), with a 95% paired bootstrap interval over queries (significance.py)."""
    from cbir_jax.evaluation.significance import paired_bootstrap

    common = [o for o in jobs[0]["overrides"] if all(o in j["overrides"] for j in jobs)]
    groups: "OrderedDict[str, list[np.ndarray]]" = OrderedDict()
    base: dict[str, np.ndarray] = {}
    for job in jobs:
        path = job["dir"] / "per_query.npz"
        if not path.exists() or job["head"] not in job["metrics"]:
            continue
        with np.load(path) as z:
            names = [n for n in z.files if n.startswith(versus)]
            if not names or job["head"] not in z.files:
                continue
            base.setdefault(names[0], z[names[0]])
            label = " ".join(o for o in job["overrides"] if o not in common) or job["head"]
            groups.setdefault(label, []).append(z[job["head"]])
    if not base:
        return [f"No per_query.npz with a baseline named {versus}* and the learned scorer: no paired comparison."]
    (name, b), = list(base.items())[:1]
    lines = [f"Paired with `{name}` on the same queries (MAP@R, learned − baseline; seeds averaged per query; "
             "95% bootstrap interval over queries, 10,000 resamples):", "",
             "| learned row | n | Δ MAP@R | 95% CI | queries better / worse |", "|---|---|---|---|---|"]
    for label, values in groups.items():
        r = paired_bootstrap(np.mean(values, axis=0), b)
        lines.append(f"| {label} | {len(values)} | {r['diff']:+.4f} | [{r['low']:+.4f}, {r['high']:+.4f}] | {r['wins']} / {r['losses']} |")
    return lines
