"""`dnnlab report`: its matplotlib figures of the runs, val_curves.png and final_metric.png, and their labels."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

from dnnlab.record import pyplot, save_figure
from dnnlab.report_runs import CURVES, Run
from dnnlab.report_tables import Group, metric_column

MAX_LEGEND = 12  # val_curves.png: the best runs get a colour and a legend entry, the others a thin grey line
MAX_BARS = 40  # final_metric.png: the best runs only
MAX_LABEL = 60  # a plot label's line, in characters
MAX_LABEL_LINES = 4  # a label longer than this many lines ends in '…'


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
