"""What a run leaves behind: metrics.csv, TensorBoard events, summary.json, environment.json, learning curves."""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from dnnlab.checkpoint import atomic_write
from dnnlab.errors import DnnlabError

COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


class Recorder:
    """Appends one complete metrics row per epoch to metrics.csv and TensorBoard.

    keep_epochs: the epochs already done (a resumed run): metrics.csv keeps exactly those rows (a crash may have
    left one more, written after the last checkpoint) and TensorBoard drops its later events.
    """

    def __init__(self, run_dir: Path, keep_epochs: int = 0):
        self.run_dir = Path(run_dir)
        self.csv_path = self.run_dir / "metrics.csv"
        try:
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            kept = self.csv_path.read_text().splitlines(keepends=True)[1:keep_epochs + 1] if keep_epochs else []
            if len(kept) < keep_epochs:
                raise DnnlabError(f"{self.csv_path} has {len(kept)} rows but the checkpoint {keep_epochs} epochs")
            atomic_write(self.csv_path, ("".join([",".join(COLUMNS) + "\n", *kept])).encode())
        except OSError as e:
            raise DnnlabError(f"cannot write to the run directory {self.run_dir}: {e.strerror or e}") from None
        from torch.utils.tensorboard import SummaryWriter  # imported late: tensorboard is slow to import

        self.tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=keep_epochs + 1 if keep_epochs else None)

    def _append(self, text: str) -> None:
        with open(self.csv_path, "a") as f:  # one write of a whole row, flushed to disk
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def log_epoch(self, row: dict) -> None:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow([row[c] for c in COLUMNS])
        self._append(buffer.getvalue())
        for key in COLUMNS[1:]:
            self.tb.add_scalar(key, row[key], row["epoch"])
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def source_version() -> dict:
    """The git commit of a source checkout of dnnlab, and whether it had uncommitted changes (not for wheels)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / ".git").exists():
        return {"git_commit": None, "git_dirty": None}

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5).stdout

    try:
        return {"git_commit": git("rev-parse", "HEAD").strip() or None,
                "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no").strip())}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


def environment(device: torch.device) -> dict:
    """Everything needed to tell two runs' machines and software apart."""
    return {
        "argv": sys.orig_argv,  # as typed: the CLI rewrites sys.argv for Hydra
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        **source_version(),
        "packages": {p: _version(p) for p in ("dnnlab", "torch", "torchvision", "hydra-core", "omegaconf",
                                              "numpy", "rich", "matplotlib", "tensorboard")},
    }


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed; safe in threads and on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, close: bool = True, **savefig_kwargs) -> None:
    """Render a figure to PNG in memory, close it (unless told not to), then write the bytes atomically (never a
    half-written image)."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", **{"dpi": 100, **savefig_kwargs})
    finally:
        if close:
            pyplot().close(fig)
    atomic_write(path, buffer.getvalue())


class LearningCurves:
    """The book's history plot: loss and accuracy, training against validation, per epoch. One figure, drawn again
    for each run it is given (the jobs of a stack): building a figure and fitting its layout cost more than drawing
    it. So the margins are fixed instead of tight_layout's, wide enough for the tick labels, which scientific
    notation keeps short (0.00012 shows as 1.2 under a 1e-4)."""

    def __init__(self):
        self.fig, self.axes = pyplot().subplots(1, 2, figsize=(10, 4))
        self.fig.subplots_adjust(left=0.08, right=0.985, bottom=0.12, top=0.92, wspace=0.22)
        self.lines = {}
        for ax, metric in zip(self.axes, ("loss", "acc")):
            for split in ("train", "val"):
                self.lines[f"{split}_{metric}"], = ax.plot([], [], "o-", label=f"{split}_{metric}")
            ax.set_xlabel("epoch")
            ax.set_ylabel("accuracy" if metric == "acc" else "cross-entropy")
            ax.grid(True)
            ax.legend()
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))

    def save(self, rows: list[dict], path: Path) -> None:
        epochs = [r["epoch"] for r in rows]
        for key, line in self.lines.items():
            line.set_data(epochs, [r[key] for r in rows])
        for ax in self.axes:
            ax.relim()
            ax.autoscale_view()
        save_figure(self.fig, path, close=False)

    def close(self) -> None:
        pyplot().close(self.fig)


def plot_learning_curves(rows: list[dict], path: Path) -> None:
    curves = LearningCurves()
    try:
        curves.save(rows, path)
    finally:
        curves.close()
