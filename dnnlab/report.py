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

import csv
import functools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from dnnlab import stored
from dnnlab.errors import ArgumentParser, DnnlabError
from dnnlab.record import pyplot, read_metrics, save_figure
from dnnlab.runs import mean_spread, write_table
from dnnlab.ui import console, error

METRICS = ("val_acc", "val_loss", "test_acc", "test_loss", "train_acc", "train_loss")
CURVES = ("val_acc", "val_loss", "train_acc", "train_loss")  # metrics.csv columns: best over the epochs
REPEAT_KEYS = ("data.fold", "trainer.seed", "data.seed")  # runs differing only in these repeat one setting
BOOKKEEPING = ("trial.",)  # the Optuna sweeper's ++trial.number=N ...: not settings, left out of columns and groups
RUNNING_SECONDS = 600  # metrics.csv touched this recently, no summary.json yet: the run is still going
STUDY_FILE = "optuna_study.json"
MAX_LEGEND = 12  # val_curves.png: the best runs get a colour and a legend entry, the others a thin grey line
MAX_BARS = 40  # final_metric.png: the best runs only
MAX_LABEL = 60  # a plot label's line, in characters
MAX_LABEL_LINES = 4  # a label longer than this many lines ends in '…'


@dataclass
class Run:
    path: Path
    name: str  # the path relative to DIR
    overrides: dict[str, str] | None  # None: no readable .hydra/overrides.yaml
    status: str
    summary: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)  # metrics.csv
    problems: list[str] = field(default_factory=list)  # the files that could not be read
    setting: str = ""  # the differing overrides, 'key=value, ...'
    label: str = ""  # the setting, or the run's name where it has none: for legends

    def value(self, metric: str) -> float:
        """The run's metric: for a metrics.csv column the best epoch's (max accuracy, min loss), else summary.json's."""
        if metric in CURVES and self.rows:
            values = [v for v in self.curve(metric)[1] if math.isfinite(v)]
            if values:
                return min(values) if metric.endswith("loss") else max(values)
        return number(self.summary.get(metric))

    def curve(self, metric: str) -> tuple[list[float], list[float]]:
        return [r.get("epoch", math.nan) for r in self.rows], [r.get(metric, math.nan) for r in self.rows]

    @property
    def epochs(self) -> float:
        return number(self.summary.get("epochs")) if "epochs" in self.summary else \
            (len(self.rows) if self.rows else math.nan)

    @property
    def seconds(self) -> float:
        if "train_seconds" in self.summary:
            return number(self.summary["train_seconds"])
        return sum(number(r.get("seconds")) for r in self.rows) if self.rows else math.nan


def number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def fmt(value: float, digits: int = 4) -> str:
    """A table cell: fixed decimals (a tiny loss in scientific notation rather than 0.0000); empty when missing."""
    if math.isnan(value):
        return ""
    return f"{value:.2e}" if digits == 4 and 0 < abs(value) < 1e-3 else f"{value:.{digits}f}"


