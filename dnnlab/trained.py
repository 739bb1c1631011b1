"""A trained network back from a run directory or checkpoint, for the commands that inspect one (eval, prune,
latency): the network its saved config describes, with the saved weights, and the data it was trained on."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from dnnlab import checkpoint, memory, stored, validate
from dnnlab.data import Splits, load
from dnnlab.errors import DnnlabError, bad_value
from dnnlab.model import build_mlp

FASHION_MNIST = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot")


def run_dir_of(ckpt: Path) -> Path:
    """The run directory a checkpoint belongs to (RUN for RUN/checkpoints/x.pt), else its folder."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def class_names(cfg: DictConfig, classes: list[int]) -> list[str]:
    names = FASHION_MNIST if cfg.data.name == "fashion_mnist" else tuple(str(d) for d in range(10))
    return [names[c] for c in classes]


@dataclass
class Trained:
    model: nn.Sequential  # in eval mode, on `device`
    cfg: DictConfig  # the run's resolved config
    data: Splits | None
    path: Path  # the checkpoint file
    run_dir: Path
    state: dict
    device: torch.device

    @property
    def classes(self) -> list[int]:
        return list(self.state.get("classes") or range(10))

    @property
    def names(self) -> list[str]:
        return class_names(self.cfg, self.classes)


def load_trained(path: str | Path, device: torch.device | str = "cpu", data_root: str | Path | None = None,
                 with_data: bool = True) -> Trained:
    """Rebuild a run's network from its checkpoint (weights_only loading; its saved config is data, see
    dnnlab.stored) and, with_data, load its dataset with its saved data settings."""
    device = torch.device(device)
    if data_root is not None and not Path(data_root).expanduser().is_dir():  # else the usual places would be used
        raise bad_value("--data-root", str(data_root), "an existing folder holding the dataset")
    ckpt = checkpoint.find(path)
    state = checkpoint.load(ckpt)
    cfg = stored.checkpoint_config(state, str(ckpt))  # data: no aliases, no interpolations
    validate.check_saved(cfg, str(ckpt))  # the command line's rules; build_mlp only looks its names up
    if data_root is not None:
        cfg.data.root = str(data_root)
    classes = list(state.get("classes") or range(10))
    model = network(cfg, state, len(classes), ckpt)
    model.to(device).eval()
    data = None
    if with_data:
        data = load(cfg.data, device)
        if list(data.classes) != classes:
            raise DnnlabError(f"{ckpt}: trained on classes {classes}, but the data config gives {list(data.classes)}")
    return Trained(model, cfg, data, ckpt, run_dir_of(ckpt), state, device)


def network(cfg: DictConfig, state: dict, n_classes: int, ckpt: Path) -> nn.Sequential:
    """The network a checkpoint's saved config describes, with its weights; built only when the file holds that
    many weights (a config is text: it could ask for any size), and one line naming the file if they do not fit."""
    held = sum(t.numel() for t in state["model"].values())
    if memory.n_parameters(cfg, n_classes) > held:
        raise DnnlabError(f"{ckpt}: its saved config describes {memory.n_parameters(cfg, n_classes):,} parameters, "
                          f"its weights hold {held:,} numbers; not a checkpoint of that network")
    try:
        with torch.random.fork_rng(devices=[]):  # the random initialisation (overwritten below) leaves no trace
            model = build_mlp(cfg, n_classes)
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError, ValueError, KeyError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__)[:120]
        raise DnnlabError(f"{ckpt}: the weights do not fit the network its config describes ({detail})") from None
    return model


def split(data: Splits, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name not in ("train", "val", "test"):
        raise DnnlabError(f"unknown split {name!r}: train, val or test")
    return getattr(data, f"x_{name}"), getattr(data, f"y_{name}")


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor, chunk: int = 8192, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The model's logits for every row of x, in chunks, as float32 (inputs cast to `dtype` if given)."""
    out = []
    for i in range(0, len(x), chunk):
        xb = x[i:i + chunk]
        out.append(model(xb.to(dtype) if dtype is not None else xb).float())
    return torch.cat(out) if out else torch.zeros(0)


def weight_matrices(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, kernel) of every Linear layer: hidden1..N and output (biases excluded, as Keras' regularizers)."""
    return [(name.split(".")[0], p) for name, p in model.named_parameters() if name.endswith("weight") and p.dim() == 2]
