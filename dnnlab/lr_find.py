"""`dnnlab lr-find [overrides]`: the learning-rate range test (the book's chapters 10-11, Smith 2015, fastai).

Train the configured network for one pass (`lr_find.steps`) while the learning rate grows exponentially from
`min_lr` to `max_lr` (multiplied by the same factor every step), stop early once the smoothed loss exceeds
`diverge_factor` times its minimum (or is not finite), then put the initial weights back. The smoothed loss against
the learning rate (log scale) goes to lr_find.png, every step to lr_find.csv, the suggestions to lr_find.json:

- book: ten times below the learning rate of the lowest smoothed loss. The book: "the optimal learning rate will be
  a bit lower than the point at which the loss starts to climb (typically about 10 times lower than the turning
  point)";
- steep: fastai's steepest descent, where the smoothed loss falls fastest per factor of learning rate;
- valley: fastai's default since 2.5: the longest stretch over which the loss keeps falling, at 1/3 + 1/6 of its
  length (a rate that is safely inside the region where training makes progress).
Like fastai, steep and valley ignore the first 10 % of the steps and the last 5.
"""
from __future__ import annotations

import csv
import io
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
import rich.progress as rp
import torch
from omegaconf import DictConfig, OmegaConf
from rich.table import Table

from dnnlab import CONF_DIR, hydra_files, transfer
from dnnlab.bookkeeping import steps_per_epoch
from dnnlab.checkpoint import atomic_write
from dnnlab.errors import DnnlabError, bad_value
from dnnlab.optim import GradientRules, build_optimizer
from dnnlab.prepare import prepare
from dnnlab.record import environment, pyplot, save_figure, write_json
from dnnlab.steps import batches, choose_step
from dnnlab.train import run_task
from dnnlab.ui import console

SHORT = {"book": "10x below the minimum (the book)", "steep": "steepest descent (fastai)",
         "valley": "longest valley (fastai)", "minimum": "lowest smoothed loss"}
RULES_TEXT = {
    "book": "10x below the minimum of the smoothed loss (the book: a bit below where the loss starts climbing)",
    "steep": "fastai's steepest descent of the smoothed loss",
    "valley": "fastai's valley: inside the longest stretch where the loss keeps falling",
}


@dataclass
class RangeTest:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # each step's batch loss, before that step's update
    smoothed: list[float] = field(default_factory=list)
    planned: int = 0
    stopped: str | None = None  # why it ended before `planned` steps, if it did


def range_test(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: DictConfig,
               *, batch_size: int, min_lr: float, max_lr: float, steps: int, smoothing: float = 0.98,
               diverge_factor: float | None = 4.0, generator: torch.Generator | None = None, autocast=None,
               progress=None) -> RangeTest:
    """Train on (x, y) with an exponentially growing learning rate, with the optimizer, penalties and clipping `cfg`
    (a dnnlab training config) sets; the model's weights, buffers and mode are
    restored exactly afterwards (also when the loss diverges or an exception flies)."""
    if not 0 < min_lr < max_lr:
        raise bad_value("lr_find.max_lr", max_lr, f"a number above lr_find.min_lr ({min_lr}), which must be > 0")
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training
    result = RangeTest(planned=steps)
    per_pass = max(1, steps_per_epoch(len(x), batch_size))
    try:
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(cfg.optimizer, trainable, x.device, lr=min_lr)
        rules = GradientRules(model, cfg.regularizer, cfg.trainer)
        step = choose_step(model, x, y, optimizer, rules, autocast=autocast)
        model.train()
        average, best = 0.0, math.inf
        for t, idx in batches(len(x), batch_size, per_pass, steps, generator, x.device):
            lr = min_lr * (max_lr / min_lr) ** (t / max(1, steps - 1))
            for group in optimizer.param_groups:
                group["lr"] = lr
            # the loss before this step's update; a non-finite one ends the test (the weights are restored below)
            value = float(step(idx, t))
            result.lrs.append(lr)
            result.losses.append(value)
            if not math.isfinite(value):
                result.smoothed.append(math.nan)
                result.stopped = f"the loss is {value} at step {t} (lr {lr:.3g})"
                break
            average = smoothing * average + (1 - smoothing) * value
            smooth = average / (1 - smoothing ** (t + 1))  # bias-corrected, as fastai
            result.smoothed.append(smooth)
            best = min(best, smooth)
            if progress is not None and t % 50 == 0:
                progress(t)
            if diverge_factor is not None and smooth > diverge_factor * best:
                result.stopped = f"the smoothed loss {smooth:.3g} passed {diverge_factor:g}x its minimum " \
                                 f"{best:.3g} at step {t} (lr {lr:.3g})"
                break
    finally:
        model.load_state_dict(snapshot)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return result


