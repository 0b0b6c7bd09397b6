"""`python -m cbir_jax.report outputs/multirun/DATE/TIME [--out PATH] [--chart]` — a multirun as one result table.

Each job folder holds `.hydra/overrides.yaml`, `.hydra/config.yaml` and `metrics.json`
({scorer: {metric: value}}). Rows of the learned head are grouped by the job's overrides minus `seed`
(and `experiment`), as mean ± sample std over the seeds with their count n; the baselines (fixed metrics,
re-rankers), evaluated in every job on the same queries, are reported once each (also as mean ± std over
jobs, so a baseline that is *not* identical across jobs shows a std > 0 rather than hiding it). Overrides
shared by every job go in the title. Writes PATH.md and PATH.csv (default: next to the multirun folder,
named after it), with `--chart` PATH.png (a bar per row: mean MAP@R, error bars the std over its jobs),
prints the markdown, and last the line saying where it wrote.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cbir_jax.evaluation.aggregate import (
    COLUMNS, DIAGNOSTIC_COLUMNS, load_jobs, paired_rows, summarise, to_markdown, write_chart, write_csv,
)
from cbir_jax.runs.cli import print_outputs


def output_stem(multirun: Path, out: Path | None = None) -> Path:
    """Where the table goes, without suffix: OUT, or `<multirun>_report` beside the multirun folder."""
    out = Path(out) if out else Path(multirun).parent / f"{Path(multirun).name}_report"
    return out.with_suffix("") if out.suffix in (".md", ".csv", ".png") else out


def report(
    multirun: Path, out: Path | None = None, diagnostics: bool = False, versus: str | None = None, chart: bool = False
) -> str:
    """Writes OUT.md and OUT.csv (and with `chart` OUT.png) for a multirun folder (its metrics, or its
    diagnostics); returns the markdown. With `versus`, adds the paired comparison of every learned row with
    that baseline."""
    multirun = Path(multirun)
    if not multirun.is_dir():
        raise FileNotFoundError(f"{multirun}: no such multirun folder")
    jobs, missing = load_jobs(multirun, diagnostics)
    if not jobs:
        wanted = "diagnostics.json (train.diagnose=true)" if diagnostics else "metrics.json"
        raise FileNotFoundError(f"{multirun}: no job folder with .hydra/overrides.yaml and {wanted}")
    columns = DIAGNOSTIC_COLUMNS if diagnostics else COLUMNS
    common, rows = summarise(jobs, columns)
    title = f"{multirun.name}: {len(jobs)} jobs" + (f" · {' '.join(common)}" if common else "")
    markdown = to_markdown(title, rows, missing, columns)
    if versus:
        markdown += "\n\n" + "\n".join(paired_rows(jobs, versus))
    out = output_stem(multirun, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown + "\n")
    write_csv(out.with_suffix(".csv"), rows, columns)
    if chart:
        write_chart(out.with_suffix(".png"), title, rows, columns)
    return markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cbir_jax.report", description=__doc__.splitlines()[0])
    parser.add_argument("multirun", type=Path, help="a Hydra multirun folder (outputs/multirun/DATE/TIME)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output path stem; writes STEM.md and STEM.csv (default: MULTIRUN_report beside it)")
    parser.add_argument("--diagnostics", action="store_true", help="tabulate diagnostics.json instead of metrics.json")
    parser.add_argument("--versus", default=None,
                        help="baseline name (prefix, e.g. 'dba_alpha_qe[val') for paired bootstrap intervals")
    parser.add_argument("--chart", action="store_true",
                        help="also draw STEM.png: a bar per row, mean MAP@R with the std over its jobs as error bar")
    args = parser.parse_args(argv)
    try:
        print(report(args.multirun, args.out, args.diagnostics, args.versus, args.chart))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    stem = output_stem(args.multirun, args.out)
    print_outputs(stem.parent.absolute(), [stem.with_suffix(s).name for s in (".md", ".csv") + ((".png",) if args.chart else ())])
    return 0


if __name__ == "__main__":
    sys.exit(main())
