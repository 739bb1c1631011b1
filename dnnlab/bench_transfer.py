"""`dnnlab bench`'s transfer table: exercise 9's frozen-layer training with the frozen layers recomputed every
step or computed once (cached)."""
from __future__ import annotations

import statistics
from pathlib import Path

from dnnlab.bench_report import markdown


def transfer_table(args, tmp: Path) -> tuple[list[dict], dict]:
    """Exercise 9's frozen-layer training, with the frozen layers' outputs recomputed every step or cached."""
    from dnnlab.runs import run

    quiet = ["trainer.progress=false", *args.override]
    small = ["data.n_per_class=20", "data.val_per_class=5", "data.val_size=100"] if args.quick else []
    source = tmp / "source_0_4"
    print("  transfer: training the digits 0-4 source network ...", flush=True)
    run(["experiment=mnist_0_4", f"trainer.epochs={2 if args.quick else 5}", "trainer.checkpoint_every=0",
         *small[2:], *quiet], source)
    rows, raw = [], {}
    for name, extra in (("frozen 5 layers, recomputed", []), ("frozen 5 layers, cached", ["transfer.cache=true"])):
        times = []
        for seed in range(args.transfer_seeds):
            summary = run(["experiment=transfer_5_9", f"transfer.source={source}", f"trainer.seed={seed}",
                           "trainer.epochs=30", "trainer.early_stopping.monitor=null", *small, *extra, *quiet],
                          tmp / f"transfer_{len(rows)}_{seed}")
            times.append(summary)
        raw[name] = times
        rows.append({"variant": name, "epochs": times[0]["epochs"],
                     "train s": round(statistics.median(s["train_seconds"] for s in times), 3),
                     "s/epoch": round(statistics.median(s["seconds_per_epoch"] for s in times), 4),
                     "cache s": round(statistics.median(s.get("transfer", {}).get("cache_seconds", 0.0)
                                                        for s in times), 4),
                     "test acc": round(statistics.median(s["test_acc"] for s in times), 4)})
    rows[1]["speed-up"] = round(rows[0]["train s"] / rows[1]["train s"], 2) if rows[1]["train s"] else ""
    rows[0]["speed-up"] = 1.0
    return rows, raw


def transfer_section(args, tmp: Path, out: Path) -> tuple[dict, list[str]]:
    """Table 3."""
    from dnnlab.runs import write_table

    print("transfer: exercise 9 with and without cached frozen layers", flush=True)
    transfer, raw = transfer_table(args, tmp / "transfer")
    write_table(transfer, out / "transfer", "Transfer learning: frozen layers recomputed or cached")
    return ({"transfer": {"rows": transfer, "summaries": raw}},
            [markdown("Transfer (exercise 9, 30 epochs without early stopping)", transfer)])
