"""Reproduce the chapter's exercise-9 table: reusing a digits 0-4 network for digits 5-9 with 100 images per digit.

    python scripts/exercise_9.py --source RUN_DIR --seeds 3 [--out DIR] [-o data.root=...]

Without --source, the 0-4 network is trained first (experiment=mnist_0_4). Every variant runs through `dnnlab
train experiment=transfer_5_9` with its overrides, for each seed (trainer.seed and data.seed, so each seed draws
its own 500 training images; all variants of one seed share them). Prints the table and writes it as CSV and
Markdown: test accuracy on every test image of digits 5-9 (mean +- standard deviation over the seeds), training
seconds and epochs, beside the book's notebook.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from dnnlab.runs import mean_spread, run, slug, write_table

# (name, overrides of experiment=transfer_5_9, the book's notebook test accuracy in %)
VARIANTS = [
    ("frozen 5 layers", [], 64.0),
    ("frozen 5 layers, cached", ["transfer.cache=true"], 61.2),
    ("reuse 4 layers (frozen)", ["model.n_hidden=4"], 69.1),
    ("unfreeze the top two", ["transfer.unfreeze_top=2"], 78.1),
    ("unfreeze all", ["transfer.unfreeze_top=all"], 91.3),
    ("from scratch, same 500 images", ["transfer=none"], 84.8),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="run directory or checkpoint of the 0-4 network (default: train one)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    parser.add_argument("--out", type=Path, default=Path("outputs/exercise_9") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    parser.add_argument("-o", "--override", action="append", default=[], help="extra override for every run")
    args = parser.parse_args()

    quiet = ["trainer.progress=false", *args.override]
    source = args.source
    if source is None:
        source = str(args.out / "source_0_4")
        summary = run(["experiment=mnist_0_4", *quiet], Path(source))
        print(f"source: digits 0-4, test accuracy {summary['test_acc']:.4f} after {summary['epochs']} epochs")
    rows = []
    for name, overrides, book in VARIANTS:
        results = []
        for seed in range(args.seeds):
            run_dir = args.out / slug(name) / f"seed{seed}"
            reuse = [] if "transfer=none" in overrides else [f"transfer.source={source}"]
            results.append(run(["experiment=transfer_5_9", *reuse, f"trainer.seed={seed}", f"data.seed={seed}",
                                *overrides, *quiet], run_dir))
        acc = mean_spread([100 * r["test_acc"] for r in results])
        secs = mean_spread([r["train_seconds"] for r in results])
        rows.append({"variant": name, "book test acc %": f"{book:.1f}", "test acc %": f"{acc[0]:.1f} ± {acc[1]:.1f}",
                     "train seconds": f"{secs[0]:.2f} ± {secs[1]:.2f}",
                     "epochs": f"{mean_spread([r['epochs'] for r in results])[0]:.0f}"})
    write_table(rows, args.out / "exercise_9", f"Exercise 9: digits 0-4 -> 5-9, 100 images per digit, "
                                                f"{args.seeds} seeds (source {source})")


if __name__ == "__main__":
    main()
