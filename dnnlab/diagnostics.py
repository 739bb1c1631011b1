"""Per-layer diagnostics of the hidden layers, collected every `every` training steps (`diagnostics=on`).

For every hidden block (hidden1..N) on a sampled step:
- act_mean, act_std: mean and standard deviation of the activation function's outputs over the batch and the units;
- saturated: the fraction of sigmoid/tanh outputs within `saturation_margin` of an asymptote, as a fraction of the
  output range (sigmoid: below 0.05 or above 0.95 with the default 0.05; tanh: beyond ±0.9, the same point of the
  curve since tanh(x) = 2 sigmoid(2x) - 1); empty for other activations;
- dead: the fraction of units that output exactly zero for every example of the batch (dying ReLUs; leaky ReLU, ELU,
  SELU and the smooth activations do not output exact zeros, so theirs is 0);
- grad_norm: the L2 norm of the gradient of the layer's weight matrix;
- weight_norm and update_ratio: ||W|| before the step and ||W_after - W_before|| / ||W_before||, the size of the
  optimizer's update relative to the weights (around 1e-3 is the usual healthy order of magnitude).

The training loop calls begin(step) before the forward pass, before_step(step) after loss.backward() and before
optimizer.step(), and after_step(step) after it. On sampled steps (step % every == 0) begin() arms one-shot forward
hooks on the activation modules; other steps cost one integer check and no hooks run. Rows go to
run_dir/diagnostics.csv (one per hidden layer per sampled step) and to TensorBoard as diagnostics_<stat>/<layer>.
"""
from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from dnnlab import CONF_DIR, activations
from dnnlab.checkpoint import atomic_write
from dnnlab.errors import DnnlabError
from dnnlab.validate import check_values

COLUMNS = ("step", "layer", "act_mean", "act_std", "saturated", "dead", "grad_norm", "weight_norm", "update_ratio")
STATS = COLUMNS[2:]
# Activations with two horizontal asymptotes: {class: (lower, upper) of their output range} (dnnlab.activations).
SATURATING = activations.saturating()
STRUCTURE = (nn.Linear, nn.BatchNorm1d, nn.LayerNorm, _DropoutNd, nn.Flatten, nn.Identity)
DEFAULTS = CONF_DIR / "diagnostics" / "on.yaml"


def settings(cfg: DictConfig | dict | None = None, **overrides) -> DictConfig:
    """conf/diagnostics/on.yaml's values, updated by cfg (when given) and by keyword overrides; checked with the
    declarations of dnnlab.schema."""
    on = OmegaConf.load(DEFAULTS)
    on.pop("defaults")  # the option's schema node (Hydra's defaults list), not a setting
    merged = OmegaConf.merge(on, cfg or {}, overrides)
    check_values(OmegaConf.create({"diagnostics": merged}))
    return merged


@dataclass
class Layer:
    name: str  # hidden1..N
    depth: int  # 1..N
    act: nn.Module  # the module whose output is measured
    weight: torch.Tensor  # the block's Linear kernel


def activation_module(block: nn.Module) -> nn.Module:
    """The activation function of a hidden block: its last child that is not Linear, a norm layer or dropout (the
    block itself if it has none)."""
    found = [m for m in block.children() if not isinstance(m, STRUCTURE)]
    return found[-1] if found else block


def hidden_layers(model: nn.Module) -> list[Layer]:
    """The hidden blocks of a dnnlab MLP (hidden1..N, in order), with their activation and weight matrix."""
    layers = []
    for name, block in model.named_children():
        if name.startswith("hidden") and name[6:].isdigit():
            linear = next((m for m in block.modules() if isinstance(m, nn.Linear)), None)
            if linear is None:
                raise DnnlabError(f"hidden block {name} has no Linear layer")
            layers.append(Layer(name, int(name[6:]), activation_module(block), linear.weight))
    if not layers:
        raise DnnlabError("the network has no hidden layers to diagnose (model.n_hidden=0)")
    return layers


