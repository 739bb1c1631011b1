"""`dnnlab bench`: how fast dnnlab trains chapter 11's networks, against what users write instead.

    dnnlab bench [--epochs 4] [--rounds 2] [--jobs 8] [--out DIR] [--keras-python PATH | --no-keras] [--quick]

Four tables, printed and written to OUT/bench.json and OUT/bench.md (and one CSV/Markdown pair per table):

1. Training speed on Fashion-MNIST digits 0-4 (the training split's 27,5xx images of those classes, validated on
   the 2,5xx of the validation split) with the default network (5 x 100 ELU, He init, Adam lr 0.001, batch 32).
   Contenders, each in its own process, run alternately (round after round) in this one invocation:
   - dnnlab: `dnnlab train` through its normal code path (dnnlab.runs.run), early stopping off;
   - the loop most PyTorch tutorials write: torchvision's FashionMNIST with ToTensor, a shuffling DataLoader of
     batch 32, the same nn.Sequential network, torch.optim.Adam, and a validation pass each epoch;
   - Keras' model.fit with the same network, when a Python with Keras is given (--keras-python, or
     $DNNLAB_KERAS_PYTHON, or /tmp/dnnlab-keras/bin/python when it exists; it need not have torch or dnnlab).
   Each reports the seconds of every epoch (training plus validation); the table has the median of the epochs
   after the first (warm-up), images per second, peak resident memory, the ratio to dnnlab, and the arithmetic
   floor: the epoch's floating-point operations divided by the matrix-multiply rate measured here (the best of
   all cores and one core, at the start and after every round, so a busy spell does not lower the floor).
2. Stacked sweeps: one job alone (`dnnlab train`), then --jobs jobs of the same network (learning rates and seeds)
   with `dnnlab train -m hydra/launcher=stacked hydra.launcher.cpu=stack`: wall time of the whole command, seconds
   per epoch, and the ratio to the single job.
3. Launchers: one sweep of 8 jobs (4 learning rates x 2 seeds, the default network, all of Fashion-MNIST, early
   stopping off) through the basic launcher, Hydra's joblib launcher (every core), `hydra/launcher=stacked` as it
   is (on a CPU with 2+ cores it hands the sweep to joblib) and with `hydra.launcher.cpu=stack` (one stack),
   alternately: wall time of each command, and each job's distance in validation accuracy from the same job run
   alone.
4. Transfer learning with cached frozen layers (exercise 9: a digits 0-4 network reused for 5-9 with 100 images per
   digit): training seconds with the frozen layers recomputed every step against computed once.

--quick runs everything for 1 measured epoch on whatever data $DNNLAB_DATA (or --data-root) holds, small splits
included (the tests use it on tiny generated files).

This module imports only the standard library at the top: the Keras worker runs it by path in a Python that has
neither torch nor dnnlab.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

CLASSES = [0, 1, 2, 3, 4]
WIDTHS = [784, 100, 100, 100, 100, 100, 5]
IDX = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
DEFAULT_KERAS_PYTHON = "/tmp/dnnlab-keras/bin/python"


# ------------------------------------------------------------------------------------------------ shared helpers

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def flops_per_epoch(n_train: int, n_val: int, widths=WIDTHS) -> float:
    """Multiply-adds count 2 FLOPs. Training: forward, weight gradients, and input gradients of every layer but
    the first (the images need none); validation: forward only. Activations, loss and Adam are left out (they are
    a few operations per unit or weight, not per weight and image)."""
    macs = [a * b for a, b in zip(widths[:-1], widths[1:])]
    train = 2 * sum(macs) + 2 * sum(macs) + 2 * sum(macs[1:])
    return n_train * train + n_val * 2 * sum(macs)


def idx_path(folder: Path, stem: str) -> Path:
    """The IDX file `stem` in `folder`: raw if it is there, else gzipped (which may not be there either)."""
    return folder / stem if (folder / stem).is_file() else folder / (stem + ".gz")


def read_raw(folder: Path, split: str):
    """(images uint8 (n, 784), labels) from the IDX files, raw or gzipped: numpy only (for the Keras worker)."""
    import numpy as np

    out = []
    for stem in IDX[split]:
        path = idx_path(folder, stem)
        raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
        ndim = raw[3]
        dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        out.append(np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims[0], -1))
    return out[0], out[1].reshape(-1)


def split_indices(labels, val_size: int):
    """Training and validation indices of the classes 0-4, as dnnlab cuts them (the last val_size images validate)."""
    import numpy as np

    n = len(labels)
    keep = np.isin(labels, CLASSES)
    train = np.flatnonzero(keep[: n - val_size])
    val = n - val_size + np.flatnonzero(keep[n - val_size:])
    return train, val


def fashion_folder(root: Path) -> Path:
    for folder in (root / "FashionMNIST" / "raw", root):
        if idx_path(folder, IDX["train"][0]).is_file():
            return folder
    from dnnlab.errors import DnnlabError

    raise DnnlabError(f"--data-root={root} holds no Fashion-MNIST IDX files (nor does {root}/FashionMNIST/raw)")


def check_paths(root: Path, keras: str | None) -> None:
    """The data and the Keras Python the user named are there: refused before anything is written."""
    fashion_folder(root)
    if keras and not (os.path.isfile(keras) and os.access(keras, os.X_OK)):
        from dnnlab.errors import bad_value

        raise bad_value("--keras-python", keras, "a Python interpreter that exists and can run")


def task_overrides(data_root, val_size: int, epochs: int, classes=CLASSES) -> list[str]:
    """`dnnlab train`'s overrides for the task of tables 1 and 2: Fashion-MNIST digits 0-4 (classes=None: all ten,
    as table 3), `epochs` epochs (the first a warm-up), early stopping off, no progress bar."""
    picked = [f"data.classes=[{','.join(map(str, classes))}]"] if classes else []
    return [f"data.root={data_root}", *picked, f"data.val_size={val_size}", f"trainer.epochs={epochs}",
            "trainer.progress=false", "trainer.early_stopping.monitor=null"]


def write_result(path: str, result: dict) -> None:
    result["peak_rss_mb"] = peak_rss_mb()
    Path(path).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------------- workers

def worker_dnnlab(args) -> dict:
    """dnnlab's trainer through its normal code path."""
    from dnnlab.runs import run

    with tempfile.TemporaryDirectory() as tmp:
        summary = run([*task_overrides(args.data_root, args.val_size, args.epochs), *args.override], Path(tmp) / "run")
        rows = [line.split(",") for line in (Path(tmp) / "run" / "metrics.csv").read_text().splitlines()[1:]]
    return {"epoch_seconds": [float(r[-1]) for r in rows], "n_train": summary["n_train"], "n_val": summary["n_val"],
            "threads": summary["threads"], "val_acc": float(rows[-1][4]),
            **({"note": f"Adam's update on up to {summary['update_threads']} threads"}
               if summary["update_threads"] > summary["threads"] else {})}


