"""`dnnlab eval RUN_OR_CHECKPOINT [--mc-samples N]`: test accuracy and loss, the confusion matrix, per-class
accuracy, and MC dropout.

MC dropout (Gal & Ghahramani 2016; the book's MCDropout): the dropout layers (ordinary or alpha dropout) stay
active at inference while everything else is in inference mode (BatchNorm uses its running statistics), and the
softmax outputs of N passes are averaged. Reported beside plain inference: the accuracy and loss of the averaged
prediction, the predictive entropy H = -sum_k p_k log p_k of the averaged probabilities (nats; log 10 = 2.30 is
the maximum for ten classes), and the standard deviation over the N passes of the predicted class's probability
(the book's y_std). mc_uncertain.png shows the test images with the highest predictive entropy.

Written to --out (default RUN/eval/): eval.json, confusion_matrix.csv/.md/.png, per_class.csv/.md and, with
--mc-samples, mc_uncertain.png.
"""
from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from dnnlab import checkpoint, validate
from dnnlab.errors import ArgumentParser, DnnlabError, at_least
from dnnlab.prepare import pick_device
from dnnlab.record import pyplot, save_figure, write_json
from dnnlab.runs import write_table
from dnnlab.trained import load_trained, logits_of, split
from dnnlab.ui import console, error


def dropout_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _DropoutNd)]


@torch.no_grad()
def mc_predict(model: nn.Module, x: torch.Tensor, samples: int, seed: int = 42, chunk: int = 8192
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (over `samples` passes with dropout on, the rest in inference mode) of the
    softmax probabilities, (n, classes) each. The global random state is left as it was; the model ends in eval
    mode."""
    if samples < 1:
        raise DnnlabError(f"--mc-samples={samples} is not allowed: an integer >= 1")
    total = torch.zeros(0)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model.eval()
        for m in dropout_layers(model):
            m.train()
        try:
            for s in range(samples):
                probs = torch.softmax(logits_of(model, x, chunk), dim=1).double()
                if s == 0:
                    total, total_sq = probs.clone(), probs * probs
                else:
                    total += probs
                    total_sq += probs * probs
        finally:
            model.eval()
    mean = total / samples
    std = (total_sq / samples - mean * mean).clamp_min(0).sqrt()  # population std, as numpy's y_probas.std(axis=0)
    return mean.float(), std.float()


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Predictive entropy per row, in nats."""
    return -(probs * probs.clamp_min(1e-30).log()).sum(1)


def confusion(y: torch.Tensor, pred: torch.Tensor, n: int) -> torch.Tensor:
    """Counts: rows are the true classes, columns the predicted ones."""
    return torch.bincount(y.cpu() * n + pred.cpu(), minlength=n * n).reshape(n, n)


def per_class_accuracy(matrix: torch.Tensor) -> torch.Tensor:
    """The diagonal of a confusion matrix over its rows: the fraction of each true class predicted right."""
    return matrix.diag() / matrix.sum(1).clamp_min(1)


def plot_confusion(matrix: torch.Tensor, names: list[str], title: str, path: Path) -> None:
    plt = pyplot()
    m = matrix.numpy()
    rows = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * n, 0.8 + 0.65 * n))
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize="x-small" if n > 6 else "small",
                        color="white" if rows[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize="small")
    ax.set_yticks(range(n), names, fontsize="small")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize="medium")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.tight_layout()
    save_figure(fig, path)


def plot_uncertain(x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, h: torch.Tensor,
                   names: list[str], top: int, title: str, path: Path) -> list[dict]:
    """The `top` test images with the highest predictive entropy; returns what each panel shows."""
    plt = pyplot()
    order = torch.argsort(h.cpu(), descending=True)[:top].tolist()
    cols = min(6, len(order))
    rows = max(1, math.ceil(len(order) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.9 * rows), squeeze=False)
    shown = []
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, order):
        pred = int(mean[i].argmax())
        image = x[i].detach().float().cpu().reshape(28, 28).numpy()
        ax.imshow(image, cmap="binary")
        colour = "black" if pred == int(y[i]) else "C3"
        ax.set_title(f"true {names[int(y[i])]}\npred {names[pred]}\np {float(mean[i, pred]):.2f} ± "
                     f"{float(std[i, pred]):.2f}, H {float(h[i]):.2f}", fontsize="x-small", color=colour)
        shown.append({"index": i, "true": names[int(y[i])], "predicted": names[pred],
                      "probability": float(mean[i, pred]), "std": float(std[i, pred]), "entropy": float(h[i])})
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    save_figure(fig, path)
    return shown