@torch.no_grad()
def activation_stats(out: torch.Tensor, act: nn.Module, margin: float) -> torch.Tensor:
    """[mean, std, saturated, dead] of one layer's activations (batch, units), as one float tensor on their device
    (saturated is NaN for activations that do not saturate)."""
    out = out.detach().float().flatten(1)
    std, mean = torch.std_mean(out) if out.numel() > 1 else (torch.full_like(out.sum(), math.nan), out.mean())
    bounds = next((b for cls, b in SATURATING.items() if isinstance(act, cls)), None)
    if bounds is None:
        saturated = torch.full_like(mean, math.nan)
    else:
        lo, hi = bounds
        edge = margin * (hi - lo)
        saturated = ((out <= lo + edge) | (out >= hi - edge)).float().mean()
    dead = (out == 0).all(0).float().mean()
    return torch.stack([mean, std, saturated, dead])


def capture(model: nn.Module, x: torch.Tensor, layers: list[Layer] | None = None) -> dict[str, torch.Tensor]:
    """The activations of every hidden layer for inputs x (one forward pass in the model's current mode; the
    caller chooses no_grad or not). Returns {layer name: (batch, units) tensor} and the output as "output"."""
    layers = layers or hidden_layers(model)
    found: dict[str, torch.Tensor] = {}
    handles = [layer.act.register_forward_hook(lambda m, i, o, name=layer.name: found.__setitem__(name, o))
               for layer in layers]
    try:
        found["output"] = model(x)
    finally:
        for h in handles:
            h.remove()
    return found


