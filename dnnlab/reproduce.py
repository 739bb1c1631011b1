"""Rerun the experiments of chapter 11 from dnnlab's presets and set dnnlab's numbers beside the book's.

    python scripts/reproduce.py [--quick] [--seeds N] [--only NAME ...] [--out DIR] [-o key=value ...]
    dnnlab reproduce ...

Every row trains through `dnnlab train` (the presets in conf/experiment/book_*.yaml, mnist_0_4, transfer_5_9,
compare_schedules), for several seeds (trainer.seed, and data.seed where it draws the data). Finished runs are not
rerun: the command resumes where it stopped. Writes REPRODUCTION.md and REPRODUCTION.csv into --out: experiment,
the book's setting and number, dnnlab's mean ± std, seconds, and a verdict (matches / better / worse: by more than
the spread, at least half a point). --quick trains one seed on a few batches per epoch for one epoch: a smoke run
of the whole pipeline, not a reproduction.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from dnnlab.record import pyplot, save_figure
from dnnlab.runs import mean_spread, run, slug, write_table


@dataclass
class Row:
    name: str
    setting: str
    book: float | None  # the book's number (a fraction); None where the book only plots
    overrides: list[str]
    metric: str = "val_acc"
    kind: str = "train"  # train, mc_dropout (evaluate the row named by `of`), lr_find
    of: str | None = None
    needs: list[str] = field(default_factory=list)  # source runs: "task_a" or "mnist_0_4"


OPTIMIZERS = {"sgd": 0.8672, "momentum": 0.8672, "nesterov": 0.8708, "adagrad": 0.8424, "rmsprop": 0.8636,
              "adam": 0.8696, "adamax": 0.8780, "nadam": 0.8740, "adamw": 0.8702}
TRANSFER_5_9 = [("5 frozen layers", [], 0.640), ("5 frozen layers, cached", ["transfer.cache=true"], 0.612),
                ("reuse 4 layers", ["model.n_hidden=4"], 0.691),
                ("unfreeze the top two", ["transfer.unfreeze_top=2"], 0.781),
                ("unfreeze all", ["transfer.unfreeze_top=all"], 0.913), ("from scratch", ["transfer=none"], 0.848)]
ROWS = [
    Row("Leaky ReLU (alpha 0.2)", "300-100, SGD 1e-3, 10 epochs", 0.8396, ["experiment=book_leaky_relu"]),
    Row("PReLU", "300-100, SGD 1e-3, 10 epochs", 0.8398, ["experiment=book_leaky_relu", "activation=prelu"]),
    Row("100 layers: SELU + LeCun", "standardized, SGD 1e-3, 5 epochs", 0.8218, ["experiment=book_deep_selu"]),
    Row("100 layers: ReLU + He", "standardized, SGD 1e-3, 5 epochs", 0.7380,
        ["experiment=book_deep_selu", "activation=relu"]),
    Row("BN after the activations", "input BN, 300-100 ReLU, SGD, 10 epochs", 0.8750, ["experiment=book_batchnorm"]),
    Row("BN before the activations (no bias)", "input BN, 300-100 ReLU, SGD, 10 epochs", 0.8660,
        ["experiment=book_batchnorm", "norm.position=before"]),
    *[Row(f"optimizer: {name}", "3 x 100 ReLU, lr 1e-3, epoch 10", book, ["experiment=book_optimizers",
                                                                          f"optimizer={name}"])
      for name, book in OPTIMIZERS.items()],
    Row("1cycle (max lr 0.05)", "3 x 100 ReLU, SGD, batch 128, 25 epochs", 0.8934, ["experiment=book_1cycle"]),
    Row("L2 0.01", "2 x 100 ReLU, Nadam, 2 epochs", 0.8382, ["experiment=book_regularizers"]),
    Row("dropout 0.2", "2 x 100 ReLU, Nadam, 2 epochs", 0.8722,
        ["experiment=book_regularizers", "regularizer=dropout", "regularizer.dropout.input=true"]),
    Row("max-norm 1.0", "2 x 100 ReLU, Nadam, 2 epochs", 0.8662,
        ["experiment=book_regularizers", "regularizer=max_norm"]),
    Row("alpha dropout 0.2 + SELU", "300-100, Nesterov 0.01, 20 epochs (test)", 0.8639,
        ["experiment=book_alpha_dropout"], metric="test_acc"),
    Row("MC dropout, 100 samples", "the alpha-dropout model (test)", 0.8661, [], metric="test_acc",
        kind="mc_dropout", of="alpha dropout 0.2 + SELU"),
    Row("task B (sandal/shirt) from scratch", "200 images, SELU 300-100-50-50-50 (test)", 0.9705,
        ["experiment=book_task_b", "transfer=none", "trainer.epochs=20"], metric="test_acc"),
    Row("task B reusing task A", "4 epochs frozen, 16 unfrozen at 1e-4 (test)", 0.9940,
        ["experiment=book_task_b"], metric="test_acc", needs=["task_a"]),
    Row("MNIST 0-4 (exercise 8)", "5 x 100 ELU, He, Adam, early stopping (test)", 0.973,
        ["experiment=mnist_0_4"], metric="test_acc"),
    Row("MNIST 0-4 with batch norm", "exercise 8 with BN (test)", 0.994,
        ["experiment=mnist_0_4", "norm=batchnorm"], metric="test_acc"),
    *[Row(f"5-9, 100 per digit: {name}", "exercise 9 (test, digits 5-9)", book,
          ["experiment=transfer_5_9", *over], metric="test_acc", needs=[] if "transfer=none" in over else ["mnist_0_4"])
      for name, over, book in TRANSFER_5_9],
    *[Row(f"schedule: {name}", "3 x 100 ReLU, momentum 0.01, batch 128, 20 epochs", None,
          ["experiment=compare_schedules", f"schedule={name}"])
      for name in ("constant", "power", "exponential", "piecewise", "performance", "1cycle", "cosine")],
    Row("lr-find suggestion (that setting)", "compare_schedules' network", None,
        ["experiment=compare_schedules"], metric="suggested_lr", kind="lr_find"),
]
SOURCES = {"task_a": ["experiment=book_task_a"], "mnist_0_4": ["experiment=mnist_0_4"]}
QUICK = ["trainer.epochs=1", "trainer.limit_batches=20"]


def finished(run_dir: Path, name: str = "summary.json") -> dict | None:
    """The summary of a run that already completed (so it is not trained again)."""
    try:
        summary = json.loads((run_dir / name).read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("status", "completed") == "completed" else None


def train_once(overrides: list[str], run_dir: Path) -> dict:
    return finished(run_dir) or run(overrides, run_dir)


def evaluate(row: Row, out: Path, seeds: int, common: list[str]) -> list[dict]:
    """The runs of one row, each {metric value, seconds, epochs}."""
    if row.kind == "mc_dropout":
        from dnnlab.evaluation import evaluate_run

        found = []
        for seed in range(seeds):
            source = out / slug(row.of) / f"seed{seed}"
            done = finished(source / "eval_mc", "eval.json") or \
                evaluate_run(source, out=source / "eval_mc", mc_samples=100, quiet=True)
            found.append({"value": done["mc"]["accuracy"], "seconds": None, "epochs": None})
        return found
    if row.kind == "lr_find":
        from dnnlab.lr_find import lr_find
        from dnnlab.runs import compose_config

        run_dir = out / slug(row.name)
        done = finished(run_dir, "lr_find.json") or lr_find(compose_config([*row.overrides, *common], "lr_find_app"),
                                                             run_dir)
        return [{"value": done["suggested_lr"], "seconds": None, "epochs": None}]
    found = []
    for seed in range(seeds):
        sources = [f"transfer.source={out / 'sources' / need}" for need in row.needs]
        summary = train_once([*row.overrides, *sources, f"trainer.seed={seed}", f"data.seed={seed}", *common],
                             out / slug(row.name) / f"seed{seed}")
        found.append({"value": summary.get(row.metric), "seconds": summary.get("train_seconds"),
                      "epochs": summary.get("epochs")})
    return found


def verdict(mean: float, spread: float, book: float | None, quick: bool) -> str:
    if book is None:
        return "no number in the book"
    if quick:
        return "not compared (quick run)"
    tolerance = max(spread, 0.005)
    if abs(mean - book) <= tolerance:
        return "matches"
    return "better" if mean > book else "worse"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch of a few batches: a smoke run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="rows whose name contains one of these words")
    parser.add_argument("--out", type=Path, default=Path("outputs/reproduce"))
    parser.add_argument("-o", "--override", action="append", default=[], help="extra override for every run")
    args = parser.parse_args(argv)
    seeds = 1 if args.quick else args.seeds
    common = ["trainer.progress=false", *(QUICK if args.quick else []), *args.override]
    rows = [r for r in ROWS if not args.only or any(word.lower() in r.name.lower() for word in args.only)]
    for need in sorted({n for r in rows for n in r.needs}):
        train_once([*SOURCES[need], "trainer.progress=false", *common], args.out / "sources" / need)

    table, compared = [], []
    for row in rows:
        found = evaluate(row, args.out, seeds, common)
        values = [f["value"] for f in found if f["value"] is not None]
        mean, spread = mean_spread(values) if values else (float("nan"), 0.0)
        seconds = [f["seconds"] for f in found if f["seconds"] is not None]
        percent = row.metric != "suggested_lr"
        if percent and row.book is not None:
            compared.append((row.name, row.book, mean, spread))
        table.append({
            "experiment": row.name, "book's setting": row.setting,
            "book": "" if row.book is None else f"{100 * row.book:.2f}",
            "dnnlab": (f"{100 * mean:.2f} ± {100 * spread:.2f}" if percent else f"{mean:.3g}"),
            "seeds": len(values), "metric": row.metric,
            "train seconds": f"{mean_spread(seconds)[0]:.1f}" if seconds else "",
            "verdict": verdict(mean, spread, row.book, args.quick) if percent else "no number in the book",
        })
    title = (f"Chapter 11 reproduced{' (quick smoke run, not comparable)' if args.quick else ''}: "
             f"{seeds} seed(s), accuracies in %")
    write_table(table, args.out / "REPRODUCTION", title)
    if compared:
        plot_comparison(compared, args.out / "reproduction.png")


def plot_comparison(compared: list[tuple[str, float, float, float]], path: Path) -> None:
    """The book's number and dnnlab's (mean, with the spread as an error bar) for every compared row."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(compared) + 1.2))
    ys = range(len(compared))
    ax.barh([y + 0.2 for y in ys], [100 * b for _, b, _, _ in compared], height=0.4, label="book", color="0.7")
    ax.barh([y - 0.2 for y in ys], [100 * m for _, _, m, _ in compared], height=0.4, label="dnnlab",
            xerr=[100 * s for *_, s in compared], color="tab:blue")
    ax.set_yticks(list(ys), [name for name, *_ in compared], fontsize=8)
    ax.invert_yaxis()
    low = min(min(b, m) for _, b, m, _ in compared)
    ax.set_xlim(max(0, 100 * low - 5), 100)
    ax.set_xlabel("accuracy (%)")
    ax.legend(loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
