"""`dnnlab diagnose`'s output (dnnlab.diagnose computes what these draw): profile.csv, activations.png,
gradients.png, profile.png, steps.png and the profile printed as a table."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
from rich import box
from rich.table import Table

from dnnlab.checkpoint import atomic_write
from dnnlab.record import pyplot, save_figure
from dnnlab.ui import console

ACT_COLUMNS = 3  # activations.png: panels per row (a 10-layer network: a 3 x 4 grid, not a 1600 x 260 strip)
PROFILE = ("act_mean", "act_std", "saturated", "dead", "grad_norm", "grad_rms")  # diagnose.probe's, per layer


def write_plots_and_tables(run_dir: Path, layers, history: list[dict], losses: list[float], init, final, steps: int,
                           max_panels: int) -> None:
    """profile.csv, the four plots and the printed profile; `init` and `final` are probe()'s (rows, activations)
    at step 0 and after `steps` steps."""
    (init_rows, init_acts), (final_rows, final_acts) = init, final
    write_profile(run_dir / "profile.csv", init_rows, final_rows, steps)
    saturating = any(not math.isnan(r["saturated"]) for r in init_rows)  # sigmoid, tanh
    plot_activations(layers, init_acts, final_acts, steps, max_panels, run_dir / "activations.png")
    sizes = {layer.name: layer.weight.numel() for layer in layers}
    plot_gradients(history, sizes, init_rows, final_rows, steps, run_dir / "gradients.png")
    plot_profile(init_rows, final_rows, steps, saturating, run_dir / "profile.png")
    plot_steps(history, losses, saturating, run_dir / "steps.png")
    print_profile(init_rows, final_rows, steps, saturating, max_panels)


def write_profile(path: Path, init_rows: list[dict], final_rows: list[dict], steps: int) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("step", "layer", "depth") + PROFILE)
    for step, rows in ((0, init_rows), (steps, final_rows)):
        for r in rows:
            writer.writerow([step, r["layer"], r["depth"]] + ["" if math.isnan(r[k]) else repr(r[k]) for k in PROFILE])
    atomic_write(path, buffer.getvalue().encode())


def spread(n: int, k: int) -> list[int]:
    """k indices evenly spread over range(n), first and last included."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [n - 1]


def _fmt(v: float) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return f"{v:.1e}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e3) else f"{v:.3f}"


def print_profile(init_rows, final_rows, steps, saturating, max_rows) -> None:
    frac = _fraction(saturating)
    short = "sat" if saturating else "dead"
    table = Table(title=f"hidden layers on the probe batch at initialisation (0) and after N = {steps} steps",
                  title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False,
                  collapse_padding=True)
    for c in ("layer", "mean 0", "std 0", f"{short} 0", "grad 0", "mean N", "std N", f"{short} N", "grad N"):
        table.add_column(c, justify="right")
    for i in spread(len(init_rows), max(max_rows, 2) * 2):
        a, b = init_rows[i], final_rows[i]
        table.add_row(str(a["depth"]), *(_fmt(r[k]) for r in (a, b) for k in ("act_mean", "act_std", frac, "grad_rms")))
    table.caption = "grad: RMS gradient per weight, ‖∂loss/∂W‖ / √(number of weights)"
    table.caption_justify = "left"
    console.print(table)


def _fraction(saturating: bool) -> str:
    """The fraction the tables and plots show: saturated outputs for sigmoid/tanh (whose saturated column is not
    NaN), dead units otherwise."""
    return "saturated" if saturating else "dead"


def _depth_colors(plt, n: int):
    cmap = plt.get_cmap("viridis")
    return [cmap(i / max(1, n - 1)) for i in range(n)]


def _layer_legend(plt, fig, ax, n: int) -> None:
    """A legend for a few layers, a depth colour bar for many."""
    if n == 0:
        return
    if n <= 10:
        ax.legend(fontsize="small", ncol=2)
    else:
        sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(1, n))
        fig.colorbar(sm, ax=ax, label="hidden layer (depth)")


def _by_layer(history: list[dict]) -> dict[str, tuple[list[int], dict[str, list[float]]]]:
    out: dict[str, tuple[list[int], dict[str, list[float]]]] = {}
    for r in history:
        steps, vals = out.setdefault(r["layer"], ([], {}))
        steps.append(r["step"])
        for k, v in r.items():
            if k not in ("step", "layer"):
                vals.setdefault(k, []).append(v)
    return out


def _positive(values: list[float]) -> list[float]:
    """For log axes: non-positive values as NaN (not plotted)."""
    return [v if v > 0 else math.nan for v in values]


def _plot_probes(ax, init_rows, final_rows, steps, key: str, values=list) -> None:
    """`key` across depth on the probe batch: a line at step 0 and one after `steps` steps (`values`: what of the
    column is drawn, _positive on a log axis)."""
    depth = [r["depth"] for r in init_rows]
    for rows, label, marker in ((init_rows, "step 0 (initialisation)", "o-"),
                                (final_rows, f"after {steps} steps", "s-")):
        ax.plot(depth, values([r[key] for r in rows]), marker, ms=3, label=label)


def _stats(v: np.ndarray | None) -> tuple[float, float]:
    return (float(np.mean(v)), float(np.std(v))) if v is not None and v.size else (math.nan, math.nan)