class Diagnostics:
    """Per-layer statistics of the hidden layers every `cfg.every` steps, to diagnostics.csv and TensorBoard.

    `step` must grow over the whole run (not restart in a second training phase). keep_until (resuming a run from
    a checkpoint taken at that step) drops the rows of steps >= keep_until already in diagnostics.csv, since those
    steps run again. keep=True also keeps every row in self.history and, per sampled step, the activations in
    self.activations (for `dnnlab diagnose`'s plots)."""

    def __init__(self, model: nn.Module, cfg: DictConfig | dict | None, run_dir: Path, tb_writer=None, *,
                 keep: bool = False, keep_until: int | None = None):
        self.cfg = settings(cfg)
        self.every, self.margin = int(self.cfg.every), float(self.cfg.saturation_margin)
        self.histograms = bool(self.cfg.histograms)
        self.layers = hidden_layers(model)
        self.tb, self.keep = tb_writer, keep
        self.history: list[dict] = []
        self.activations: dict[int, dict[str, torch.Tensor]] = {}
        self._armed, self._step = False, None
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._stats: dict[str, torch.Tensor] = {}
        self._acts: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}
        self._before: dict[str, torch.Tensor] = {}
        self.csv_path = Path(run_dir) / "diagnostics.csv"
        try:
            self.csv_path.parent.mkdir(parents=True, exist_ok=True)
            if keep_until is not None and self.csv_path.exists():
                self._truncate(keep_until)
            fresh = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
            self._file = open(self.csv_path, "a", newline="")
        except OSError as e:
            raise DnnlabError(f"cannot write {self.csv_path}: {e.strerror or e}") from None
        if fresh:
            self._write([COLUMNS])

    # --- the three calls of a training step -------------------------------------------------------------------

    def begin(self, step: int) -> None:
        """Before the forward pass: on a sampled step, arm one-shot hooks on the activation modules."""
        if step % self.every:
            return
        self._remove_hooks()
        self._armed, self._step = True, step
        self._stats, self._acts, self._grads, self._before = {}, {}, {}, {}
        for layer in self.layers:
            self._hooks[layer.name] = layer.act.register_forward_hook(partial(self._hook, layer))

    def before_step(self, step: int) -> None:
        """After backward(), before optimizer.step(): gradient norms, and the weights for the update ratio."""
        if not self._armed:
            return
        self._remove_hooks()
        with torch.no_grad():
            for layer in self.layers:
                g = layer.weight.grad
                self._grads[layer.name] = torch.linalg.vector_norm(g.float()) if g is not None else None
                self._before[layer.name] = layer.weight.detach().clone()

    def after_step(self, step: int) -> None:
        """After optimizer.step(): the update ratio; one CSV row per hidden layer, and TensorBoard scalars."""
        if not self._armed:
            return
        self._armed = False
        self._remove_hooks()
        with torch.no_grad():
            columns = []
            for layer in self.layers:
                device = layer.weight.device
                act = self._stats.get(layer.name)
                act = act if act is not None else torch.full((4,), math.nan, device=device)
                grad = self._grads.get(layer.name)
                before = self._before.get(layer.name)
                if before is not None:
                    w_norm = torch.linalg.vector_norm(before.float())
                    ratio = torch.linalg.vector_norm((layer.weight.detach() - before).float()) / w_norm
                else:  # before_step was not called: no update to measure
                    w_norm = torch.linalg.vector_norm(layer.weight.detach().float())
                    ratio = torch.full_like(w_norm, math.nan)
                grad = grad if grad is not None else torch.full_like(w_norm, math.nan)
                columns.append(torch.cat([act.to(device), torch.stack([grad, w_norm, ratio])]))
            values = torch.stack(columns).cpu().tolist()  # one device sync for the whole step
        rows = []
        for layer, vals in zip(self.layers, values):
            row = {"step": self._step, "layer": layer.name, **dict(zip(STATS, vals))}
            rows.append(row)
        self._write([[_cell(r[c]) for c in COLUMNS] for r in rows])
        if self.tb is not None:
            for r in rows:
                for stat in STATS:
                    if not math.isnan(r[stat]):  # a statistic that does not apply (saturation of ReLU) is left out
                        self.tb.add_scalar(f"diagnostics_{stat}/{r['layer']}", r[stat], self._step)
            if self.histograms:
                for name, a in self._acts.items():
                    self.tb.add_histogram(f"diagnostics_activations/{name}", a.float().cpu(), self._step)
        if self.keep:
            self.history.extend(rows)
            self.activations[self._step] = {k: v.float().cpu() for k, v in self._acts.items()}
        self._acts, self._before, self._grads, self._stats = {}, {}, {}, {}

    def close(self) -> None:
        self._remove_hooks()
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        if self.tb is not None:
            self.tb.flush()

    # --- internals ---------------------------------------------------------------------------------------------

    def _hook(self, layer: Layer, module, inputs, output) -> None:
        self._stats[layer.name] = activation_stats(output, layer.act, self.margin)
        if self.histograms or self.keep:
            self._acts[layer.name] = output.detach()
        handle = self._hooks.pop(layer.name, None)  # one-shot: later forward passes of this step run hook-free
        if handle is not None:
            handle.remove()

    def _remove_hooks(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()

    def _truncate(self, keep_until: int) -> None:
        """Keep the header and the rows of steps < keep_until (rewritten atomically)."""
        lines = self.csv_path.read_text().splitlines(keepends=True)
        kept = lines[:1] + [line for line in lines[1:]
                            if line.split(",", 1)[0].isdigit() and int(line.split(",", 1)[0]) < keep_until]
        if len(kept) != len(lines):
            atomic_write(self.csv_path, "".join(kept).encode())

    def _write(self, rows: list[list]) -> None:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        try:
            self._file.write(buffer.getvalue())  # whole rows in one write; fsync at close()
            self._file.flush()
        except OSError as e:
            raise DnnlabError(f"cannot write {self.csv_path}: {e.strerror or e}") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _cell(value):
    """CSV cell: empty for NaN (a statistic that does not apply), repr-precise floats otherwise."""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value


def read_csv(path: Path) -> list[dict]:
    """diagnostics.csv as dicts: step int, layer str, the statistics as floats (NaN for empty cells)."""
    with open(path, newline="") as f:
        return [{"step": int(r["step"]), "layer": r["layer"],
                 **{s: float(r[s]) if r[s] != "" else math.nan for s in STATS}} for r in csv.DictReader(f)]