def worker_dataloader(args) -> dict:
    """The loop of the PyTorch tutorials: torchvision dataset + ToTensor, a shuffling DataLoader, nn.Sequential, Adam."""
    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    full = datasets.FashionMNIST(args.tv_root, train=True, download=False, transform=transforms.ToTensor())
    train_idx, val_idx = split_indices(full.targets.numpy(), args.val_size)
    workers = {"num_workers": args.workers, "persistent_workers": True} if args.workers else {}
    train_loader = DataLoader(Subset(full, train_idx.tolist()), batch_size=32, shuffle=True, **workers)
    val_loader = DataLoader(Subset(full, val_idx.tolist()), batch_size=32, **workers)
    layers: list[nn.Module] = [nn.Flatten()]
    for n_in, n_out in zip(WIDTHS[:-2], WIDTHS[1:-1]):
        linear = nn.Linear(n_in, n_out)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ELU()]
    layers.append(nn.Linear(WIDTHS[-2], WIDTHS[-1]))
    model = nn.Sequential(*layers)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7)
    loss_fn = nn.CrossEntropyLoss()
    seconds, val_acc = [], 0.0
    for _ in range(args.epochs):
        start = time.perf_counter()
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_loader:
                correct += (model(x).argmax(1) == y).sum().item()
        val_acc = correct / len(val_idx)
        seconds.append(time.perf_counter() - start)
    return {"epoch_seconds": seconds, "n_train": int(len(train_idx)), "n_val": int(len(val_idx)),
            "threads": torch.get_num_threads(), "val_acc": val_acc, "torch_default_threads": not args.threads,
            "numpy": np.__version__}


