"""`dnnlab bench`'s first table: seconds per epoch of dnnlab, the DataLoader loop of the PyTorch tutorials and
Keras' model.fit on the same task, each in its own process, against the arithmetic floor; and the peak memory of a
default run."""
from __future__ import annotations

import gzip
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from dnnlab.bench_report import markdown, rss_mb
from dnnlab.bench_workers import IDX, WIDTHS, cli, fashion_folder, idx_path, spawn

DEFAULT_KERAS_PYTHON = "/tmp/dnnlab-keras/bin/python"


def flops_per_epoch(n_train: int, n_val: int, widths=WIDTHS) -> float:
    """Multiply-adds count 2 FLOPs. Training: forward, weight gradients, and input gradients of every layer but
    the first (the images need none); validation: forward only. Activations, loss and Adam are left out (they are
    a few operations per unit or weight, not per weight and image)."""
    macs = [a * b for a, b in zip(widths[:-1], widths[1:])]
    train = 2 * sum(macs) + 2 * sum(macs) + 2 * sum(macs[1:])
    return n_train * train + n_val * 2 * sum(macs)


def matmul_rate(threads: int, size: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of a square float32 matrix product on `threads` threads (the best of several tries)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.rand(size, size), torch.rand(size, size)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    torch.set_num_threads(before)
    return 2 * size ** 3 / best


def torchvision_root(data_root: Path, tmp: Path) -> Path:
    """torchvision's FashionMNIST(download=False) wants ROOT/FashionMNIST/raw with the decompressed files."""
    source = fashion_folder(data_root)
    raw = tmp / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for stems in IDX.values():
        for stem in stems:
            path = idx_path(source, stem)
            if path.suffix != ".gz":
                shutil.copyfile(path, raw / stem)
            else:
                with gzip.open(path, "rb") as f_in, open(raw / stem, "wb") as f_out:
                    shutil.copyfileobj(f_in, f_out)
    return tmp


def after_warmup(seconds: list[float]) -> list[float]:
    """The epochs after the first (warm-up), or the only one."""
    return seconds[1:] or seconds


def median_after_warmup(seconds: list[float]) -> float:
    return statistics.median(after_warmup(seconds))


def keras_python(args) -> str | None:
    if args.no_keras:
        return None
    for candidate in (args.keras_python, os.environ.get("DNNLAB_KERAS_PYTHON"), DEFAULT_KERAS_PYTHON):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def speed_table(args, data_root: Path, tmp: Path, rates: list[float], nproc: int) -> tuple[list[dict], dict]:
    """`rates`: the matrix-product rates measured so far; one more is measured after every round, and the floor
    uses the best of them (this machine's speed swings: the best rate is the strictest floor)."""
    tv_root = torchvision_root(data_root, tmp)
    common = ["--data-root", str(data_root), "--val-size", str(args.val_size), "--epochs", str(args.epochs + 1)]
    contenders = [("dnnlab", sys.executable, "dnnlab", [f"--override={o}" for o in args.override]),
                  ("DataLoader loop (torch default threads)", sys.executable, "dataloader", ["--tv-root", str(tv_root)])]
    if args.dataloader_one_thread:
        contenders.append(("DataLoader loop, 1 thread", sys.executable, "dataloader",
                           ["--tv-root", str(tv_root), "--threads", "1"]))
    if args.dataloader_workers:
        contenders.append((f"DataLoader loop, num_workers={args.dataloader_workers}", sys.executable, "dataloader",
                           ["--tv-root", str(tv_root), "--workers", str(args.dataloader_workers)]))
    kpy = keras_python(args)
    notes = {}
    if kpy:
        contenders.append(("Keras model.fit", kpy, "keras", []))
    else:
        notes["keras"] = ("skipped: no Python with Keras (give --keras-python, set $DNNLAB_KERAS_PYTHON, or create "
                          f"{DEFAULT_KERAS_PYTHON} with `pip install tensorflow-cpu`)")
    results: dict[str, list[dict]] = {name: [] for name, *_ in contenders}
    for round_ in range(args.rounds):
        for name, python, worker, extra in contenders:
            print(f"  round {round_ + 1}/{args.rounds}: {name} ...", flush=True)
            results[name].append(spawn(python, worker, common + extra))
        rates.append(max(matmul_rate(nproc), matmul_rate(1)))
    floor_rate = max(rates)
    rows, raw = [], {}
    base = None
    for name, *_ in contenders:
        ok = [r for r in results[name] if "error" not in r]
        raw[name] = results[name]
        if not ok:
            rows.append({"contender": name, "s/epoch": "failed", "images/s": "", "peak RSS MB": "",
                         "x dnnlab": "", "val acc": "", "threads": "",
                         "note": results[name][0]["error"][:160]})
            continue
        per_epoch = statistics.median([s for r in ok for s in after_warmup(r["epoch_seconds"])])
        base = per_epoch if base is None else base
        rows.append({"contender": name, "s/epoch": round(per_epoch, 3),
                     "images/s": round(ok[0]["n_train"] / per_epoch), "peak RSS MB": round(max(r["peak_rss_mb"] for r in ok)),
                     "x dnnlab": round(per_epoch / base, 2), "val acc": round(ok[-1]["val_acc"], 4),
                     "threads": ok[-1].get("threads", ""), "note": ok[-1].get("backend", ok[-1].get("note", ""))})
    first = next((r for rs in results.values() for r in rs if "error" not in r), None)
    n_train, n_val = (first["n_train"], first["n_val"]) if first else (0, 0)
    flops = flops_per_epoch(n_train, n_val)
    floor = flops / floor_rate
    rows.append({"contender": "arithmetic floor", "s/epoch": round(floor, 4), "images/s": round(n_train / floor),
                 "peak RSS MB": "", "x dnnlab": round(floor / base, 3) if base else "", "val acc": "", "threads": "",
                 "note": f"{flops / 1e9:.2f} GFLOP / {floor_rate / 1e9:.0f} GFLOP/s"})
    return rows, {"results": raw, "n_train": n_train, "n_val": n_val, "flops_per_epoch": flops,
                  "floor_seconds": floor, "matmul_gflops_measured": [round(r / 1e9, 1) for r in rates],
                  "notes": notes}


def speed_section(args, root: Path, tmp: Path, out: Path, info: dict, rates: list[float]) -> tuple[dict, list[str]]:
    """Table 1, and the peak memory of a default run."""
    from dnnlab.runs import write_table

    print("speed: the default network on Fashion-MNIST digits 0-4", flush=True)
    speed, raw = speed_table(args, root, tmp / "speed", rates, info["nproc"])
    write_table(speed, out / "speed", f"Seconds per epoch, {raw['n_train']} training images "
                                      f"(Fashion-MNIST 0-4), batch 32, {info['nproc']} cores",
                ["note"], [r["note"] for r in speed])  # a narrow terminal: the notes under their rows
    md = [markdown(f"Training speed: {raw['n_train']} training + {raw['n_val']} validation images per epoch", speed)]
    md += [f"{k}: {v}" for k, v in raw["notes"].items()]
    md += [f"Matrix-product rates measured at the start and after each round (GFLOP/s; the floor uses the "
           f"best): {', '.join(map(str, raw['matmul_gflops_measured']))}", ""]
    default = default_run(args, root, tmp)
    md += [f"A default run (`dnnlab train`, all 55,000 training images, one epoch): peak resident memory "
           f"{rss_mb(default)} MB.", ""]
    return {"speed": {"rows": speed, **raw}, "default_run": default}, md


def default_run(args, root: Path, tmp: Path) -> dict:
    """One epoch of `dnnlab train` with the defaults, in its own process: its peak memory."""
    print("memory: one epoch of the default run (all of Fashion-MNIST)", flush=True)
    return cli(["train", f"data.root={root}", "trainer.epochs=1", "trainer.progress=false",
                f"data.val_size={args.val_size}", f"hydra.run.dir={tmp / 'default'}",
                *(["trainer.limit_batches=50"] if args.quick else [])], tmp)