def natural_key(path: str) -> list:
    """'10' after '9', 'seed2' before 'seed10'."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", path)]


# --- finding and reading runs -----------------------------------------------------------------------------------

def is_run(folder: Path) -> bool:
    return (folder / ".hydra").is_dir() or (folder / "summary.json").is_file() or (folder / "metrics.csv").is_file()


def find_runs(root: Path) -> list[Path]:
    """Every run directory at or below root (a run's own subfolders are not searched), in natural order."""
    found = []
    for here, subdirs, _ in os.walk(root):
        here = Path(here)
        if is_run(here):
            found.append(here)
            subdirs[:] = []
        else:
            subdirs[:] = [d for d in subdirs if not d.startswith(".") and d != "__pycache__"]
    return sorted(found, key=lambda p: natural_key(p.relative_to(root).as_posix()))


def parse_override(text: str) -> tuple[str, str]:
    """'optimizer.lr=0.01' -> ('optimizer.lr', '0.01'); '+key=v' and '++key=v' -> key; '~key' -> (key, 'deleted')."""
    key, _, value = text.partition("=")
    if key.startswith("~"):
        return key[1:], "deleted"
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return key.lstrip("+").strip(), value


def read_overrides(folder: Path) -> dict[str, str] | None:
    items = stored.overrides(folder)
    return None if items is None else dict(parse_override(i) for i in items)


def read_rows(path: Path) -> list[dict]:
    rows = read_metrics(path)
    if rows and not {"epoch", "val_acc"} <= rows[0].keys():
        raise ValueError("no epoch and val_acc columns")
    return rows


def load_run(folder: Path, root: Path, now: float) -> Run:
    """Read what there is; a file that does not parse (half-written, foreign) makes the status 'unreadable'."""
    name = folder.relative_to(root).as_posix() if folder != root else folder.resolve().name
    problems, overrides, summary, rows = [], None, {}, []
    try:
        overrides = read_overrides(folder)
    except (OSError, ValueError, UnicodeDecodeError, DnnlabError) as e:
        problems.append(f".hydra/overrides.yaml ({type(e).__name__})")
    summary_path, metrics_path = folder / "summary.json", folder / "metrics.csv"
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
            if not isinstance(summary, dict):
                raise ValueError("not an object")
        except (OSError, ValueError, UnicodeDecodeError) as e:
            summary = {}
            problems.append(f"summary.json ({type(e).__name__})")
    if metrics_path.is_file():
        try:
            rows = read_rows(metrics_path)
        except (OSError, ValueError, TypeError, KeyError, UnicodeDecodeError, csv.Error) as e:
            problems.append(f"metrics.csv ({type(e).__name__})")
    if problems:
        status = "unreadable"
    elif summary:
        status = str(summary.get("status") or "unknown")
    elif metrics_path.is_file():  # the trainer creates it before the first epoch: the run started
        status = "running" if now - metrics_path.stat().st_mtime < RUNNING_SECONDS else "crashed"
    else:
        status = "not started"
    return Run(folder, name, overrides, status, summary, rows, problems)


@functools.lru_cache(maxsize=None)
def load_yaml(path: Path):
    """A .hydra file as an OmegaConf config (interpolations unresolved), or None if absent or unreadable; read as
    data (dnnlab.stored: bounded, no YAML aliases), as a folder may come from anyone."""
    try:
        return OmegaConf.create(stored.read_mapping(path))
    except Exception:  # missing, half-written, not YAML
        return None


def config_value(folder: Path, key: str) -> str | None:
    """The value a run used for a key it did not override: its config group choice or its composed config's."""
    hydra_cfg = load_yaml(folder / ".hydra" / "hydra.yaml")
    choices = OmegaConf.select(hydra_cfg, "hydra.runtime.choices", default=None) if hydra_cfg is not None else None
    if choices is not None and key in choices:
        return yaml_text(choices[key])
    cfg = load_yaml(folder / ".hydra" / "config.yaml")
    if cfg is None:
        return None
    try:
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    except Exception:  # a key that is not a valid path
        return None
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=False)
    return yaml_text(value)


