"""Running configured jobs from Python (scripts, comparisons) and tabulating their results."""
from __future__ import annotations

import csv
import io
import re
import statistics
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from dnnlab import CONF_DIR, conf_dirs  # noqa: F401  conf_dirs: what composing needs
from dnnlab.checkpoint import atomic_write
from dnnlab.ui import print_rows


def compose_config(overrides: list[str], name: str = "train") -> DictConfig:
    """The same config `dnnlab train OVERRIDES` would get (name="pretrain_app": `dnnlab pretrain`)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def run(overrides: list[str], run_dir: Path) -> dict:
    """Train one job through the normal code path; returns its summary."""
    from dnnlab.trainer import train

    return train(compose_config(overrides), Path(run_dir))


def run_pretrain(overrides: list[str], run_dir: Path) -> dict:
    from dnnlab.pretrain import pretrain

    return pretrain(compose_config(overrides, "pretrain_app"), Path(run_dir))


def slug(name: str) -> str:
    """A folder name for a row of a comparison: 'unfreeze the top two' -> 'unfreeze_the_top_two'."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def write_table(rows: list[dict], stem: Path, title: str, moved: Sequence[str] = (),
                notes: list[str] | None = None) -> None:
    """Print rows as a rich table (for `moved` and `notes`, where the terminal is too narrow: ui.print_rows) and
    write them to STEM.csv and STEM.md."""
    columns = list(rows[0])
    print_rows(rows, title, moved, notes)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(stem.with_suffix(".csv"), buffer.getvalue().encode())
    lines = [f"# {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    atomic_write(stem.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
