"""`dnnlab report DIR`: a table (terminal, CSV, Markdown) and PNG plots of one run or of every run below DIR.

DIR may be a single run directory, a Hydra sweep (DIR/0, DIR/1, ...) or any tree of runs (DIR/name/seed0, ...). A run
is a folder holding `.hydra/` (or, for runs started from Python without Hydra, `summary.json` or `metrics.csv`).
Partial sweeps are fine: runs still going, crashed, not started yet or with a half-written file each get a status
instead of stopping the report.

Written to --out (default DIR): report.csv and report.md (one row per run), report_groups.csv and .md (runs that
differ only by data.fold, trainer.seed or data.seed, as mean ± standard deviation), val_curves.png,
final_metric.png, and for an Optuna study (DIR/optuna_study.json) optuna_history.png and optuna_importances.png.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from dnnlab.errors import ArgumentParser, DnnlabError
from dnnlab.report_plots import MAX_LEGEND, plot_curves, plot_final, series
from dnnlab.report_runs import differing_keys, find_runs, load_run, load_yaml
from dnnlab.report_study import plot_study
from dnnlab.report_tables import REPEAT_KEYS, count_statuses, group_rows, group_runs, metric_column, run_rows, sort_key
from dnnlab.runs import write_table
from dnnlab.ui import console, error

__all__ = ["METRICS", "MAX_LEGEND", "main", "report"]  # MAX_LEGEND: the legend's size, for tests

METRICS = ("val_acc", "val_loss", "test_acc", "test_loss", "train_acc", "train_loss")


def report(root: Path, metric: str = "val_acc", out: Path | None = None) -> dict:
    """Tabulate and plot every run at or below root; returns what was written and the runs (for tests, scripts)."""
    root = Path(root)
    load_yaml.cache_clear()  # the files may have changed since an earlier report in this process
    if not root.exists():
        raise DnnlabError(f"{root} does not exist")
    if not root.is_dir():
        raise DnnlabError(f"{root} is not a directory (give a run or a sweep directory)")
    paths = find_runs(root)
    if not paths:
        raise DnnlabError(f"no runs in {root} (no folder with .hydra/, summary.json or metrics.csv)")
    out = Path(out) if out is not None else root
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DnnlabError(f"cannot create {out}: {e.strerror or e}") from None
    now = time.time()
    runs = [load_run(p, root, now) for p in paths]
    keys = differing_keys(runs)
    for r in runs:
        given = r.overrides or {}
        r.setting = ", ".join(f"{k}={given[k]}" for k in keys if k in given)
        r.label = r.setting or r.name
    runs.sort(key=lambda r: sort_key(r.value(metric), metric))  # stable: ties keep the natural order

    title = f"dnnlab report {root}: {len(runs)} run{'s' * (len(runs) != 1)} ({count_statuses(runs)}), " \
            f"by {metric_column(metric)}"
    rows = run_rows(runs, keys, metric)
    write_table(rows, out / "report", title, keys, [r.setting for r in runs])
    written = [out / "report.csv", out / "report.md"]
    groups = group_runs(runs, keys, metric)
    if groups:
        over = " and ".join(k for k in REPEAT_KEYS if k in keys)
        rows, rest = group_rows(groups, keys, metric), [k for k in keys if k not in REPEAT_KEYS]
        write_table(rows, out / "report_groups", f"{len(groups)} settings: mean ± standard deviation over {over}, "
                                                 f"by {metric}", rest, [g.label for g in groups])
        written += [out / "report_groups.csv", out / "report_groups.md"]
    notes = [f"{r.name}: cannot read {', '.join(r.problems)}" for r in runs if r.problems]
    if plot_curves(series(runs, groups), metric, out / "val_curves.png"):
        written.append(out / "val_curves.png")
    else:
        notes.append("val_curves.png skipped: no run has finished an epoch yet")
    if plot_final(runs, metric, out / "final_metric.png"):
        written.append(out / "final_metric.png")
    else:
        notes.append(f"final_metric.png skipped: no run has a {metric} yet")
    written += plot_study(root, out, notes)
    for note in notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    console.print(f"wrote {', '.join(p.name for p in written)} to {out}", markup=False, highlight=False)
    return {"runs": runs, "keys": keys, "groups": groups, "written": written, "notes": notes}


def main(argv: list[str]) -> None:
    parser = ArgumentParser(
        prog="dnnlab report", description="A table and plots of a run or a sweep directory (runs at any depth).")
    parser.add_argument("dir", type=Path, metavar="DIR", help="a run directory, or a folder holding runs (a sweep)")
    parser.add_argument("--metric", default="val_acc", choices=METRICS, metavar="METRIC",
                        help=f"sort and plot by this: {', '.join(METRICS)} (default val_acc; the best epoch's for "
                             "val_* and train_*; accuracies descending, losses ascending)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="where to write the tables and plots (default: DIR)")
    args = parser.parse_args(argv)
    try:
        report(args.dir, args.metric, args.out)
    except DnnlabError as e:
        error(str(e))
        sys.exit(2)
