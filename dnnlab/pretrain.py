"""`dnnlab pretrain`: train the hidden layers without the task's labels, for reuse with few labels.

Two of the chapter's techniques:
- autoencoder: reconstruct the images (unlabeled), greedily one hidden layer at a time with the lower ones frozen,
  or the whole stack at once with a mirrored decoder;
- same_digit: an auxiliary task, telling whether two images show the same digit (two copies of the network's
  hidden stack, pairs drawn from the labelled training split).
The run leaves checkpoints/last.pt in the normal format, so `transfer=reuse transfer.source=RUN_DIR` reuses it.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dnnlab import CONF_DIR, checkpoint, conf_dirs, hydra_files  # conf_dirs: the resolver pretrain_app.yaml uses
from dnnlab.components import make
from dnnlab.errors import bad_value
from dnnlab.model import widths
from dnnlab.optim import build_optimizer
from dnnlab.prepare import prepare
from dnnlab.record import Recorder, environment, plot_learning_curves, write_json
from dnnlab.train import run_task
from dnnlab.ui import Progress, print_summary

log = logging.getLogger("dnnlab")


class PairSampler:
    """Batches of image pairs, half of the same class and half of different classes, drawn on the device."""

    def __init__(self, y: torch.Tensor, n_classes: int, generator: torch.Generator):
        self.generator, self.n_classes = generator, n_classes
        members = [torch.nonzero(y == c).flatten() for c in range(n_classes)]
        if min(len(m) for m in members) == 0:
            raise bad_value("data.classes", n_classes, "classes that all have training images (same_digit pairs)")
        self.counts = torch.tensor([len(m) for m in members], device=y.device)
        self.table = torch.stack([F.pad(m, (0, int(self.counts.max()) - len(m))) for m in members])  # class x index
        self.y = y

    def _member(self, classes: torch.Tensor) -> torch.Tensor:
        r = torch.rand(len(classes), device=classes.device, generator=self.generator)
        return self.table[classes, (r * self.counts[classes]).long()]

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices a, indices b, target 1.0 for the same class)."""
        dev = self.y.device
        a = torch.randint(len(self.y), (n,), device=dev, generator=self.generator)
        same = torch.arange(n, device=dev) % 2 == 0
        shift = torch.randint(1, self.n_classes, (n,), device=dev, generator=self.generator)
        other = torch.where(same, self.y[a], (self.y[a] + shift) % self.n_classes)
        return a, self._member(other), same.float()


class SameDigit(nn.Module):
    """Two copies (shared weights) of the tower; their codes side by side feed a small head: same digit or not."""

    def __init__(self, tower: nn.Sequential, width: int, head_units: int, make_act):
        super().__init__()
        self.tower = tower
        self.head = nn.Sequential(nn.Linear(2 * width, head_units), make_act(), nn.Linear(head_units, 1))

    def forward(self, xa, xb):
        return self.head(torch.cat([self.tower(xa), self.tower(xb)], dim=1)).squeeze(1)


def decoder(sizes: list[int], make_act) -> nn.Sequential:
    """Linear layers through `sizes` with activations between them (none on the reconstruction)."""
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(make_act())
    return nn.Sequential(*layers)


def stages(cfg: DictConfig, model: nn.Sequential) -> list[tuple[str, nn.Module, callable]]:
    """(name, module to train, loss on a batch of inputs) for each stage of the chosen method."""
    p, hidden = cfg.pretrain, [model._modules[f"hidden{i + 1}"] for i in range(len(widths(cfg.model)))]
    make_act = make(cfg.activation, "activation")
    sizes = [28 * 28] + widths(cfg.model)

    def corrupt(x):  # a denoising autoencoder must learn structure, not the identity
        return x + p.noise * torch.randn_like(x) if p.noise else x

    if p.kind == "autoencoder" and p.greedy:
        result = []
        for i, block in enumerate(hidden):
            below = nn.Sequential(model.input, *hidden[:i])  # fixed, in inference mode, while this layer trains
            ae = nn.Sequential(block, nn.Linear(sizes[i + 1], sizes[i]))

            def loss(x, below=below, ae=ae):
                with torch.no_grad():
                    target = below.eval()(x)
                return F.mse_loss(ae(corrupt(target)), target)
            result.append((f"layer {i + 1}", ae, loss))
        return result
    if p.kind == "autoencoder":
        ae = nn.Sequential(model.input, *hidden, decoder(sizes[::-1], make_act))
        return [("stack", ae, lambda x: F.mse_loss(ae(corrupt(x)), x))]
    return [("same digit", SameDigit(nn.Sequential(model.input, *hidden), sizes[-1], p.head_units, make_act), None)]


