"""`dnnlab diagnose [overrides]`: the configured network's hidden layers at initialisation and after a few hundred
training steps, without a full run.

A fixed probe batch of training images goes through the network (in training mode, with a backward pass but no
update) at step 0 and again after `diagnose.steps` steps of the configured optimizer (schedule, regularizers and
batch size as `dnnlab train` would use them): activation histograms per layer and depth profiles (activation
mean/std, saturated and dead fractions, gradient per layer). In between, the same Diagnostics class as
`diagnostics=on` in `dnnlab train` records every `diagnose.every` steps. Gradients are compared across layers as
the RMS gradient per weight, ||dloss/dW|| / sqrt(number of weights), since the first layer has 784 inputs and the
others far fewer (diagnostics.csv keeps the plain norm).

Writes into the run directory: activations.png, gradients.png (a line per layer over the steps, and the profile
across depth), profile.png, steps.png, diagnostics.csv (Diagnostics' rows), profile.csv (the probe, every layer),
diagnose.json, tensorboard/.
"""
from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from dnnlab import CONF_DIR, bookkeeping, hydra_files, transfer
from dnnlab.diagnose_plots import PROFILE, write_plots_and_tables
from dnnlab.diagnostics import Diagnostics, activation_stats, capture, hidden_layers, settings
from dnnlab.errors import bad_value
from dnnlab.optim import GradientRules, build_optimizer, set_rates
from dnnlab.prepare import prepare
from dnnlab.record import environment, write_json
from dnnlab.schedule import build_schedule
from dnnlab.steps import batches, choose_step
from dnnlab.train import run_task
from dnnlab.ui import console

log = logging.getLogger("dnnlab")
RULES = {
    "steps": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "every": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "probe_size": (lambda v: _int(v) and v >= 2, "an integer >= 2"),
    "max_panels": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
}


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check(d: DictConfig) -> None:
    for key, (ok, allowed) in RULES.items():
        if not ok(d.get(key)):
            raise bad_value(f"diagnose.{key}", d.get(key), allowed)


def diagnostics_settings(cfg: DictConfig) -> DictConfig:
    """conf/diagnostics/on.yaml, with the run's own diagnostics.* values when it chose diagnostics=on, and every
    from diagnose.every."""
    own = cfg.get("diagnostics")
    own = own if own is not None and own.get("enabled") else {}
    return settings(own, every=cfg.diagnose.every)


def probe(model, x: torch.Tensor, y: torch.Tensor, layers, margin: float) -> tuple[list[dict], dict]:
    """One forward and backward pass of the probe batch in training mode, without an update; the model (weights and
    BN statistics) is left exactly as it was. Returns per-layer statistics and the activations (on the CPU)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.train()
    model.zero_grad(set_to_none=True)
    acts = capture(model, x, layers)
    F.cross_entropy(acts.pop("output").float(), y).backward()
    rows = []
    for layer in layers:
        stats = activation_stats(acts[layer.name], layer.act, margin).tolist() if layer.name in acts \
            else [math.nan] * 4
        g = layer.weight.grad
        grad = torch.linalg.vector_norm(g.float()).item() if g is not None else math.nan
        rms = grad / math.sqrt(layer.weight.numel())  # per weight: the 784-input first layer compares with the rest
        rows.append({"layer": layer.name, "depth": layer.depth, **dict(zip(PROFILE, stats + [grad, rms]))})
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    return rows, {k: v.detach().float().cpu() for k, v in acts.items()}


def diagnose(cfg: DictConfig, run_dir: Path, parallel_jobs: int = 1) -> dict:
    """Probes the network, trains it diagnose.steps steps, probes it again; writes the plots and tables and returns
    diagnose.json's content."""
    d = cfg.diagnose
    check(d)
    dset = diagnostics_settings(cfg)
    device, data, model, layers = set_up(cfg, run_dir, parallel_jobs)
    generator = torch.Generator(device=device).manual_seed(cfg.trainer.seed)  # draws the probe, then the batches
    x_probe, y_probe = probe_batch(data, d.probe_size, generator, device)
    margin = float(dset.saturation_margin)
    init = probe(model, x_probe, y_probe, layers, margin)
    losses, diverged_at, diag = train_and_record(cfg, model, data, device, generator, dset, run_dir)
    steps_done = len(losses)
    if diverged_at is not None:
        log.warning("the loss is not finite at step %d: diverged (the plots show the steps before)", diverged_at)
    final = probe(model, x_probe, y_probe, layers, margin)
    write_plots_and_tables(run_dir, layers, diag.history, losses, init, final, steps_done, d.max_panels)

    summary = {
        "status": "completed", "steps": steps_done, "diverged_at": diverged_at, "every": diag.every,
        "probe_size": len(x_probe), "activation": cfg.activation._target_.rsplit(".", 1)[-1],
        "init": OmegaConf.to_container(cfg.init), "n_hidden": len(layers), "lr": cfg.optimizer.lr,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "profile": {"init": init[0], "after": final[0]},
        "files": ["activations.png", "gradients.png", "profile.png", "steps.png", "diagnostics.csv", "profile.csv"],
    }
    write_json(run_dir / "diagnose.json", summary)
    console.print(f"plots and tables in {run_dir}")
    return summary


