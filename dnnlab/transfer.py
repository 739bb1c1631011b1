"""Reusing pretrained layers: copy the lowest hidden blocks of a source run, freeze them, unfreeze them later."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dnnlab import checkpoint, stored
from dnnlab.errors import DnnlabError, bad_value

# What must agree between the source run and this one for the copied weights to mean the same thing.
MUST_MATCH = ("activation._target_", "norm.kind", "norm.position", "data.standardize")


class Frozen(nn.Sequential):
    """A reused block that does not train: no gradients, and always in inference mode (BN uses its running
    statistics, dropout is off), so its outputs are a fixed function of its inputs and can be cached."""

    def __init__(self, block: nn.Sequential):
        super().__init__(*block)
        self.requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)


def hidden_names(model: nn.Sequential) -> list[str]:
    return [name for name in model._modules if name.startswith("hidden")]


def n_reused(transfer: DictConfig, model: nn.Sequential) -> int:
    n = len(hidden_names(model))
    return n if transfer.reuse_layers == "all" else transfer.reuse_layers


def source(cfg: DictConfig) -> tuple[Path, dict]:
    """The checkpoint of cfg.transfer.source and its contents, checked against this run's config. Commands call it
    before reading any data, so a wrong source is told first; `reuse` reads it again (a small file)."""
    transfer = cfg.transfer
    path = checkpoint.find(transfer.source, "transfer.source")
    state = checkpoint.load(path)
    source_cfg = stored.checkpoint_config(state, str(path))  # data, only compared
    differences = [f"{key}: source {OmegaConf.select(source_cfg, key)!r}, this run {OmegaConf.select(cfg, key)!r}"
                   for key in MUST_MATCH if OmegaConf.select(source_cfg, key) != OmegaConf.select(cfg, key)]
    if differences:
        raise DnnlabError(f"transfer.source={transfer.source}: the source network differs ({'; '.join(differences)}); "
                          "configure this run like the source")
    return path, state


def reuse(model: nn.Sequential, cfg: DictConfig) -> dict:
    """Copy the input block and the lowest k hidden blocks of cfg.transfer.source into `model` (the source file is
    only read); freeze them if asked. Returns what was done, for the summary."""
    transfer = cfg.transfer
    path, state = source(cfg)
    k = n_reused(transfer, model)
    source_hidden = sorted({key.split(".")[0] for key in state["model"] if key.startswith("hidden")})
    if k > len(hidden_names(model)) or k > len(source_hidden):
        raise bad_value("transfer.reuse_layers", transfer.reuse_layers,
                        f"at most {min(len(hidden_names(model)), len(source_hidden))} (hidden layers in the source "
                        f"and in this model)")
    names = ["input"] + hidden_names(model)[:k]
    copied = {}
    for name in names:
        for key, mine in model._modules[name].state_dict().items():
            full = f"{name}.{key}"
            theirs = state["model"].get(full)
            if theirs is None or theirs.shape != mine.shape:
                found = "missing" if theirs is None else f"shape {tuple(theirs.shape)}"
                raise DnnlabError(f"transfer.source={transfer.source}: {full} is {found} in the source but "
                                  f"{tuple(mine.shape)} in this model; use the source's model and norm settings")
            copied[full] = theirs
    model.load_state_dict(copied, strict=False)  # copies the values: the source tensors are never touched
    if transfer.freeze:
        for name in names:
            model._modules[name] = Frozen(model._modules[name])
    return {**OmegaConf.to_container(transfer), "checkpoint": str(path), "source_epoch": state["epoch"],
            "reused": names[1:]}


def unfreeze(model: nn.Sequential, top) -> list[str]:
    """Make the top `top` frozen hidden blocks ("all": every one) trainable again; returns their names."""
    frozen = [name for name in hidden_names(model) if isinstance(model._modules[name], Frozen)]
    chosen = frozen if top == "all" else frozen[len(frozen) - top:]
    for name in chosen:
        model._modules[name] = nn.Sequential(*model._modules[name]).requires_grad_(True)
    return chosen


def split_frozen(model: nn.Sequential) -> tuple[nn.Sequential, nn.Sequential]:
    """(the leading frozen blocks, the rest): the first part's outputs can be computed once and cached."""
    names = list(model._modules)
    cut = 0
    while cut < len(names) and isinstance(model._modules[names[cut]], Frozen):
        cut += 1
    return (nn.Sequential(*[model._modules[n] for n in names[:cut]]),
            nn.Sequential(*[model._modules[n] for n in names[cut:]]))


@torch.no_grad()
def features(frozen: nn.Sequential, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    return torch.cat([frozen(x[i:i + chunk]) for i in range(0, len(x), chunk)]) if len(x) else x