def yaml_text(value) -> str:
    """As an override would spell it: null, true, [l2,dropout]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(yaml_text(v) for v in value) + "]"
    return str(value)


def differing_keys(runs: list[Run]) -> list[str]:
    """Override keys whose value is not the same in every run (a run without the key counts with its config's
    value for it). Keys in first-seen order. Fills the missing values in."""
    known = [r for r in runs if r.overrides is not None]
    keys = list(dict.fromkeys(k for r in known for k in r.overrides if not k.startswith(BOOKKEEPING)))
    for key in keys:
        if any(key not in r.overrides for r in known):
            for r in known:
                if key not in r.overrides:
                    value = config_value(r.path, key)
                    if value is not None:
                        r.overrides[key] = value
    return [k for k in keys if len({r.overrides.get(k) for r in known}) > 1]


# --- tables ----------------------------------------------------------------------------------------------------

def descending(metric: str) -> bool:
    return not metric.endswith("loss")


def sort_key(value: float, metric: str) -> tuple:
    if math.isnan(value):
        return (1, 0.0)
    return (0, -value if descending(metric) else value)


def metric_column(metric: str) -> str:
    return f"best {metric}" if metric in CURVES else metric


def run_rows(runs: list[Run], keys: list[str], metric: str) -> list[dict]:
    rows = []
    for r in runs:
        row = {"run": r.name}
        row.update({k: (r.overrides or {}).get(k, "") for k in keys})
        row["status"] = r.status
        row["best val_acc"] = fmt(r.value("val_acc"))
        row["test_acc"] = fmt(r.value("test_acc"))
        if metric not in ("val_acc", "test_acc"):
            row[metric_column(metric)] = fmt(r.value(metric))
        row["epochs"] = "" if math.isnan(r.epochs) else str(int(r.epochs))
        row["seconds"] = fmt(r.seconds, 2)
        rows.append(row)
    return rows


@dataclass
class Group:
    """Runs that differ only in REPEAT_KEYS (or one run on its own)."""
    label: str
    runs: list[Run]

    def mean(self, metric: str) -> float:
        return finite_mean([r.value(metric) for r in self.runs])


def finite_mean(values: list[float]) -> float:
    values = [v for v in values if math.isfinite(v)]
    return mean_spread(values)[0] if values else math.nan


def group_runs(runs: list[Run], keys: list[str], metric: str) -> list[Group] | None:
    """Runs whose overrides differ only in REPEAT_KEYS, together, best mean first; None when nothing groups."""
    if not any(k in REPEAT_KEYS for k in keys):
        return None
    rest = [k for k in keys if k not in REPEAT_KEYS]
    buckets: dict[tuple, Group] = {}
    for r in runs:
        if r.overrides is None:  # nothing says what it repeats: a run without .hydra stands alone
            key, label = ("run", r.name), r.name
        else:
            key = ("setting", *(r.overrides.get(k) for k in rest))
            label = ", ".join(f"{k}={r.overrides[k]}" for k in rest if k in r.overrides) or "all runs"
        buckets.setdefault(key, Group(label, [])).runs.append(r)
    groups = list(buckets.values())
    if all(len(g.runs) == 1 for g in groups):
        return None
    return sorted(groups, key=lambda g: sort_key(g.mean(metric), metric))


def spread(values: list[float], digits: int = 4) -> str:
    """'mean ± sample std' of the finite values; the value alone if there is one."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return ""
    mean, std = mean_spread(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def count_statuses(runs: list[Run]) -> str:
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def group_rows(groups: list[Group], keys: list[str], metric: str) -> list[dict]:
    rest = [k for k in keys if k not in REPEAT_KEYS]
    rows = []
    for g in groups:
        first = g.runs[0]
        if not rest:
            row = {"group": g.label}
        elif first.overrides is None:
            row = {k: (first.name if i == 0 else "") for i, k in enumerate(rest)}
        else:
            row = {k: first.overrides.get(k, "") for k in rest}
        row["n"] = str(len(g.runs))
        row["status"] = count_statuses(g.runs)
        row["best val_acc"] = spread([r.value("val_acc") for r in g.runs])
        row["test_acc"] = spread([r.value("test_acc") for r in g.runs])
        if metric not in ("val_acc", "test_acc"):
            row[metric_column(metric)] = spread([r.value(metric) for r in g.runs])
        row["epochs"] = fmt(finite_mean([r.epochs for r in g.runs]), 1)
        row["seconds"] = fmt(finite_mean([r.seconds for r in g.runs]), 2)
        rows.append(row)
    return rows


# --- plots -----------------------------------------------------------------------------------------------------

def short(text: str, limit: int = MAX_LABEL) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def wrapped(text: str, status: str = "completed") -> str:
    """A plot label on lines of MAX_LABEL characters, broken at the spaces between overrides, so that the legend
    and bar labels of a sweep of many overrides keep most of them; a status other than completed always shows."""
    lines = textwrap.wrap(text, MAX_LABEL, max_lines=MAX_LABEL_LINES, placeholder=" …", break_on_hyphens=False)
    return "\n".join(lines or [text]) + ("" if status == "completed" else f" [{status}]")


def legend_label(r: Run) -> str:
    return wrapped(r.label, r.status)


def series(runs: list[Run], groups: list[Group] | None) -> list[tuple[str, list[Run]]]:
    """What gets one colour and one legend entry, best first: each run, or each group of repeats."""
    if groups:
        return [(wrapped(g.label) + (f" ({len(g.runs)} runs)" if len(g.runs) > 1 else ""), g.runs) for g in groups]
    return [(legend_label(r), [r]) for r in runs]


def plot_curves(lines: list[tuple[str, list[Run]]], metric: str, path: Path) -> bool:
    """Every run's validation curve. The best MAX_LEGEND series (runs, or groups of repeats drawn in one colour) get
    a colour and a legend entry; the rest are thin grey lines, so a large sweep stays readable."""
    curve = metric if metric in CURVES else ("val_loss" if metric.endswith("loss") else "val_acc")

    def has_curve(r: Run) -> bool:
        return any(math.isfinite(v) for v in r.curve(curve)[1])

    lines = [(label, [r for r in runs if has_curve(r)]) for label, runs in lines]
    lines = [(label, runs) for label, runs in lines if runs]
    if not lines:
        return False
    plt = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    shown, others = lines[:MAX_LEGEND], lines[MAX_LEGEND:]
    n_runs = sum(len(runs) for _, runs in lines)
    many_epochs = max(len(r.rows) for _, runs in lines for r in runs) > 30
    fig, ax = plt.subplots(figsize=(10, 5))
    for _, runs in others:
        for r in runs:
            ax.plot(*r.curve(curve), color="0.7", lw=0.8, zorder=1)
    colours = plt.get_cmap("tab10" if len(shown) <= 10 else "tab20")
    handles = []
    for i, (label, runs) in enumerate(shown):
        style = {"color": colours(i), "ls": "-" if i < 10 else "--", "marker": None if many_epochs else "o",
                 "ms": 3, "lw": 1.6 if len(runs) == 1 else 1.0}
        for r in runs:
            ax.plot(*r.curve(curve), zorder=2, **style)
        handles.append(Line2D([], [], label=label, **style))
    if others:
        n_other = sum(len(runs) for _, runs in others)
        handles.append(Line2D([], [], color="0.7", lw=0.8, label=f"{n_other} more run{'s' * (n_other != 1)}"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False,
              title=f"best first by {metric}", title_fontsize="small")
    ax.set_xlabel("epoch")
    ax.set_ylabel(curve)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.4)
    ax.set_title(f"{curve} per epoch, {n_runs} run{'s' * (n_runs != 1)}")
    save_figure(fig, path, bbox_inches="tight")
    return True


def plot_final(runs: list[Run], metric: str, path: Path) -> bool:
    """A horizontal bar per run, best at the top, values written on the bars; runs that have not completed (still
    running, crashed, ...) in grey with their status."""
    valued = [(r, r.value(metric)) for r in runs if math.isfinite(r.value(metric))]
    if not valued:
        return False
    plt = pyplot()
    shown = valued[:MAX_BARS]
    labels = [wrapped(r.name if r.label == r.name else f"{r.name}: {r.label}", r.status) for r, _ in shown]
    lines = max(label.count("\n") + 1 for label in labels)  # a bar as tall as its label
    fig, ax = plt.subplots(figsize=(9, 1.2 + (0.32 + 0.14 * (lines - 1)) * len(shown)))
    bars = ax.barh(range(len(shown)), [v for _, v in shown],
                   color=["tab:blue" if r.status == "completed" else "0.65" for r, _ in shown])
    ax.bar_label(bars, fmt="%.4f", padding=3, fontsize="small")
    ax.set_yticks(range(len(shown)), labels, fontsize="small")
    ax.invert_yaxis()
    top = max(v for _, v in shown)
    if top > 0:
        ax.set_xlim(0, top * 1.15)
    ax.set_xlabel(metric_column(metric))
    ax.grid(True, axis="x", alpha=0.4)
    title = f"{metric_column(metric)} per run, best first"
    if len(valued) > len(shown):
        title += f" (the best {len(shown)} of {len(valued)})"
    if len(valued) < len(runs):
        title += f"; {len(runs) - len(valued)} without a value left out"
    ax.set_title(title, fontsize="medium")
    save_figure(fig, path, bbox_inches="tight")
    return True


def open_storage(storage: str, base: Path, scratch: Path):
    """The study's storage, opened as the sweeper opens it (dnnlab.trial.open_storage): a database URL, or a journal
    file (a relative path is looked up beside optuna_study.json, then in the working directory). Nothing is
    created: a missing file is an error, and a read-only journal is read from a copy."""
    from dnnlab import trial

    def locate(text: str) -> Path:
        path = Path(text).expanduser()
        for candidate in ([path] if path.is_absolute() else [base / path, Path.cwd() / path]):
            if candidate.is_file():
                return candidate
        raise DnnlabError(f"the study's storage {text} is not there")

    if trial.is_url(storage):
        if storage.startswith("sqlite:///"):  # SQLAlchemy would create an empty database file
            storage = f"sqlite:///{locate(storage[len('sqlite:///'):])}"
        return trial.open_storage(storage)
    path = locate(storage)
    if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK):  # the backend opens it for appending
        path = Path(shutil.copy(path, scratch / path.name))
    return trial.open_storage(str(path))