def worker_keras(args) -> dict:
    """Keras' model.fit with the same network, data, batch size, optimizer and epochs."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np

    x, y = read_raw(fashion_folder(Path(args.data_root)), "train")
    train_idx, val_idx = split_indices(y, args.val_size)
    x = x.astype(np.float32) / 255.0
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(shape=(784,))]
                             + [keras.layers.Dense(w, activation="elu", kernel_initializer="he_normal")
                                for w in WIDTHS[1:-1]]
                             + [keras.layers.Dense(WIDTHS[-1], activation="softmax")])
    model.compile(loss="sparse_categorical_crossentropy", optimizer=keras.optimizers.Adam(learning_rate=1e-3),
                  metrics=["accuracy"])
    seconds: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):  # after the validation pass
            seconds.append(time.perf_counter() - self.start)

    history = model.fit(x[train_idx], y[train_idx], batch_size=32, epochs=args.epochs, verbose=0,
                        validation_data=(x[val_idx], y[val_idx]), callbacks=[Timer()])
    return {"epoch_seconds": seconds, "n_train": int(len(train_idx)), "n_val": int(len(val_idx)),
            "val_acc": float(history.history["val_accuracy"][-1]), "keras": keras.__version__,
            "backend": keras.backend.backend()}


def worker_cli(args) -> dict:
    """`dnnlab ARGS` in this process, to report its peak memory."""
    from dnnlab.cli import main as cli_main

    sys.argv = ["dnnlab", *args.cli]
    start = time.perf_counter()
    code = 0
    try:
        cli_main()
    except SystemExit as e:
        code = e.code or 0
    return {"wall_seconds": time.perf_counter() - start, "exit_code": code}


WORKERS = {"dnnlab": worker_dnnlab, "dataloader": worker_dataloader, "keras": worker_keras, "cli": worker_cli}


def worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=WORKERS, required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--data-root")
    parser.add_argument("--tv-root")
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--cli", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args(argv)
    write_result(args.result, WORKERS[args.worker](args))


# -------------------------------------------------------------------------------------------------------- parent

def spawn(python: str, worker: str, extra: list[str], env: dict | None = None, timeout: float = 3600,
          cwd: Path | None = None) -> dict:
    """Run one worker in a fresh process; its result (with its peak memory), or {"error": ...}. The Keras worker
    runs this file by path (-P: without its folder on sys.path), the others `python -m dnnlab.bench`."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    entry = ["-P", str(Path(__file__).resolve())] if worker == "keras" else ["-m", "dnnlab.bench"]
    cmd = [python, *entry, "--worker", worker, "--result", result_path, *extra]
    environment = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(
        p for p in (os.environ.get("PYTHONPATH"), str(Path(__file__).resolve().parents[1])) if p)}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=environment, cwd=cwd)
        if done.returncode != 0 or not Path(result_path).read_text():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return {"error": f"exit {done.returncode}: {' | '.join(tail)}"}
        return json.loads(Path(result_path).read_text())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    finally:
        Path(result_path).unlink(missing_ok=True)


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


def cli(args_list: list[str], cwd: Path, timeout: float = 3600) -> dict:
    """`dnnlab ARGS` in a fresh process (working directory cwd): its wall time and peak memory."""
    Path(cwd).mkdir(parents=True, exist_ok=True)
    return spawn(sys.executable, "cli", ["--cli", *args_list], timeout=timeout, cwd=cwd,
                 env={"DNNLAB_DATA": os.environ.get("DNNLAB_DATA", "")})


