"""How every command that trains starts: the config checked, the device, threads and seeds set, the data on the
device, the network built (`dnnlab train`, the stack, diagnose, lr-find, pretrain)."""
from __future__ import annotations

import os

import torch
from omegaconf import DictConfig

from dnnlab import memory, transfer, validate
from dnnlab.data import Splits, load
from dnnlab.errors import bad_value
from dnnlab.model import build_mlp, widths


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def core_share(parallel_jobs: int = 1) -> int:
    """This job's share of the cores: all of them, or a part when jobs run side by side (joblib launcher)."""
    return max(1, len(os.sched_getaffinity(0)) // parallel_jobs)


def pick_threads(setting, cfg: DictConfig, parallel_jobs: int = 1, stacked: int = 1) -> int:
    """CPU threads for a job, or for a stack of `stacked` jobs: its share of the cores where splitting the work pays,
    else one. A job splits each matrix product between the threads, which costs more than it saves up to a batch
    times the widest layer of 256 x 512 (a 32x100 product is split in vain). A stack's C++ step gives each thread
    whole jobs, which pays from three default networks on (stacked x batch x widest > 8192); with threads=auto,
    dnnlab.fast.threads.ThreadTuner then checks that choice against one thread on the first epoch's steps."""
    if setting != "auto":
        return setting
    per_job = cfg.trainer.batch_size * max(widths(cfg.model), default=1)
    pays = stacked * per_job > 8192 if stacked > 1 else per_job > 256 * 512
    return core_share(parallel_jobs) if pays else 1


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)  # model init, dropout and RReLU draw from the global generators
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by cuBLAS for determinism
        torch.use_deterministic_algorithms(True)


def restrict(data: Splits, t: DictConfig) -> None:
    """debug=smoke keeps the first batches of every split; debug=overfit trains and validates on the same ones."""
    if t.overfit_batches:
        n = t.overfit_batches * t.batch_size
        data.x_train, data.y_train = data.x_train[:n], data.y_train[:n]
        data.x_val, data.y_val = data.x_train, data.y_train
    if t.limit_batches:
        n = t.limit_batches * t.batch_size
        for split in ("train", "val", "test"):
            setattr(data, f"x_{split}", getattr(data, f"x_{split}")[:n])
            setattr(data, f"y_{split}", getattr(data, f"y_{split}")[:n])


def prepare(cfg: DictConfig, parallel_jobs: int = 1) -> tuple[torch.device, Splits, torch.nn.Sequential]:
    """How every command that trains starts: the config checked, device, threads and seeds set, the data on the
    device, the network built (initialised from the seed)."""
    validate.check(cfg)
    t = cfg.trainer
    device = pick_device(t.device)
    memory.check_fits(cfg, device, len(cfg.data.classes or range(10)))
    torch.set_num_threads(pick_threads(t.threads, cfg, parallel_jobs))
    seed_everything(t.seed, t.deterministic)
    if cfg.get("transfer") and cfg.transfer.source:
        transfer.source(cfg)  # a missing or mismatched source is told before the data are read
    data = load(cfg.data, device)
    restrict(data, t)
    if t.batch_size > len(data.x_train):  # a batch larger than the data: a typo, or full-batch meant
        raise bad_value("trainer.batch_size", t.batch_size, f"an integer from 1 to {len(data.x_train)} (the training "
                                                            "images; that many is full-batch gradient descent)")
    return device, data, build_mlp(cfg, data.n_classes).to(device)