def optuna_figures(study, trials, target, target_name: str, out: Path, notes: list[str]) -> list[Path]:
    """The optimisation history (`target`: None, or the objective to show), and the parameter importances when
    there is something to compare."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    plt = pyplot()
    written = []
    path = out / "optuna_history.png"
    try:
        ax = ovm.plot_optimization_history(study, target=target, target_name=target_name)
        save_figure(ax.figure, path, bbox_inches="tight")
        written.append(path)
    except (ValueError, RuntimeError) as e:
        plt.close("all")
        notes.append(f"optuna_history.png skipped: {e}")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    varying = [p for p in dict.fromkeys(k for t in complete for k in t.params)
               if len({repr(t.params.get(p)) for t in complete}) > 1]
    if len(complete) < 2 or not varying:
        notes.append(f"optuna_importances.png skipped: it needs at least 2 completed trials whose parameters "
                     f"vary (the study has {len(complete)} completed"
                     f"{', all with the same parameters' if len(complete) >= 2 else ''})")
        return written
    path = out / "optuna_importances.png"
    try:
        importance_target = None
        if target is not None:  # PED-ANOVA takes a custom target as lower-is-better: flip a maximised objective
            sign = -1.0 if study.directions[0] == StudyDirection.MAXIMIZE else 1.0
            importance_target = lambda t: sign * t.values[0]  # noqa: E731
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*importances of params to achieve low")
            ax = ovm.plot_param_importances(study, target=importance_target, target_name=target_name)
        save_figure(ax.figure, path, bbox_inches="tight")
        written.append(path)
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
        plt.close("all")
        notes.append(f"optuna_importances.png skipped: {e}")
    return written


def plot_study(root: Path, out: Path, notes: list[str]) -> list[Path]:
    """optuna_history.png and optuna_importances.png of the study that DIR/optuna_study.json names."""
    spec_path = root / STUDY_FILE
    if not spec_path.is_file():
        return []
    try:
        import optuna
    except ImportError:
        notes.append("no Optuna plots: they need dnnlab's optional packages 'optuna' "
                     "(pip install 'dnnlab[optuna]')")
        return []

    plt = pyplot()  # the Agg backend before optuna imports pyplot
    written = []
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                spec = json.loads(spec_path.read_text())
                storage = open_storage(str(spec["storage"]), root, Path(scratch))
                names = optuna.get_all_study_names(storage)
                if spec["study_name"] not in names:
                    raise DnnlabError(f"no study {spec['study_name']!r} in {spec['storage']} (it holds "
                                      f"{', '.join(map(repr, names)) or 'none'})")
                study = optuna.load_study(study_name=spec["study_name"], storage=storage)
                trials = study.get_trials(deepcopy=False)
            except DnnlabError as e:
                notes.append(f"no Optuna plots: {e}")
                return []
            except Exception as e:  # corrupt JSON, unknown study, unreachable database, ...
                notes.append(f"no Optuna plots: cannot open the study of {STUDY_FILE} "
                             f"({type(e).__name__}: {short(str(e).splitlines()[0] if str(e) else '', 120)})")
                return []
            if not trials:
                notes.append(f"no Optuna plots: study {spec['study_name']!r} has no trials yet")
                return []
            target = None if len(study.directions) == 1 else (lambda t: t.values[0])  # multi-objective: the first
            target_name = str(spec.get("metric") or spec.get("objective") or "objective value")
            with plt.rc_context():  # optuna's plots switch to the ggplot style: keep that out of later figures
                written += optuna_figures(study, trials, target, target_name, out, notes)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return written


# --- the command -----------------------------------------------------------------------------------------------

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
