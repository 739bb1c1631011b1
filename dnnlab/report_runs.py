"""`dnnlab report`: the runs below a folder, read from disk as they are (finished, running, crashed, half-written).

A run is a folder holding `.hydra/` (or `summary.json` or `metrics.csv`): find_runs() lists them, load_run() reads
one into a Run with a status, and differing_keys() names the overrides that tell the runs apart, filling in the
value a run's config used where it did not override a key.
"""
from __future__ import annotations

import csv
import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from dnnlab import stored
from dnnlab.errors import DnnlabError
from dnnlab.record import read_metrics

CURVES = ("val_acc", "val_loss", "train_acc", "train_loss")  # metrics.csv columns: best over the epochs
BOOKKEEPING = ("trial.",)  # the Optuna sweeper's ++trial.number=N ...: not settings, left out of columns and groups
RUNNING_SECONDS = 600  # metrics.csv touched this recently, no summary.json yet: the run is still going


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


def natural_key(path: str) -> list:
    """'10' after '9', 'seed2' before 'seed10'."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", path)]


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
        overrides = stored.override_values(folder)
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