def _r(v: float, digits: int = 4) -> float:
    return round(float(v), digits)


def evaluate_run(path: str | Path, out: Path | None = None, split_name: str = "test", mc_samples: int = 0,
                 seed: int = 42, top: int = 12, data_root: str | None = None, device: str = "auto",
                 quiet: bool = False) -> dict:
    """Evaluates the run or checkpoint at `path` on one split; writes the files into `out` and returns eval.json's
    content."""
    check_options(mc_samples, top, device)  # before the checkpoint and the data are loaded
    run = load_trained(path, pick_device(device), data_root)
    out = output_folder(out, run)
    x, y = split(run.data, split_name)
    result, matrix, pred = plain_inference(run, x, y, split_name)
    if mc_samples:  # compared with plain inference's predictions
        result["mc"] = mc_dropout(run, x, y, pred, mc_samples, seed, top, split_name, out)
    write_outputs(run, result, matrix, out, quiet)
    if not quiet:
        print_summary(result, run, out)
    return result


def check_options(mc_samples: int, top: int, device: str) -> None:
    if mc_samples < 0:
        raise DnnlabError(f"--mc-samples={mc_samples} is not allowed: 0 (off) or an integer >= 1")
    if top < 1:
        raise DnnlabError(f"--top={top} is not allowed: an integer >= 1")
    validate.check_device(device, "--device")


def output_folder(out: Path | None, run) -> Path:
    """--out, or RUN/eval; created."""
    out = Path(out) if out is not None else run.run_dir / "eval"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DnnlabError(f"cannot write to {out}: {e.strerror or e}") from None
    return out


