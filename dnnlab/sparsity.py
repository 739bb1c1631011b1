"""`dnnlab prune RUN_OR_CHECKPOINT`: how sparse a trained network is, and how much accuracy survives pruning.

Sparsity is the fraction of the weight matrices' entries (every Linear layer's kernel, biases excluded, as Keras'
kernel_regularizer sees them) with |w| below --threshold (and the fraction exactly zero: FTRL with l1 gives exact
zeros, L1 with a gradient method only small weights that oscillate around zero).

Pruning (magnitude pruning) zeroes the smallest weights, for each --levels target sparsity, and re-evaluates: globally
(one threshold over all matrices, the default) or per layer (the same fraction in every matrix). Without fine-tuning
after pruning, the curve shows how much of the network the task really needs.

Written to --out (default RUN/prune/): sparsity.csv/.md (per layer), pruning.csv/.md (accuracy against sparsity),
pruning.png, prune.json and, with --save S, pruned_S.pt (a checkpoint that eval and latency accept).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from dnnlab import checkpoint, validate
from dnnlab.errors import ArgumentParser, DnnlabError
from dnnlab.prepare import pick_device
from dnnlab.record import pyplot, save_figure, write_json
from dnnlab.runs import write_table
from dnnlab.trained import load_trained, logits_of, weight_matrices
from dnnlab.ui import console, error

LEVELS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def sparsity(model: torch.nn.Module, threshold: float) -> list[dict]:
    """Per weight matrix and in total: entries, fraction |w| < threshold, fraction exactly zero."""
    rows, n_all, below_all, zero_all = [], 0, 0, 0
    for name, w in weight_matrices(model):
        a = w.detach().abs()
        below, zero = int((a < threshold).sum()), int((a == 0).sum())
        rows.append({"layer": name, "weights": a.numel(), "below_threshold": below / a.numel(),
                     "exact_zero": zero / a.numel(), "mean_abs": a.mean().item()})
        n_all, below_all, zero_all = n_all + a.numel(), below_all + below, zero_all + zero
    rows.append({"layer": "all", "weights": n_all, "below_threshold": below_all / max(1, n_all),
                 "exact_zero": zero_all / max(1, n_all),
                 "mean_abs": sum(r["mean_abs"] * r["weights"] for r in rows) / max(1, n_all)})
    return rows


@torch.no_grad()
def prune(model: torch.nn.Module, level: float, scope: str = "global") -> float:
    """Zero the `level` fraction of smallest-magnitude weights (globally or per layer), in place. Returns the
    fraction of weights that are zero afterwards."""
    if not 0 <= level < 1:
        raise DnnlabError(f"pruning level {level} is not allowed: a fraction in [0, 1)")
    mats = [w for _, w in weight_matrices(model)]
    if level > 0:
        if scope == "global":
            flat = torch.cat([w.detach().abs().flatten() for w in mats])
            k = int(level * flat.numel())
            if k:
                order = torch.argsort(flat, stable=True)[:k]  # exactly k weights, ties broken by position
                mask = torch.ones_like(flat, dtype=torch.bool)
                mask[order] = False
                start = 0
                for w in mats:
                    w.mul_(mask[start:start + w.numel()].view_as(w))
                    start += w.numel()
        elif scope == "layer":
            for w in mats:
                k = int(level * w.numel())
                if k:
                    order = torch.argsort(w.detach().abs().flatten(), stable=True)[:k]
                    w.view(-1)[order] = 0
        else:
            raise DnnlabError(f"--scope={scope} is not allowed: global or layer")
    total = sum(w.numel() for w in mats)
    return sum(int((w == 0).sum()) for w in mats) / max(1, total)


def score(model, x, y) -> tuple[float, float]:
    logits = logits_of(model, x)
    return (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


def plot_pruning(rows: list[dict], current: dict, title: str, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [r["sparsity"] for r in rows]
    ax.plot(xs, [r["test_acc"] for r in rows], "o-", label="test accuracy")
    ax.plot(xs, [r["val_acc"] for r in rows], "s--", label="validation accuracy", alpha=0.8)
    ax.axvline(current["below_threshold"], color="grey", ls=":", lw=1,
               label=f"as trained: {current['below_threshold']:.1%} of |w| < threshold")
    ax.set_xlabel("sparsity (fraction of weights set to zero)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize="medium")
    ax.set_xlim(-0.02, 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


def prune_run(path, out: Path | None = None, threshold: float = 1e-3, levels=LEVELS, scope: str = "global",
              save: float | None = None, data_root: str | None = None, device: str = "auto") -> dict:
    if not (threshold > 0 and math.isfinite(threshold)):
        raise DnnlabError(f"--threshold={threshold} is not allowed: a number > 0")
    levels = sorted(set(levels))
    if not levels or any(not 0 <= lv < 1 for lv in levels):
        raise DnnlabError(f"--levels={','.join(map(str, levels))} is not allowed: fractions in [0, 1), e.g. 0.5,0.9")
    if save is not None and not 0 <= save < 1:
        raise DnnlabError(f"--save={save} is not allowed: a fraction in [0, 1)")
    if scope not in ("global", "layer"):
        raise DnnlabError(f"--scope={scope} is not allowed: global or layer")
    validate.check_device(device, "--device")
    run = load_trained(path, pick_device(device), data_root)
    out = Path(out) if out is not None else run.run_dir / "prune"
    out.mkdir(parents=True, exist_ok=True)
    original = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    current = sparsity(run.model, threshold)
    data = run.data
    rows = []
    for level in levels:
        run.model.load_state_dict(original)
        zero = prune(run.model, level, scope)
        test_acc, test_loss = score(run.model, data.x_test, data.y_test)
        val_acc, val_loss = score(run.model, data.x_val, data.y_val)
        rows.append({"level": level, "sparsity": round(zero, 4), "test_acc": round(test_acc, 4),
                     "test_loss": round(test_loss, 4), "val_acc": round(val_acc, 4), "val_loss": round(val_loss, 4)})
    saved = None
    if save is not None:
        run.model.load_state_dict(original)
        prune(run.model, save, scope)
        saved = out / f"pruned_{save:g}.pt"
        checkpoint.save(saved, {**{k: run.state[k] for k in ("config", "classes", "epoch", "step") if k in run.state},
                                "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
                                "pruned": {"level": save, "scope": scope, "source": str(run.path)}})
    run.model.load_state_dict(original)

    layer_rows = [{"layer": r["layer"], "weights": r["weights"], f"|w|<{threshold:g}": round(r["below_threshold"], 4),
                   "exact_zero": round(r["exact_zero"], 4), "mean_abs": f"{r['mean_abs']:.3g}"} for r in current]
    write_table(layer_rows, out / "sparsity", f"sparsity of {run.path}")
    write_table(rows, out / "pruning", f"magnitude pruning ({scope}), no fine-tuning")
    plot_pruning(rows, current[-1], f"magnitude pruning ({scope}) of {run.run_dir.name}/{run.path.name}",
                 out / "pruning.png")
    result = {"checkpoint": str(run.path), "threshold": threshold, "scope": scope, "sparsity": current,
              "pruning": rows, "saved": str(saved) if saved else None}
    write_json(out / "prune.json", result)
    all_row = current[-1]
    console.print(f"{all_row['below_threshold']:.2%} of the {all_row['weights']} weights are below {threshold:g} "
                  f"({all_row['exact_zero']:.2%} exactly zero); written to {out}", highlight=False)
    return result


def _levels(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of fractions: {text!r}") from None


def main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="dnnlab prune", description="Sparsity of a trained network and accuracy "
                                     "against magnitude pruning.")
    parser.add_argument("run", help=checkpoint.RUN_HELP)
    parser.add_argument("--threshold", type=float, default=1e-3, help="|w| below this counts as sparse (1e-3)")
    parser.add_argument("--levels", type=_levels, default=list(LEVELS),
                        help="target sparsities, comma-separated (default " + ",".join(map(str, LEVELS)) + ")")
    parser.add_argument("--scope", default="global", choices=("global", "layer"),
                        help="one threshold over all weight matrices (global) or the same fraction in each (layer)")
    parser.add_argument("--save", type=float, metavar="S", help="also write the network pruned to sparsity S")
    parser.add_argument("--out", type=Path, help="output folder (default RUN/prune)")
    parser.add_argument("--data-root", help="where the dataset is, if not where the run found it")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        prune_run(args.run, args.out, args.threshold, args.levels, args.scope, args.save, args.data_root, args.device)
    except DnnlabError as e:
        error(str(e))
        sys.exit(2)