def valley_index(losses: np.ndarray) -> tuple[int, int]:
    """fastai's valley: (start, end) of the longest decreasing subsequence of the losses, as fastai computes it."""
    n = len(losses)
    lds = np.ones(n, dtype=int)  # length of the longest decreasing subsequence ending at i
    for i in range(1, n):
        earlier = lds[:i][losses[:i] > losses[i]]
        if len(earlier):
            lds[i] = max(lds[i], earlier.max() + 1)
    end = int(np.argmax(lds))  # the first i with the longest run, as fastai's strict "<" update keeps
    return end - int(lds[end]), end


def suggestions(lrs: list[float], smoothed: list[float]) -> dict[str, dict]:
    """{rule: {"lr", "loss", "rule"}} for book, steep, valley (and "minimum": the lowest smoothed loss)."""
    lrs_a, losses = np.asarray(lrs, dtype=float), np.asarray(smoothed, dtype=float)
    finite = np.isfinite(losses)
    if not finite.all():  # fastai drops everything from the first NaN on
        stop = int(np.argmin(finite))
        lrs_a, losses = lrs_a[:stop], losses[:stop]
    if len(losses) < 3:
        raise DnnlabError(f"lr-find recorded only {len(losses)} usable steps; lower lr_find.min_lr or raise "
                          "lr_find.steps")
    out = {}
    i_min = int(np.argmin(losses))
    out["minimum"] = {"lr": float(lrs_a[i_min]), "loss": float(losses[i_min]),
                      "rule": "the lowest smoothed loss (the turning point)"}
    out["book"] = {"lr": float(lrs_a[i_min]) / 10, "loss": float(np.interp(np.log(lrs_a[i_min] / 10), np.log(lrs_a),
                                                                           losses)), "rule": RULES_TEXT["book"]}
    start, end = len(losses) // 10, len(losses) - 5  # fastai: lrs[num_it // 10:-5]
    if end - start < 3:
        start, end = 0, len(losses)
    lr_w, loss_w = lrs_a[start:end], losses[start:end]
    slopes = np.diff(loss_w) / np.diff(np.log(lr_w))
    i = int(np.argmin(slopes))
    out["steep"] = {"lr": float(lr_w[i]), "loss": float(loss_w[i]), "rule": RULES_TEXT["steep"]}
    v_start, v_end = valley_index(loss_w)
    sections = (v_end - v_start) / 3
    i = v_start + int(sections) + int(sections / 2)
    out["valley"] = {"lr": float(lr_w[i]), "loss": float(loss_w[i]), "rule": RULES_TEXT["valley"]}
    return out


