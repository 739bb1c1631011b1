"""What a run leaves behind: metrics.csv, TensorBoard events, summary.json, environment.json, learning curves."""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import platform
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dnnlab import stored
from dnnlab.checkpoint import atomic_write
from dnnlab.errors import DnnlabError

COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")
LR_POINTS_PER_EPOCH = 100  # per-step learning rates kept: ~5 kB of TensorBoard events per epoch at most
UNSHOWN = ("hydra", "trainer.progress")  # overrides that change no result: not in the title (nor in HParams)
TITLE_WIDTH, TITLE_LINES = 150, 3  # learning_curves.png's title: characters per line at 11 pt, lines at most


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


class Recorder:
    """Appends one complete metrics row per epoch to metrics.csv and TensorBoard (tensorboard/, by epoch), and the
    learning rate per training step to TensorBoard (tensorboard/steps/, by step: another folder, so that resuming
    purges each by its own count) and to `lr_steps`, for the learning-curve plot.

    keep_epochs: the epochs already done (a resumed run): metrics.csv keeps exactly those rows (a crash may have
    left one more, written after the last checkpoint) and TensorBoard drops its later events. keep_steps: the
    training steps already done; the per-step learning rates before it are read back from TensorBoard.
    """

    def __init__(self, run_dir: Path, keep_epochs: int = 0, keep_steps: int | None = None):
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
        self.steps_dir, self.keep_steps, self._steps_tb = self.run_dir / "tensorboard" / "steps", keep_steps, None
        self.lr_steps: list[tuple[int, float]] = [] if keep_steps is None else \
            [(s, v) for s, v in read_scalars(self.steps_dir, "lr") if s < keep_steps]

    @property
    def steps_tb(self):
        """The TensorBoard writer of per-step scalars, made on first use (a run that logs none gets no folder)."""
        if self._steps_tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._steps_tb = SummaryWriter(log_dir=str(self.steps_dir), purge_step=self.keep_steps)
        return self._steps_tb

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
            if key != "lr":  # TensorBoard's "lr" is the per-step one (log_lr): one x axis per chart
                self.tb.add_scalar(key, row[key], row["epoch"])
        self.tb.flush()

    def log_lr(self, lr: Callable[[int], float], start: int, end: int, offset: int = 0) -> None:
        """The learning rate of an epoch's steps start..end-1, at most about LR_POINTS_PER_EPOCH of them (evenly
        spaced, and the last), at the run's step offset + t. `lr` is the schedule's closed form lr(t): called after
        the epoch, before the schedule's end_epoch, it gives the rates the steps used without the training loop
        keeping any."""
        every = max(1, math.ceil((end - start) / LR_POINTS_PER_EPOCH))
        steps = list(range(start, end, every))
        if steps and steps[-1] != end - 1:
            steps.append(end - 1)
        for t in steps:
            value = float(np.float32(lr(t)))  # as TensorBoard keeps it: a resumed run's plot reads the earlier back
            self.steps_tb.add_scalar("lr", value, offset + t)
            self.lr_steps.append((offset + t, value))
        self.steps_tb.flush()

    def plot(self, rows: list[dict], cfg: DictConfig, steps_per_epoch: int, best_epoch: int | None,
             curves: LearningCurves | None = None) -> None:
        """learning_curves.png: titled with the run's folder and settings, the learning rate per step beside the
        epochs' metrics (x = epochs done: the last step of epoch e at e), the best epoch marked. `curves`: a figure
        to draw into again (a stack's jobs share one)."""
        lr = ([(s + 1) / steps_per_epoch for s, _ in self.lr_steps], [v for _, v in self.lr_steps]) \
            if self.lr_steps else None
        figure = curves or LearningCurves()
        try:
            figure.save(rows, self.run_dir / "learning_curves.png", title=run_title(cfg, self.run_dir), lr=lr,
                        best_epoch=best_epoch)
        finally:
            if curves is None:
                figure.close()

    def close(self) -> None:
        self.tb.close()
        if self._steps_tb is not None:
            self._steps_tb.close()