def set_up(cfg: DictConfig, run_dir: Path, parallel_jobs: int):
    """The device, data and model as `dnnlab train` prepares them (with the transferred layers), the hidden layers,
    and environment.json."""
    device, data, model = prepare(cfg, parallel_jobs)
    hydra_files.started(run_dir)  # checked: from here the run writes
    if cfg.transfer.source:
        transfer.reuse(model, cfg)
    layers = hidden_layers(model)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "environment.json", environment(device))
    return device, data, model, layers


def probe_batch(data, size: int, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` training images drawn at random: the batch probed before and after the steps."""
    pick = torch.randperm(len(data.x_train), device=device, generator=generator)[:size]
    return data.x_train[pick], data.y_train[pick]


def train_and_record(cfg: DictConfig, model, data, device, generator, dset, run_dir: Path):
    """diagnose.steps steps of the configured training (`dnnlab train`'s step, with Diagnostics' hooks), recording every
    diagnose.every steps (Diagnostics' rows and TensorBoard's loss); stops at the first loss that is not finite.
    Returns the losses, the step it diverged at (or None) and the Diagnostics, whose history the plots draw."""
    from torch.utils.tensorboard import SummaryWriter  # late: slow to import

    tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
    n, bs = len(data.x_train), cfg.trainer.batch_size
    # as `dnnlab train` counts them: a lone last example would break BatchNorm
    steps_per_epoch = max(1, bookkeeping.steps_per_epoch(n, bs))
    optimizer, rules, schedule = training_rules(cfg, model, device, steps_per_epoch)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.trainer.precision == "bf16" else nullcontext()
    losses, diverged_at = [], None
    with Diagnostics(model, dset, run_dir, tb, keep=True) as diag:
        step = choose_step(model, data.x_train, data.y_train, optimizer, rules, autocast=autocast, diag=diag)
        model.train()
        for t, idx in batches(n, bs, steps_per_epoch, cfg.diagnose.steps, generator, device):
            set_rates(optimizer, schedule, t)
            losses.append(float(step(idx, t)))  # read every step: diagnose is no speed path
            if not math.isfinite(losses[-1]):
                diverged_at = t
                break
            if t % diag.every == 0:
                tb.add_scalar("loss", losses[-1], t)
    tb.close()
    return losses, diverged_at, diag


def training_rules(cfg: DictConfig, model, device, steps_per_epoch: int):
    """The configured optimizer (over the trainable parameters), regularizers and schedule."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg.optimizer, trainable, device)
    rules = GradientRules(model, cfg.regularizer, cfg.trainer)
    schedule = build_schedule(cfg.schedule, cfg.optimizer.lr, cfg.trainer.epochs * steps_per_epoch, steps_per_epoch)
    return optimizer, rules, schedule


@hydra.main(config_path=str(CONF_DIR), config_name="diagnose_app", version_base="1.3")
def main(cfg: DictConfig) -> float:
    return run_task(diagnose, cfg)