def plot(result: RangeTest, found: dict, rule: str, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    lrs, smoothed = np.asarray(result.lrs), np.asarray(result.smoothed, dtype=float)
    ax.plot(lrs, result.losses, color="lightgrey", lw=0.6, label="batch loss")
    ax.plot(lrs, smoothed, color="C0", lw=1.6, label="smoothed loss")
    markers = {"book": ("C3", "o"), "steep": ("C1", "^"), "valley": ("C2", "s")}
    for name, (color, marker) in markers.items():
        s = found[name]
        ax.plot([s["lr"]], [s["loss"]], marker, color=color, ms=9, zorder=5,
                label=f"{name}: {s['lr']:.2g}" + ("  (suggested)" if name == rule else ""))
    ax.axvline(found["minimum"]["lr"], color="grey", ls=":", lw=1, label=f"minimum: {found['minimum']['lr']:.2g}")
    ax.set_xscale("log")
    finite = smoothed[np.isfinite(smoothed)]
    if finite.size:
        low, first = finite.min(), finite[0]
        top = min(finite.max(), max(first, low) * 1.5)
        ax.set_ylim(low - 0.05 * (top - low + 1e-12), top + 0.05 * (top - low + 1e-12))
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss (cross-entropy)")
    title = f"learning-rate range test: {len(lrs)} of {result.planned} steps"
    ax.set_title(title + (" (stopped: diverging)" if result.stopped else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


def check(s: DictConfig) -> None:
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not (number(s.min_lr) and s.min_lr > 0):
        raise bad_value("lr_find.min_lr", s.min_lr, "a number > 0")
    if not (number(s.max_lr) and s.max_lr > s.min_lr):
        raise bad_value("lr_find.max_lr", s.max_lr, f"a number above lr_find.min_lr ({s.min_lr})")
    if s.steps is not None and not (isinstance(s.steps, int) and not isinstance(s.steps, bool) and s.steps >= 3):
        raise bad_value("lr_find.steps", s.steps, "null (one pass) or an integer >= 3")
    if not (number(s.smoothing) and 0 <= s.smoothing < 1):
        raise bad_value("lr_find.smoothing", s.smoothing, "a number in [0, 1)")
    if s.diverge_factor is not None and not (number(s.diverge_factor) and s.diverge_factor > 1):
        raise bad_value("lr_find.diverge_factor", s.diverge_factor, "null (never stop) or a number > 1")
    if s.rule not in RULES_TEXT:
        raise bad_value("lr_find.rule", s.rule, " or ".join(RULES_TEXT))


def lr_find(cfg: DictConfig, run_dir: Path, parallel_jobs: int = 1) -> dict:
    s = cfg.lr_find
    check(s)
    t = cfg.trainer
    device, data, model = prepare(cfg, parallel_jobs)
    hydra_files.started(run_dir)  # checked: from here the run writes
    if cfg.transfer.source:
        transfer.reuse(model, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "environment.json", environment(device))
    n, bs = len(data.x_train), t.batch_size
    steps = s.steps or max(3, steps_per_epoch(n, bs))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if t.precision == "bf16" else nullcontext()
    generator = torch.Generator(device=device).manual_seed(t.seed)
    with rp.Progress(rp.TextColumn("lr-find"), rp.BarColumn(), rp.MofNCompleteColumn(), rp.TimeElapsedColumn(),
                     console=console, disable=not t.progress, transient=True) as bar:
        task = bar.add_task("lr-find", total=steps)
        result = range_test(model, data.x_train, data.y_train, cfg, batch_size=bs,
                            min_lr=s.min_lr, max_lr=s.max_lr, steps=steps, smoothing=s.smoothing,
                            diverge_factor=s.diverge_factor, generator=generator, autocast=autocast,
                            progress=lambda i: bar.update(task, completed=i))
    found = suggestions(result.lrs, result.smoothed)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("step", "lr", "loss", "smoothed_loss"))
    writer.writerows([i, repr(lr), repr(loss), repr(sm)] for i, (lr, loss, sm)
                     in enumerate(zip(result.lrs, result.losses, result.smoothed)))
    atomic_write(run_dir / "lr_find.csv", buffer.getvalue().encode())
    plot(result, found, s.rule, run_dir / "lr_find.png")
    summary = {"status": "completed", "suggested_lr": found[s.rule]["lr"], "rule": s.rule,
               "suggestions": found, "steps": len(result.lrs), "planned_steps": steps, "stopped": result.stopped,
               "min_lr": s.min_lr, "max_lr": s.max_lr, "optimizer": cfg.optimizer._target_,
               "batch_size": bs, "settings": OmegaConf.to_container(s)}
    write_json(run_dir / "lr_find.json", summary)

    table = Table(title=f"lr-find: {len(result.lrs)} of {steps} steps, lr {s.min_lr:g} to "
                        f"{result.lrs[-1]:.3g}" + (" (stopped: diverging)" if result.stopped else ""),
                  title_justify="left")
    for c in ("rule", "learning rate", "smoothed loss", "what"):
        table.add_column(c, justify="left" if c in ("rule", "what") else "right")
    for name in ("book", "steep", "valley", "minimum"):
        table.add_row(name, f"{found[name]['lr']:.3g}", f"{found[name]['loss']:.4f}", SHORT[name])
    console.print(table)
    if result.stopped:
        console.print(f"stopped early: {result.stopped}")
    console.print(f"suggested learning rate: {found[s.rule]['lr']:.3g} (rule {s.rule}: {SHORT[s.rule]})",
                  highlight=False)
    console.print(f"plot: {run_dir / 'lr_find.png'} (the network's initial weights were restored)", highlight=False)
    return summary


@hydra.main(config_path=str(CONF_DIR), config_name="lr_find_app", version_base="1.3")
def main(cfg: DictConfig) -> float:
    return run_task(lr_find, cfg)