def plain_inference(run, x: torch.Tensor, y: torch.Tensor, split_name: str) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Accuracy, loss, mean entropy, per-class accuracy and the confusion matrix of one pass in inference mode;
    also the matrix and the predictions."""
    logits = logits_of(run.model, x)
    probs = torch.softmax(logits, 1)
    pred = logits.argmax(1)
    result = {"checkpoint": str(run.path), "epoch": run.state.get("epoch"), "split": split_name, "n": len(y),
              "accuracy": (pred == y).float().mean().item(), "loss": F.cross_entropy(logits, y).item(),
              "mean_entropy": entropy(probs).mean().item()}
    matrix = confusion(y, pred, len(run.classes))
    result["per_class_accuracy"] = dict(zip(run.names, per_class_accuracy(matrix).tolist()))
    result["confusion_matrix"] = matrix.tolist()
    return result, matrix, pred


def mc_dropout(run, x: torch.Tensor, y: torch.Tensor, pred: torch.Tensor, mc_samples: int, seed: int, top: int,
               split_name: str, out: Path) -> dict:
    """The averaged prediction of `mc_samples` passes with dropout on, against plain inference's `pred`; draws
    mc_uncertain.png."""
    dropouts = dropout_layers(run.model)
    mean, std = mc_predict(run.model, x, mc_samples, seed)
    h = entropy(mean)
    mc_pred = mean.argmax(1)
    right = mc_pred == y
    pred_std = std.gather(1, mc_pred[:, None]).squeeze(1)
    mc_matrix = confusion(y, mc_pred, len(run.classes))
    mc = {
        "samples": mc_samples, "seed": seed, "dropout_layers": len(dropouts),
        "kinds": sorted({type(m).__name__ for m in dropouts}),
        "accuracy": right.float().mean().item(),
        "loss": F.nll_loss(mean.clamp_min(1e-12).log(), y).item(),
        "mean_entropy": h.mean().item(),
        "mean_entropy_correct": h[right].mean().item() if right.any() else math.nan,
        "mean_entropy_wrong": h[~right].mean().item() if (~right).any() else math.nan,
        "mean_std": pred_std.mean().item(),
        "changed_predictions": int((mc_pred != pred).sum()),
        "per_class_accuracy": dict(zip(run.names, per_class_accuracy(mc_matrix).tolist())),
    }
    if not dropouts:
        console.print("note: the network has no dropout layers, so every MC pass equals plain inference")
    mc["most_uncertain"] = plot_uncertain(
        x, y, mean, std, h, run.names, top,
        f"highest predictive entropy over {mc_samples} MC dropout passes ({split_name} split; red: misclassified)",
        out / "mc_uncertain.png")
    return mc


def write_outputs(run, result: dict, matrix: torch.Tensor, out: Path, quiet: bool) -> None:
    """confusion_matrix.csv/.md/.png, per_class.csv/.md and eval.json."""
    split_name, n_images = result["split"], result["n"]
    with console.capture() if quiet else nullcontext():  # quiet: for callers that print their own summary
        write_table(confusion_rows(matrix, run.names), out / "confusion_matrix",
                    f"confusion matrix ({split_name}, {n_images} images)")
        write_table(per_class_rows(matrix, run.names, result.get("mc")), out / "per_class", "accuracy per class")
    plot_confusion(matrix, run.names, f"{split_name}: accuracy {result['accuracy']:.4f}, {run.path.name}",
                   out / "confusion_matrix.png")
    write_json(out / "eval.json", result)


def confusion_rows(matrix: torch.Tensor, names: list[str]) -> list[dict]:
    n_classes = len(matrix)
    header = ["true \\ predicted"] + [str(j) for j in range(n_classes)]
    return [{header[0]: f"{i} {names[i]}", **{str(j): int(matrix[i, j]) for j in range(n_classes)}}
            for i in range(n_classes)]


def per_class_rows(matrix: torch.Tensor, names: list[str], mc: dict | None) -> list[dict]:
    per_class = per_class_accuracy(matrix)
    rows = [{"class": i, "name": names[i], "n": int(matrix[i].sum()), "accuracy": _r(per_class[i])}
            for i in range(len(matrix))]
    if mc:
        for row, name in zip(rows, names):
            row["mc_accuracy"] = _r(mc["per_class_accuracy"][name])
    return rows


def print_summary(result: dict, run, out: Path) -> None:
    lines = [f"{result['split']} accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f} "
             f"({result['n']} images, {run.path})"]
    if "mc" in result:
        mc = result["mc"]
        lines.append(f"MC dropout ({mc['samples']} passes, {mc['dropout_layers']} dropout layers): accuracy "
                     f"{mc['accuracy']:.4f}, loss {mc['loss']:.4f}, predictive entropy {mc['mean_entropy']:.3f} "
                     f"(right {mc['mean_entropy_correct']:.3f}, wrong {mc['mean_entropy_wrong']:.3f}), "
                     f"std of the predicted probability {mc['mean_std']:.3f}; "
                     f"{mc['changed_predictions']} predictions changed")
    lines.append(f"written to {out}")
    for line in lines:
        console.print(line, highlight=False)


def main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="dnnlab eval", description="Test accuracy and loss, confusion matrix, "
                                     "per-class accuracy and MC dropout of a trained run or checkpoint.")
    parser.add_argument("run", help=checkpoint.RUN_HELP)
    parser.add_argument("--mc-samples", type=at_least(0), default=0, metavar="N",
                        help="MC dropout: average N passes with dropout on (0: off, the default)")
    parser.add_argument("--split", default="test", choices=("test", "val", "train"))
    parser.add_argument("--seed", type=int, default=42, help="seed of the MC dropout masks")
    parser.add_argument("--top", type=at_least(1), default=12, help="images in mc_uncertain.png (default 12)")
    parser.add_argument("--out", type=Path, help="output folder (default RUN/eval)")
    parser.add_argument("--data-root", help="where the dataset is, if not where the run found it")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    # key=value as `dnnlab train` takes it works too: `dnnlab eval RUN mc_samples=100` is --mc-samples 100
    options = {a.dest for a in parser._actions if a.option_strings}
    argv = [f"--{a.split('=', 1)[0].replace('_', '-')}={a.split('=', 1)[1]}"
            if "=" in a and not a.startswith("-") and a.split("=", 1)[0] in options else a for a in argv]
    args = parser.parse_args(argv)
    try:
        evaluate_run(args.run, args.out, args.split, args.mc_samples, args.seed, args.top, args.data_root,
                     args.device)
    except DnnlabError as e:
        error(str(e))
        sys.exit(2)
