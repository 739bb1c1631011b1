"""Will the network fit? A lower bound on what training it needs, checked against the memory free on its device
before anything is allocated (a typo such as model.n_neurons=100000000 would otherwise ask for hundreds of GB)."""
from __future__ import annotations

import os

import torch
from omegaconf import DictConfig, OmegaConf

from dnnlab.errors import bad_value
from dnnlab.model import IN_FEATURES, widths

FLOAT = 4  # bytes of a float32


def n_parameters(cfg: DictConfig, n_classes: int) -> int:
    sizes = [IN_FEATURES] + widths(cfg.model) + [n_classes]
    return sum(a * b + b for a, b in zip(sizes, sizes[1:]))


def needed_bytes(cfg: DictConfig, n_classes: int) -> int:
    """At least: the weights and their gradients, and one batch's activations kept for the backward pass (the
    optimizer's state and the data come on top, so this never refuses what would fit)."""
    activations = cfg.trainer.batch_size * (IN_FEATURES + sum(widths(cfg.model)) + n_classes)
    per_activation = 2 if cfg.trainer.get("precision") == "bf16" else FLOAT  # autocast keeps them in bf16
    return FLOAT * 2 * n_parameters(cfg, n_classes) + per_activation * activations


def available_bytes(device: torch.device) -> int | None:
    """Free memory on the device (CUDA: the driver's count; CPU: MemAvailable), None where it cannot be told."""
    if device.type == "cuda":  # what the driver has free, and what this process's cache holds unused
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - \
            torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pages = getattr(os, "sysconf_names", {}).get("SC_AVPHYS_PAGES")
        return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE") if pages else None


def check_fits(cfg: DictConfig, device: torch.device, n_classes: int = 10, copies: int = 1) -> None:
    """Refuse a network whose training (`copies` of it side by side: a stacked sweep) cannot fit in the device's
    free memory, naming the setting that sizes it."""
    need, free = copies * needed_bytes(cfg, n_classes), available_bytes(device)
    if free is None or need <= free:
        return
    weights = copies * 2 * FLOAT * n_parameters(cfg, n_classes)
    key, value = ("trainer.batch_size", cfg.trainer.batch_size) if weights <= free else (
        "model.n_neurons", OmegaConf.to_container(cfg.model.n_neurons) if OmegaConf.is_list(cfg.model.n_neurons)
        else cfg.model.n_neurons)
    what = f"{copies} of this network" if copies > 1 else "this network"
    raise bad_value(key, value, f"a size that fits: training {what} ({n_parameters(cfg, n_classes):,} "
                                f"parameters, batch {cfg.trainer.batch_size}) needs at least {need / 1e9:,.1f} GB, "
                                f"and {device.type} has {free / 1e9:,.1f} GB free")
