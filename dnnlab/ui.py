"""Terminal output with rich: the training progress bar, the summary table, one-line errors."""
from __future__ import annotations

from pathlib import Path

import rich.progress as rp
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def error(message: str) -> None:
    # the message is text, not markup: Hydra's hints hold [brackets] that rich would take as tags
    err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)


class Progress:
    """Epochs and the steps of the current epoch; updated every few steps so it costs nothing in the hot loop."""

    def __init__(self, epochs: int, steps: int, enabled: bool = True):
        self.steps = steps
        self.bar = rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                               rp.TimeElapsedColumn(), rp.TextColumn("{task.fields[metrics]}"),
                               console=console, disable=not enabled, transient=False)
        self.epochs_task = self.bar.add_task("epochs", total=epochs, metrics="")
        self.steps_task = self.bar.add_task("steps", total=steps, metrics="")

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.remove_task(self.steps_task)  # leave only the epochs line on screen
        return self.bar.__exit__(*exc)

    def step(self, i: int) -> None:
        self.bar.update(self.steps_task, completed=i)

    def epoch(self, row: dict) -> None:
        self.bar.update(self.steps_task, completed=self.steps)
        self.bar.update(self.epochs_task, completed=row["epoch"],
                        metrics=f"loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} "
                                f"val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.4f}")
        self.bar.reset(self.steps_task, total=self.steps)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def print_summary(summary: dict, run_dir: Path) -> None:
    table = Table(title="dnnlab run", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key in ("status", "reason", "epochs", "best_epoch", "val_acc", "val_loss", "last_val_acc", "last_val_loss",
                "test_epoch", "test_acc", "test_loss", "train_seconds", "seconds_per_epoch", "n_params", "device",
                "threads"):
        if summary.get(key) is not None:
            table.add_row(key, _fmt(summary[key]))
    table.add_row("run dir", str(run_dir))
    console.print(table)