def stacked_table(args, data_root: Path, tmp: Path) -> tuple[list[dict], dict]:
    import csv

    base = task_overrides(data_root, args.val_size, args.epochs + 1)
    lrs = ["0.0003", "0.0005", "0.001", "0.002", "0.003", "0.005", "0.0001", "0.0002"]
    n_lr = min(len(lrs), max(1, args.jobs // 2)) if args.jobs > 1 else 1
    sweep = [f"optimizer.lr={','.join(lrs[:n_lr])}", f"trainer.seed=range(1,{args.jobs // n_lr + 1})"]

    def epoch_seconds(run_dir: Path) -> list[float]:
        with open(run_dir / "metrics.csv") as f:
            return [float(r["seconds"]) for r in csv.DictReader(f)]

    rows, raw = [], {}
    single_dir, sweep_dir = tmp / "single", tmp / "stacked"
    runs = [("1 job, dnnlab train", ["train", *base, f"hydra.run.dir={single_dir}"], [single_dir]),
            (f"{args.jobs} jobs, hydra/launcher=stacked", ["train", "-m", "hydra/launcher=stacked",
                                                           "hydra.launcher.cpu=stack", *sweep, *base,
                                                           f"hydra.sweep.dir={sweep_dir}"], None)]
    if args.jobs > 1 and args.sequential:
        runs.append((f"{args.jobs} jobs, basic launcher (one at a time)",
                     ["train", "-m", *sweep, *base, f"hydra.sweep.dir={tmp / 'sequential'}"], None))
    single = None
    measured: dict[str, list[tuple[float, float, dict, int]]] = {name: [] for name, *_ in runs}
    for round_ in range(args.rounds):  # alternately, like the speed table: a busy spell hits both alike
        for name, argv, dirs in runs:
            print(f"  round {round_ + 1}/{args.rounds}: {name} ...", flush=True)
            out = Path(argv[-1].split("=", 1)[1])
            shutil.rmtree(out, ignore_errors=True)
            result = cli(argv, tmp)
            found = dirs or sorted((p for p in out.iterdir() if p.is_dir() and p.name.isdigit()),
                                   key=lambda p: int(p.name)) if out.is_dir() else []
            raw.setdefault(name, []).append(result)
            if "error" in result or result.get("exit_code") or not found or \
                    not all((d / "metrics.csv").is_file() for d in found):
                continue
            summary = json.loads((found[0] / "summary.json").read_text())
            measured[name].append((median_after_warmup(epoch_seconds(found[0])), result["wall_seconds"],
                                   {**summary, "peak_rss_mb": result["peak_rss_mb"]}, len(found)))
    for name, *_ in runs:
        got = measured[name]
        if not got:
            errors = [str(r.get("error", r.get("exit_code"))) for r in raw.get(name, [])]
            rows.append({"run": name, "jobs": "", "wall s": "failed", "s/epoch": "", "s/epoch per job": "",
                         "x 1 job (epoch)": "", "x 1 job (wall)": "", "peak RSS MB": "", "threads": "",
                         "note": "; ".join(errors)[:160]})
            continue
        per_epoch = statistics.median(g[0] for g in got)
        wall = statistics.median(g[1] for g in got)
        summary, n_jobs = got[-1][2], got[-1][3]
        if single is None:
            single = (per_epoch, wall)
        rows.append({"run": name, "jobs": n_jobs, "wall s": round(wall, 2), "s/epoch": round(per_epoch, 3),
                     "s/epoch per job": round(per_epoch / n_jobs, 3), "x 1 job (epoch)": round(per_epoch / single[0], 2),
                     "x 1 job (wall)": round(wall / single[1], 2), "peak RSS MB": round(max(g[2]["peak_rss_mb"]
                                                                                        for g in got)),
                     "threads": "/".join(str(g[2].get("threads")) for g in got),
                     "note": "" if "stacked" not in summary else f"{summary['stacked']['jobs']} jobs in one stack; "
                             f"per round: " + ", ".join(f"{g[0]:.2f} s" for g in got)})
    return rows, raw


# The launcher comparison's contenders: the same sweep through each, in this order every round.
LAUNCHERS = {
    "basic (one job at a time)": [],
    "joblib (n_jobs: every core)": ["hydra/launcher=joblib", "hydra.launcher.n_jobs={cores}"],
    "stacked (on a CPU with 2+ cores: joblib)": ["hydra/launcher=stacked"],
    "stacked, cpu=stack (one stack)": ["hydra/launcher=stacked", "hydra.launcher.cpu=stack"],
}


def sweep_val_acc(out: Path) -> dict[int, float]:
    """{job number: its best validation accuracy} of a finished sweep folder."""
    found = {}
    for path in out.glob("*/summary.json"):
        summary = json.loads(path.read_text())
        if summary.get("status") == "completed":
            found[int(path.parent.name)] = summary["val_acc"]
    return found


def launcher_table(args, data_root: Path, tmp: Path, cores: int) -> tuple[list[dict], dict]:
    """One sweep (4 learning rates x 2 seeds of the default network on all of Fashion-MNIST, early stopping off;
    --quick: 2 jobs) through each launcher, round after round: wall time of the whole command, and how far each
    job's best validation accuracy is from the same job run alone by the basic launcher (the last round's)."""
    from dnnlab.runs import slug

    epochs, lrs, seeds = args.epochs + 1, ["0.0001", "0.0003", "0.001", "0.003"], ["1", "2"]
    if args.quick:
        lrs, seeds = lrs[2:], seeds[:1]
    n_jobs = len(lrs) * len(seeds)
    sweep = [f"optimizer.lr={','.join(lrs)}", f"trainer.seed={','.join(seeds)}",
             *task_overrides(data_root, args.val_size, epochs, classes=None), *args.override]
    walls: dict[str, list[float]] = {name: [] for name in LAUNCHERS}
    accs: dict[str, dict[int, float]] = {}
    for round_ in range(args.rounds):
        for name, launcher in LAUNCHERS.items():
            print(f"  round {round_ + 1}/{args.rounds}: {name} ...", flush=True)
            out = tmp / slug(name)
            shutil.rmtree(out, ignore_errors=True)
            result = cli(["train", "-m", *[o.format(cores=cores) for o in launcher], *sweep,
                          f"hydra.sweep.dir={out}"], tmp)
            accs[name] = sweep_val_acc(out)
            if "error" not in result and not result.get("exit_code") and len(accs[name]) == n_jobs:
                walls[name].append(result["wall_seconds"])
    basic = accs.get(next(iter(LAUNCHERS)), {})
    base_wall = statistics.median(walls[next(iter(LAUNCHERS))] or [float("nan")])
    rows = []
    for name in LAUNCHERS:
        wall = statistics.median(walls[name]) if walls[name] else None
        gaps = [abs(acc - basic[job]) * 100 for job, acc in accs.get(name, {}).items() if job in basic]
        rows.append({"launcher": name, "wall s": round(wall, 1) if wall else "failed",
                     "per round": ", ".join(f"{w:.1f}" for w in walls[name]),
                     "x basic": round(wall / base_wall, 2) if wall else "",
                     "max val_acc gap to alone, pp": round(max(gaps), 2) if gaps else "",
                     "mean val_acc": round(statistics.mean(accs[name].values()), 4) if accs.get(name) else ""})
    return rows, {"epochs": epochs, "jobs": n_jobs, "sweep": sweep, "walls": walls, "val_acc": accs}


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


def machine() -> dict:
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": model, "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "loadavg_at_start": os.getloadavg()}


def markdown(title: str, rows: list[dict]) -> str:
    columns = list(dict.fromkeys(c for r in rows for c in r))
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def targets(speed: list[dict], stacked: list[dict], default_rss: float | None) -> list[dict]:
    by = {r["contender"]: r for r in speed}
    checks = []

    def ratio(name):
        row = by.get(name)
        return row["x dnnlab"] if row and isinstance(row.get("x dnnlab"), float) else None

    dl, keras, floor = ratio("DataLoader loop (torch default threads)"), ratio("Keras model.fit"), \
        ratio("arithmetic floor")
    checks.append({"target": "dnnlab >= 5x faster than the DataLoader loop", "measured": dl,
                   "met": None if dl is None else dl >= 5})
    checks.append({"target": "dnnlab >= 3x faster than Keras", "measured": keras,
                   "met": None if keras is None else keras >= 3})
    checks.append({"target": "dnnlab within 10x the arithmetic floor",
                   "measured": None if not floor else round(1 / floor, 2),
                   "met": None if not floor else 1 / floor <= 10})
    checks.append({"target": "a default run under 1.5 GB resident", "measured": default_rss,
                   "met": None if default_rss is None else default_rss < 1536})
    stack = next((r for r in stacked if "stacked" in r["run"] and isinstance(r.get("x 1 job (epoch)"), float)), None)
    if stack:
        checks.append({"target": f"{stack['jobs']} stacked jobs <= 2.5x one job (per epoch)",
                       "measured": stack["x 1 job (epoch)"], "met": stack["x 1 job (epoch)"] <= 2.5})
        checks.append({"target": f"{stack['jobs']} stacked jobs <= 2.5x one job (whole command)",
                       "measured": stack["x 1 job (wall)"], "met": stack["x 1 job (wall)"] <= 2.5})
    return checks


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--worker" in argv:  # a contender's process, started by spawn()
        return worker_main(argv)
    args = parse_args(argv)
    root = find_data_root(args)
    check_paths(root, args.keras_python)
    os.environ["DNNLAB_DATA"] = str(root)  # where dnnlab's runs, here and in the workers, find their data
    out = args.out or Path("outputs/bench") / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    info, rates = measure_machine()
    report = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    md = markdown_header(args, info)
    with tempfile.TemporaryDirectory() as tmp_name:
        for name, run_section in sections(args, root, Path(tmp_name), out, info, rates):
            if name not in args.skip:
                entries, lines = run_section()
                report.update(entries)
                md += lines
    # a skipped section's targets read as not measured
    checks = targets(report.get("speed", {}).get("rows", []), report.get("stacked", {}).get("rows", []),
                     rss_mb(report.get("default_run")))
    report["targets"] = checks
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    md += [markdown("Targets", checks)]
    md += [f"Load average at the end: {report['machine']['loadavg_at_end'][0]:.2f} (other processes on the machine "
           "slow every contender down; compare ratios from one invocation)."]
    (out / "bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "bench.md").write_text("\n".join(md) + "\n")
    for c in checks:
        print(f"  {'met' if c['met'] else 'NOT met' if c['met'] is False else 'n/a':8} {c['target']}: {c['measured']}")
    print(f"written: {out / 'bench.json'}, {out / 'bench.md'}")


def argument_parser():
    from dnnlab.errors import ArgumentParser, at_least  # here: the Keras worker imports this module without dnnlab

    parser = ArgumentParser(prog="dnnlab bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, help="holds FashionMNIST/raw and MNIST/raw (default: $DNNLAB_DATA)")
    parser.add_argument("--epochs", type=at_least(1), default=4,
                        help="measured epochs per run, after one warm-up epoch")
    parser.add_argument("--rounds", type=at_least(1), default=2, help="times each contender runs, alternately")
    parser.add_argument("--jobs", type=at_least(1), default=8, help="jobs in the stacked sweep")
    parser.add_argument("--val-size", type=at_least(1), default=5000)
    parser.add_argument("--keras-python", help="a Python that can import keras (default: $DNNLAB_KERAS_PYTHON, "
                                               f"{DEFAULT_KERAS_PYTHON})")
    parser.add_argument("--no-keras", action="store_true")
    parser.add_argument("--dataloader-one-thread", action="store_true",
                        help="also time the DataLoader loop with torch.set_num_threads(1)")
    parser.add_argument("--dataloader-workers", type=at_least(0), default=0,
                        help="also time the DataLoader loop with this many worker processes (PyTorch's CIFAR-10 "
                             "tutorial uses 2)")
    parser.add_argument("--sequential", action="store_true", help="also time the sweep with the basic launcher")
    parser.add_argument("--transfer-seeds", type=at_least(1), default=3)
    parser.add_argument("--skip", action="append", default=[], choices=["speed", "stacked", "launchers", "transfer"])
    parser.add_argument("-o", "--override", action="append", default=[], help="extra override for dnnlab's runs")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="1 measured epoch, 1 round, 2 stacked jobs, 1 seed; "
                                                             "for tiny data (tests)")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = argument_parser().parse_args(argv)
    if args.quick:
        args.epochs, args.rounds, args.transfer_seeds = 1, 1, 1
        args.jobs = min(args.jobs, 2)
        if args.val_size == 5000:
            args.val_size = 100
    return args


def find_data_root(args) -> Path:
    """--data-root, else $DNNLAB_DATA, else the folder above where dnnlab finds Fashion-MNIST; absolute."""
    root = args.data_root or (Path(os.environ["DNNLAB_DATA"]) if os.environ.get("DNNLAB_DATA") else None)
    if root is None:
        from dnnlab.data import locate

        root = locate("fashion_mnist").parent.parent
    return Path(root).resolve()


def measure_machine() -> tuple[dict, list[float]]:
    """machine() with the matrix-product rates on all cores and on one (printed); also the rates, the first the
    arithmetic floor chooses from."""
    info = machine()
    rate_all, rate_one = matmul_rate(info["nproc"]), matmul_rate(1)
    info.update({"matmul_gflops_all_cores": round(rate_all / 1e9, 1), "matmul_gflops_1_thread": round(rate_one / 1e9, 1)})
    print(f"dnnlab bench: {info['nproc']} cores ({info['cpu']}), torch {info['torch']}, matrix products "
          f"{info['matmul_gflops_all_cores']} GFLOP/s on all cores, {info['matmul_gflops_1_thread']} on one; "
          f"load average {info['loadavg_at_start'][0]:.2f}", flush=True)
    return info, [rate_all, rate_one]


def markdown_header(args, info: dict) -> list[str]:
    return [f"# dnnlab bench, {time.strftime('%Y-%m-%d %H:%M')}", "",
            f"Machine: {info['nproc']} cores ({info['cpu']}), torch {info['torch']}, CUDA: {info['cuda'] or 'none'}; "
            f"float32 matrix products {info['matmul_gflops_all_cores']} GFLOP/s on all cores "
            f"({info['matmul_gflops_1_thread']} on one); load average at start "
            f"{info['loadavg_at_start'][0]:.2f}. {args.epochs} measured epochs after 1 warm-up, "
            f"{args.rounds} round(s).", ""]


def sections(args, root: Path, tmp: Path, out: Path, info: dict, rates: list[float]
             ) -> list[tuple[str, Callable[[], tuple[dict, list[str]]]]]:
    """The benchmark's sections, in the order they run and appear in bench.json and bench.md: (the name --skip
    takes, a function that runs the section, writes its CSV/Markdown table and returns its entries of bench.json
    and its lines of bench.md). A new section is one more entry here, with its name among --skip's choices."""
    return [("speed", partial(speed_section, args, root, tmp, out, info, rates)),
            ("stacked", partial(stacked_section, args, root, tmp, out, info["nproc"])),
            ("launchers", partial(launcher_section, args, root, tmp, out, info["nproc"])),
            ("transfer", partial(transfer_section, args, tmp, out))]


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


def rss_mb(result: dict | None) -> int | None:
    """A process's peak resident memory in whole MB; None where it was not measured or failed."""
    return None if result is None or "error" in result else round(result["peak_rss_mb"])


def stacked_section(args, root: Path, tmp: Path, out: Path, nproc: int) -> tuple[dict, list[str]]:
    """Table 2."""
    from dnnlab.runs import write_table

    print(f"stacked sweeps: 1 job, then {args.jobs} jobs", flush=True)
    stacked, raw = stacked_table(args, root, tmp / "stacked")
    write_table(stacked, out / "stacked", f"Stacked sweeps of the default network ({nproc} cores)",
                ["note"], [r["note"] for r in stacked])
    return ({"stacked": {"rows": stacked, "results": raw}},
            [markdown("Stacked sweeps (learning rates x seeds), the default network", stacked)])


def launcher_section(args, root: Path, tmp: Path, out: Path, nproc: int) -> tuple[dict, list[str]]:
    """Table 4: the launchers on one sweep."""
    from dnnlab.runs import write_table

    print("launchers: one sweep through basic, joblib and stacked, alternately", flush=True)
    rows, raw = launcher_table(args, root, tmp / "launchers", nproc)
    title = (f"One sweep of {raw['jobs']} jobs (learning rates x seeds, the default network, {raw['epochs']} epochs, "
             f"all of Fashion-MNIST) through each launcher, {nproc} cores")
    write_table(rows, out / "launchers", title)
    return {"launchers": {"rows": rows, **raw}}, [markdown(title, rows)]


def transfer_section(args, tmp: Path, out: Path) -> tuple[dict, list[str]]:
    """Table 3."""
    from dnnlab.runs import write_table

    print("transfer: exercise 9 with and without cached frozen layers", flush=True)
    transfer, raw = transfer_table(args, tmp / "transfer")
    write_table(transfer, out / "transfer", "Transfer learning: frozen layers recomputed or cached")
    return ({"transfer": {"rows": transfer, "summaries": raw}},
            [markdown("Transfer (exercise 9, 30 epochs without early stopping)", transfer)])


if __name__ == "__main__":
    main()