def batch_loss(module, loss_fn, x, idx) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, number correct) of one batch: reconstruction for autoencoders (idx: the rows, None: all of x), whether
    two images show the same digit for pairs (idx: first images, second images, same or not)."""
    if loss_fn is not None:
        return loss_fn(x[idx] if idx is not None else x), torch.zeros((), device=x.device)
    a, b, same = idx
    logits = module(x[a], x[b])
    return F.binary_cross_entropy_with_logits(logits, same), ((logits > 0).float() == same).sum()


def stage_epoch(module, loss_fn, optimizer, data, batches, val_idx, steps: int, progress
                ) -> tuple[float, float, float, float]:
    """One epoch of a stage over `steps` batches drawn by `batches(i)`: (training loss, training predictions right,
    validation loss, validation predictions right)."""
    device = data.x_train.device
    total, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    module.train()
    for i in range(steps):
        loss, right = batch_loss(module, loss_fn, data.x_train, batches(i))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
        correct += right
        if i % 50 == 0:
            progress.step(i)
    module.eval()
    with torch.no_grad():
        val_loss, val_right = batch_loss(module, loss_fn, data.x_val, val_idx)
    return total.item() / steps, correct.item(), val_loss.item(), val_right.item()


def train_stages(cfg: DictConfig, model, data, recorder, generator, progress_on: bool) -> list[dict]:
    """Each stage's epochs, one after another: the rows of metrics.csv."""
    p, bs, device = cfg.pretrain, cfg.trainer.batch_size, data.x_train.device
    n, rows, plan = len(data.x_train), [], stages(cfg, model)
    steps = max(1, n // bs)
    if p.kind == "same_digit":
        pairs = PairSampler(data.y_train, data.n_classes, generator)
        val_pairs = PairSampler(data.y_val, data.n_classes, generator).sample(len(data.y_val))  # fixed for all epochs
    with Progress(p.epochs * len(plan), steps, enabled=progress_on) as progress:
        for name, module, loss_fn in plan:
            module.to(device)
            optimizer = build_optimizer(cfg.optimizer, [q for q in module.parameters() if q.requires_grad], device)
            for _ in range(p.epochs):
                start = time.perf_counter()
                perm = torch.randperm(n, device=device, generator=generator)
                batches = (lambda i: perm[i * bs:(i + 1) * bs]) if loss_fn is not None else (lambda i: pairs.sample(bs))
                train_loss, right, val_loss, val_right = stage_epoch(
                    module, loss_fn, optimizer, data, batches, None if loss_fn is not None else val_pairs, steps,
                    progress)
                if not math.isfinite(train_loss):
                    raise bad_value("optimizer.lr", cfg.optimizer.lr, f"a lower rate: pretraining diverged ({name})")
                row = {"epoch": len(rows) + 1, "train_loss": train_loss,
                       "train_acc": right / (steps * bs) if loss_fn is None else math.nan, "val_loss": val_loss,
                       "val_acc": val_right / len(data.y_val) if loss_fn is None else math.nan,
                       "lr": cfg.optimizer.lr, "seconds": time.perf_counter() - start}
                rows.append(row)
                recorder.log_epoch(row)
                progress.epoch(row)
            log.info("pretrain %s: %s, validation loss %.4f", p.kind, name, rows[-1]["val_loss"])
    return rows


def pretrain(cfg: DictConfig, run_dir: Path, parallel_jobs: int = 1) -> dict:
    device, data, model = prepare(cfg, parallel_jobs)
    hydra_files.started(run_dir)  # checked: from here the run writes
    p = cfg.pretrain
    if p.kind == "same_digit" and cfg.data.n_per_class is not None:
        log.warning("same_digit pairs come from data.n_per_class=%s images per class", cfg.data.n_per_class)
    recorder = Recorder(run_dir)
    write_json(run_dir / "environment.json", environment(device))
    generator = torch.Generator(device=device).manual_seed(cfg.trainer.seed)
    rows = train_stages(cfg, model, data, recorder, generator, cfg.trainer.progress)
    recorder.close()
    for q in model.parameters():
        q.requires_grad_(True)
    checkpoint.save(run_dir / "checkpoints" / "last.pt", {
        "model": model.state_dict(), "epoch": len(rows), "config": OmegaConf.to_yaml(cfg, resolve=True),
        "classes": list(data.classes), "pretrain": OmegaConf.to_container(p)})
    summary = {"status": "completed", "pretrain": OmegaConf.to_container(p), "epochs": len(rows),
               "monitor": "val_loss", "val_loss": rows[-1]["val_loss"], "val_acc": rows[-1]["val_acc"],
               "train_seconds": sum(r["seconds"] for r in rows), "device": str(device),
               "n_train": len(data.x_train), "n_val": len(data.y_val), "data_source": data.source}
    write_json(run_dir / "summary.json", summary)
    plot_learning_curves(rows, run_dir / "learning_curves.png")
    print_summary(summary, run_dir)
    return summary


@hydra.main(config_path=str(CONF_DIR), config_name="pretrain_app", version_base="1.3")
def main(cfg: DictConfig) -> float:
    return run_task(pretrain, cfg)