def read_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every `tag` event in a TensorBoard folder, events purged by a resumed writer left out."""
    if not folder.is_dir():
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: every event, not a sample
    quiet = logging.getLogger("tensorboard")  # it warns of each purge it applies, which resuming expects
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        events.Reload()
    finally:
        quiet.setLevel(level)
    if tag not in events.Tags()["scalars"]:
        return []
    return sorted((e.step, e.value) for e in events.Scalars(tag))


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


def _overrides(run_dir: Path) -> list[str]:
    """The overrides the run was started with (.hydra/overrides.yaml, where Hydra wrote one), UNSHOWN left out."""
    try:
        items = stored.overrides(run_dir) or []
    except (OSError, ValueError, DnnlabError):
        return []
    return [i for i in items if not i.lstrip("+~").startswith(UNSHOWN)]


def run_title(cfg: DictConfig, run_dir: Path) -> str:
    """Which run a plot shows: its folder (the path's last three parts), its main settings, then the overrides it
    was started with, wrapped (at most TITLE_LINES lines in all)."""
    def name(key: str) -> str:
        return str(OmegaConf.select(cfg, key, default="?")).rsplit(".", 1)[-1]

    def wrap(text: str) -> list[str]:
        return textwrap.wrap(text, TITLE_WIDTH, break_on_hyphens=False)

    lr = OmegaConf.select(cfg, "optimizer.lr")
    optimizer = name("optimizer._target_") + (f" lr={lr:g}" if isinstance(lr, (int, float)) else "")
    settings = [str(OmegaConf.select(cfg, "data.name", default="?")), optimizer,
                f"schedule {name('schedule._target_')}", f"batch {OmegaConf.select(cfg, 'trainer.batch_size')}"]
    lines = wrap(f"{'/'.join(Path(run_dir).absolute().parts[-3:])}:  {', '.join(settings)}")[:TITLE_LINES - 1]
    overrides, room = wrap(" ".join(_overrides(run_dir))), TITLE_LINES - len(lines)
    if len(overrides) > room:  # the whole list is in .hydra/overrides.yaml
        more = " and more (.hydra/overrides.yaml)"
        overrides = overrides[:room]
        overrides[-1] = overrides[-1][:TITLE_WIDTH - len(more)].rsplit(" ", 1)[0] + more
    return "\n".join(lines + overrides)


class LearningCurves:
    """The book's history plot, loss and accuracy per epoch (training against validation), with the learning
    rate per step beside them, the best epoch marked and the run named above. One figure, drawn again for each run
    it is given (the jobs of a stack): building a figure and fitting its layout cost more than drawing it. So the
    margins are fixed instead of tight_layout's, wide enough for the tick labels, which scientific notation keeps
    short (0.00012 shows as 1.2 under a 1e-4); only the top one follows the title's lines."""

    def __init__(self):
        from matplotlib.ticker import MaxNLocator

        self.fig, self.axes = pyplot().subplots(1, 3, figsize=(15, 4.8))
        self.fig.subplots_adjust(left=0.05, right=0.99, bottom=0.11, wspace=0.2)
        self.lines, self.best_lines, self.best_points = {}, [], []
        titles = ("loss", "accuracy", "learning rate (per training step)")
        ylabels = ("cross-entropy", "accuracy", "learning rate")
        for ax, title, ylabel in zip(self.axes, titles, ylabels):
            ax.set_title(title, fontsize=11)
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no 1.5 ticks
            ax.grid(True, alpha=0.5)
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
            self.best_lines.append(ax.axvline(0, color="0.35", ls="--", lw=1, zorder=1))
        for ax, metric in zip(self.axes, ("loss", "acc")):
            for split in ("train", "val"):
                self.lines[f"{split}_{metric}"], = ax.plot([], [], "o-", ms=4, label=f"{split}_{metric}")
            point, = ax.plot([], [], "*", ms=15, color=self.lines[f"val_{metric}"].get_color(), mec="k", zorder=3)
            self.best_points.append(point)
        self.lines["lr"], = self.axes[2].plot([], [], "-", color="tab:green", lw=1.5, label="lr")

    def draw(self, rows: list[dict], title: str = "", lr: tuple[list[float], list[float]] | None = None,
             best_epoch: int | None = None):
        """The figure for these epochs' rows; lr: (epochs done, rate) per logged step, else the rows' lr column."""
        epochs = [r["epoch"] for r in rows]
        for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
            self.lines[key].set_data(epochs, [r[key] for r in rows])
        if lr is None:  # no per-step record (pretraining): the rate at each epoch's end
            lr = (epochs, [r.get("lr", math.nan) for r in rows])
        self.lines["lr"].set_data(*lr)
        self.lines["lr"].set_marker("o" if lr[0] == epochs else "")
        best = next((r for r in rows if r["epoch"] == best_epoch), None)
        for line in self.best_lines:
            line.set_visible(best is not None)
            line.set_xdata([best_epoch, best_epoch] if best else [0, 0])
            line.set_label(f"best epoch ({best_epoch})" if best else "_best")
        for point, key in zip(self.best_points, ("val_loss", "val_acc")):
            point.set_data(*(([best_epoch], [best[key]]) if best else ([], [])))
        for ax in self.axes:
            ax.relim(visible_only=True)  # the hidden best-epoch line at 0 would stretch the axis
            ax.autoscale_view()
            ax.legend(loc="best", fontsize=9)
        self.axes[2].set_ylim(bottom=0, auto=True)  # a rate from 0: a constant one is a flat line, not noise
        self.fig.suptitle(title, fontsize=11)
        lines = title.count("\n") + 1 if title else 0  # 0.2 in each, above the axes' titles (0.45 in with margin)
        self.fig.subplots_adjust(top=1 - (0.45 + 0.2 * lines) / self.fig.get_figheight())
        return self.fig

    def save(self, rows: list[dict], path: Path, **kwargs) -> None:
        save_figure(self.draw(rows, **kwargs), path, close=False)

    def close(self) -> None:
        pyplot().close(self.fig)


def plot_learning_curves(rows: list[dict], path: Path, **kwargs) -> None:
    """learning_curves.png for these rows; kwargs: LearningCurves.draw's title, lr and best_epoch."""
    curves = LearningCurves()
    try:
        curves.save(rows, path, **kwargs)
    finally:
        curves.close()
