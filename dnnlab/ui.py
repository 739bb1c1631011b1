"""Terminal output with rich: the training progress bar, the summary table, tables of rows, one-line errors."""
from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

import rich.progress as rp
from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.segment import Segments
from rich.table import Table

WIDE = 10_000  # the width of output that is not a terminal: a row is as long as it needs
KEEP_WHOLE = 16  # a column whose cells are all this short (numbers, statuses, mean ± std) is never wrapped or cut
NUMBER = re.compile(r"[-+]?(\d[\d,]*\.?\d*(e[-+]?\d+)?|nan|inf)( ± \S+)?%?", re.IGNORECASE)


class _Console(Console):
    """rich's Console, but output that is not a terminal (a file, a pipe, a CI log) is not fitted to a width: rich
    would use 80 columns there, or the size of whichever other stream is a terminal, and wrap every table row into
    a box. A width given, or COLUMNS in the environment, still wins."""

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        if self._width is None and "COLUMNS" not in self._environ and not _is_tty(self.file):
            return ConsoleDimensions(WIDE, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


def _is_tty(file) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError, OSError):  # closed, or not a real file
        return False


console = _Console()
err_console = _Console(stderr=True)


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


def _header(name: str, widest: int) -> str:
    """A header longer than its column's cells, on lines at its spaces: 'best val_acc' over 0.9012 takes 7 columns."""
    longest_word = max(map(cell_len, name.split()), default=0)
    return "\n".join(textwrap.wrap(name, max(widest, longest_word))) if cell_len(name) > widest else name


def _numeric(cells: list[str]) -> bool:
    """Numbers, perhaps with a word among them ('failed', 'n/a'): right-aligned."""
    return any(NUMBER.fullmatch(c) for c in cells) and all(NUMBER.fullmatch(c) or " " not in c for c in cells)


def rows_table(rows: list[dict], narrow: bool = False) -> Table:
    """Rows of text as a table: short columns (numbers, statuses) are kept whole, never cut into '…'; longer text
    wraps; numbers are right-aligned. narrow: headers on lines at their spaces, as narrow as their cells."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    columns = list(rows[0])
    for i, name in enumerate(columns):
        cells = [str(r[name]) for r in rows]
        widest = max(map(cell_len, cells), default=0)
        whole = widest <= KEEP_WHOLE
        numeric = i > 0 and _numeric(cells)
        header = _header(name, widest) if whole and narrow else name
        table.add_column(escape(header), justify="right" if numeric else "left", no_wrap=whole, overflow="fold")
    for r in rows:
        table.add_row(*(escape(str(r[c])) for c in columns))  # values, not rich markup
    return table


def print_rows(rows: list[dict], title: str, moved: Sequence[str] = (), notes: list[str] | None = None) -> None:
    """Print rows as a table. Where it is wider than the terminal, headers go on lines at their spaces, and the
    columns `moved` (a report's overrides, a column each) leave the table: notes[i], their text, is printed under row
    i across the whole width, rather than squeezed into a column a few characters wide."""
    console.print(title, markup=False, highlight=False)  # wrapped at the terminal's width, not the table's
    table = rows_table(rows)
    if console.measure(table, options=console.options.update_width(WIDE)).maximum <= console.width:
        console.print(table)
    elif not moved or notes is None:
        console.print(rows_table(rows, narrow=True))
    else:
        kept = [{c: v for c, v in r.items() if c not in moved} for r in rows]
        if not _print_with_notes(rows_table(kept, narrow=True), notes):
            console.print(rows_table(rows, narrow=True))


def _print_with_notes(table: Table, notes: list[str]) -> bool:
    """The table with notes[i] on lines of its own under row i; False (nothing printed) if its rows cannot be told
    apart. A row starts where its first column (left-aligned, never empty) does."""
    lines = console.render_lines(table, console.options, pad=False, new_lines=True)
    texts = ["".join(s.text for s in line).rstrip() for line in lines]
    rules = [i for i, t in enumerate(texts) if t and set(t) == {"─"}]  # the line under the headers
    starts = [i for i in range(rules[0] + 1, len(lines)) if texts[i][:1].strip()] if rules else []
    if len(starts) != len(notes):
        return False
    ends = starts[1:] + [len(lines)]
    console.print(Segments(s for line in lines[:starts[0]] for s in line), end="")
    for start, end, note in zip(starts, ends, notes):
        console.print(Segments(s for line in lines[start:end] for s in line), end="")
        for text in textwrap.wrap(note, max(console.width - 4, 20), break_on_hyphens=False):
            console.print("    " + text, markup=False, highlight=False, crop=False)
    return True
