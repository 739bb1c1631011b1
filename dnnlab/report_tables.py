"""`dnnlab report`: the rows of its tables (one per run, one per group of repeats), their cells and their order."""
from __future__ import annotations

import math
from dataclasses import dataclass

from dnnlab.report_runs import CURVES, Run
from dnnlab.runs import mean_spread

REPEAT_KEYS = ("data.fold", "trainer.seed", "data.seed")  # runs differing only in these repeat one setting


def fmt(value: float, digits: int = 4) -> str:
    """A table cell: fixed decimals (a tiny loss in scientific notation rather than 0.0000); empty when missing."""
    if math.isnan(value):
        return ""
    return f"{value:.2e}" if digits == 4 and 0 < abs(value) < 1e-3 else f"{value:.{digits}f}"


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
