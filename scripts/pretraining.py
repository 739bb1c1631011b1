"""The chapter's last two techniques, compared: unsupervised pretraining (autoencoders) and pretraining on an
auxiliary task (same digit or not), each reused for 10-class MNIST with few labels, against training from scratch.

    python scripts/pretraining.py [--labels-per-class 10] [--seeds 3] [--out DIR] [-o data.root=...]

Each pretraining runs once (`dnnlab pretrain`, on the whole training split: images only for the autoencoders,
same/different pairs for the auxiliary task); every classifier then trains on `--labels-per-class` images per
digit (as many for validation), for each seed (trainer.seed and data.seed: each seed draws its own few labels, the
same for every row). Prints the table and writes it as CSV and Markdown.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from dnnlab.runs import mean_spread, run, run_pretrain, slug, write_table

PRETRAININGS = {  # name: overrides of `dnnlab pretrain`
    "denoising autoencoder, greedy layer-wise": ["pretrain=autoencoder", "pretrain.greedy=true"],
    "denoising autoencoder, whole stack": ["pretrain=autoencoder", "pretrain.greedy=false"],
    "auxiliary task: same digit?": ["pretrain=same_digit"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels-per-class", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("outputs/pretraining") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    parser.add_argument("-o", "--override", action="append", default=[], help="extra override for every run")
    args = parser.parse_args()

    common = ["data=mnist", "trainer.progress=false", *args.override]
    few = [f"data.n_per_class={args.labels_per_class}", f"data.val_per_class={args.labels_per_class}"]
    variants = [("from scratch", None, [], None)]
    for name, overrides in PRETRAININGS.items():
        source = args.out / "pretrain" / slug(name)
        done = run_pretrain([*common, *overrides], source)
        for freeze in ("true", "false"):
            variants.append((f"{name}, {'frozen' if freeze == 'true' else 'fine-tuned'}", source,
                             ["transfer=reuse", f"transfer.source={source}", f"transfer.freeze={freeze}"],
                             done["train_seconds"]))
    rows = []
    for name, source, overrides, pretrain_seconds in variants:
        results = [run([*common, *few, f"trainer.seed={seed}", f"data.seed={seed}", *overrides],
                       args.out / slug(name) / f"seed{seed}") for seed in range(args.seeds)]
        acc = mean_spread([100 * r["test_acc"] for r in results])
        rows.append({"variant": name, "test acc %": f"{acc[0]:.1f} ± {acc[1]:.1f}",
                     "train seconds": f"{mean_spread([r['train_seconds'] for r in results])[0]:.2f}",
                     "pretrain seconds": "" if pretrain_seconds is None else f"{pretrain_seconds:.1f}"})
    write_table(rows, args.out / "pretraining", f"Pretraining, then MNIST with {args.labels_per_class} labels per "
                                                f"digit ({args.seeds} seeds)")


if __name__ == "__main__":
    main()