def activations_figure(layers, init_acts, final_acts, steps, max_panels):
    """Histograms of each (selected) layer's activations on the probe batch, step 0 against the end: a grid of
    panels at most ACT_COLUMNS wide, every text at 9 pt or more (readable at 100 dpi)."""
    plt = pyplot()
    chosen = [layers[i] for i in spread(len(layers), max_panels)]
    cols = min(ACT_COLUMNS, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 1.0 + 2.9 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(chosen):]:
        ax.axis("off")
    for ax, layer in zip(axes.flat, chosen):
        values = [None if acts.get(layer.name) is None else acts[layer.name].flatten().numpy()
                  for acts in (init_acts, final_acts)]
        values = [None if v is None else v[np.isfinite(v)] for v in values]
        both = np.concatenate([v for v in values if v is not None] or [np.zeros(1)])
        lo, hi = np.percentile(both, [0.5, 99.5]) if both.size else (0.0, 1.0)
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 61)
        for v, label, style in ((values[0], "step 0 (initialisation)", "stepfilled"),
                                (values[1], f"after {steps} steps", "step")):
            if v is not None and v.size:  # the 1 % of extreme values outside [lo, hi] are left out
                ax.hist(v, bins=bins, histtype=style, alpha=0.45 if style == "stepfilled" else 1, lw=1.5,
                        density=True, label=label)
        (m0, s0), (m1, s1) = _stats(values[0]), _stats(values[1])
        ax.set_title(f"{layer.name}\nmean {m0:.2f} → {m1:.2f},  std {s0:.2f} → {s1:.2f}", fontsize=10)
        ax.tick_params(labelsize=9)
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend(fontsize=9)
    fig.suptitle(f"activation distributions of the hidden layers on the probe batch ({steps} training steps)",
                 fontsize=12)
    fig.supxlabel("activation value (the 0.5th to 99.5th percentile of both steps' values)", fontsize=10)
    fig.supylabel("density", fontsize=10)
    return fig


def plot_activations(layers, init_acts, final_acts, steps, max_panels, path: Path) -> None:
    save_figure(activations_figure(layers, init_acts, final_acts, steps, max_panels), path)


def plot_gradients(history, sizes, init_rows, final_rows, steps, path: Path) -> None:
    """Left: each layer's gradient over the training steps. Right: the profile across depth. Both as the RMS
    gradient per weight, ‖∂loss/∂W‖ / √n, so that layers with different fan-in (784 inputs for the first)
    compare."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = _by_layer(history)
    colors = _depth_colors(plt, len(series))
    for color, (name, (xs, vals)) in zip(colors, series.items()):
        rms = [v / math.sqrt(sizes[name]) for v in vals["grad_norm"]]
        left.plot(xs, _positive(rms), color=color, label=name, lw=1)
    left.set_yscale("log")
    left.set_xlabel("training step")
    left.set_ylabel("‖∂loss/∂W‖ / √n  (training batch)")
    left.set_title("gradient per layer over the steps")
    left.grid(True, which="both", alpha=0.3)
    _layer_legend(plt, fig, left, len(series))
    _plot_probes(right, init_rows, final_rows, steps, "grad_rms", _positive)
    right.set_yscale("log")
    right.set_xlabel("hidden layer (1 = next to the inputs)")
    right.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    right.set_ylabel("‖∂loss/∂W‖ / √n  (probe batch)")
    right.set_title("gradient across depth")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


def plot_profile(init_rows, final_rows, steps, saturating, path: Path) -> None:
    """Activation mean, std, and the saturated (sigmoid/tanh) or dead fraction across depth."""
    plt = pyplot()
    frac = _fraction(saturating)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, title in zip(axes, ("act_mean", "act_std", frac),
                              ("activation mean", "activation standard deviation",
                               "fraction saturated" if saturating else "fraction of dead units")):
        _plot_probes(ax, init_rows, final_rows, steps, key)
        ax.set_title(title)
        ax.set_xlabel("hidden layer")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if key == "act_std":
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            stds = [r[key] for rows in (init_rows, final_rows) for r in rows if math.isfinite(r[key]) and r[key] > 0]
            if stds and max(stds) / min(stds) > 100:
                ax.set_yscale("log")
        if key == frac:
            ax.set_ylim(-0.03, 1.03)
    axes[0].axhline(0.0, color="grey", lw=0.8, ls="--")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


def plot_steps(history, losses, saturating, path: Path) -> None:
    """Over the training steps: the loss, and per layer the activation std, the saturated or dead fraction and the
    update-to-weight ratio."""
    plt = pyplot()
    frac = _fraction(saturating)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    axes[0].plot(range(len(losses)), losses, lw=0.8)
    axes[0].set_title("training loss (every step)")
    axes[0].set_xlabel("training step")
    axes[0].grid(True, alpha=0.3)
    series = _by_layer(history)
    colors = _depth_colors(plt, len(series))
    for ax, key, title, log_scale in ((axes[1], "act_std", "activation std per layer", True),
                                      (axes[2], frac, f"fraction {frac} per layer", False),
                                      (axes[3], "update_ratio", "‖ΔW‖ / ‖W‖ per step", True)):
        for color, (name, (xs, vals)) in zip(colors, series.items()):
            ax.plot(xs, _positive(vals[key]) if log_scale else vals[key], color=color, lw=1, label=name)
        if log_scale:
            ax.set_yscale("log")
        else:
            ax.set_ylim(-0.03, 1.03)
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.grid(True, which="both", alpha=0.3)
    _layer_legend(plt, fig, axes[3], len(series))
    fig.tight_layout()
    save_figure(fig, path)
