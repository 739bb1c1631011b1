"""The processes of `dnnlab bench` that each time one training run (dnnlab's trainer, the DataLoader loop, Keras'
model.fit, a `dnnlab` command) and write its result as JSON; the data-reading helpers they share; and spawn(),
which starts one in a fresh process and reads its result.

This module imports only the standard library at the top: the Keras worker runs it by path in a Python that has
neither torch nor dnnlab.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLASSES = [0, 1, 2, 3, 4]
WIDTHS = [784, 100, 100, 100, 100, 100, 5]
IDX = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


# ------------------------------------------------------------------------------------------------ shared helpers

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


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
    runs this file by path (-P: without its folder on sys.path), the others `python -m dnnlab.bench`
    (whose main hands --worker to worker_main)."""
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


def cli(args_list: list[str], cwd: Path, timeout: float = 3600) -> dict:
    """`dnnlab ARGS` in a fresh process (working directory cwd): its wall time and peak memory."""
    Path(cwd).mkdir(parents=True, exist_ok=True)
    return spawn(sys.executable, "cli", ["--cli", *args_list], timeout=timeout, cwd=cwd,
                 env={"DNNLAB_DATA": os.environ.get("DNNLAB_DATA", "")})


if __name__ == "__main__":  # the Keras worker: spawn() runs this file by path
    worker_main(sys.argv[1:])
