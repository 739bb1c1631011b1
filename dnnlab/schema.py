"""The type and the allowed values of every config key, declared once, next to each other (see dnnlab.allowed).

One dataclass per section, or per option where a section's options have different keys. The values are the YAML
options' (conf/, conf_pretrain/), with their comments; every value here is MISSING.

Hydra's structured config schema: the options of data, model, trainer, diagnostics, transfer, norm, schedule and
pretrain extend their class's node through their defaults list (`- /schema_batch_norm@_here_`), which Hydra's
ConfigStore holds from the import of dnnlab on. The options of the other sections stay open nodes, declared here
all the same: regularizer's combine (`regularizer=[l2,dropout]`), and a typed node of one option does not merge
into another's (`Merge error: Dropout is not a subclass of L2`); the keys of optimizer, activation and init are a
torch callable's arguments, and any other argument it takes is one override away (`+optimizer.amsgrad=true`).
"""
from __future__ import annotations

import functools
import os
import re
import typing
from dataclasses import dataclass
from typing import Literal

from hydra.core.config_store import ConfigStore

from dnnlab.allowed import allows, declared, node, section

MAX_EPOCHS = 100_000  # more is a typo: at a second an epoch, over a day of training
FanMode = Literal["fan_in", "fan_out", "fan_avg"]
Distribution = Literal["normal", "truncated_normal", "uniform"]
# old key: its new place (gradient clipping is the trainer's, as in Lightning's Trainer)
MOVED = {"optimizer.clip_value": "trainer.clip_value", "optimizer.clip_norm": "trainer.clip_norm"}


def moved(key: str) -> str:
    """The line that says where a moved key is now."""
    return f"{key} is now {MOVED[key]}"


def device_ok(v) -> bool:
    return isinstance(v, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None


def distinct(v) -> bool:
    return len(set(v)) == len(v)


def increasing(v) -> bool:
    return list(v) == sorted(set(v))


COMPONENT = ("a dnnlab component (a _target_ of the shipped configs, a torch.nn module, torch.optim optimizer or "
             "torch.nn.init function); allow others with $DNNLAB_ALLOWED_TARGETS=name,...")
BOOL = "true or false"
POSITIVE = "a number > 0"
NON_NEGATIVE = "a number >= 0"
AT_LEAST_1 = "null or an integer >= 1"


@dataclass
class Component:
    """Hydra's settings of a section that names a callable; dnnlab.components decides what it may name."""
    _target_: str = allows(COMPONENT)  # which names: dnnlab.components
    _partial_: bool = allows(BOOL)


@dataclass
class Data:
    name: Literal["mnist", "fashion_mnist"] = allows("mnist or fashion_mnist")
    root: str | None = allows("null or an existing folder", test=lambda v: os.path.isdir(os.path.expanduser(v)))
    classes: list[int] | None = allows("null or a list of at least 2 distinct digits 0-9, e.g. [0,1,2,3,4]",
                                       ge=0, le=9, min_len=2, test=distinct)
    n_per_class: int | None = allows(AT_LEAST_1, ge=1)
    draw: Literal["random", "first"] = allows("random or first (how n_per_class and val_per_class pick)")
    n_train: int | None = allows(AT_LEAST_1, ge=1)
    val_per_class: int | None = allows(AT_LEAST_1, ge=1)
    val_size: int = allows("an integer from 1 to 59999", ge=1, le=59_999)
    val_from: Literal["first", "last"] = allows("first or last (which training images validate)")
    folds: int | None = allows("null or an integer >= 2 (k-fold cross-validation)", ge=2)
    fold: int = allows("an integer from 0 to data.folds - 1", ge=0)
    standardize: Literal["none", "global", "per_pixel"] = allows("none, global or per_pixel")
    seed: int = allows("an integer")


@dataclass
class Model:
    name: Literal["mlp"] = allows("mlp")
    n_hidden: int = allows("an integer from 0 to 10,000", ge=0, le=10_000)
    n_neurons: int | list[int] = allows("an integer >= 1 or a list of them, e.g. [300,100]", ge=1, min_len=1)


@dataclass
class Init(Component):
    scale: float = allows(POSITIVE, gt=0)
    mode: FanMode = allows(" or ".join(typing.get_args(FanMode)))
    distribution: Distribution = allows(" or ".join(typing.get_args(Distribution)))
    std: float = allows(POSITIVE, gt=0)
    mean: float = allows("a number")
    gain: float = allows(POSITIVE, gt=0)
    val: float = allows("a number")
    bias: float = allows("a number")
    activation: str = allows("an activation's _target_ (init=auto: ${activation._target_})")


@dataclass
class Activation(Component):
    negative_slope: float = allows(NON_NEGATIVE, ge=0)
    alpha: float = allows(POSITIVE, gt=0)
    lower: float = allows(NON_NEGATIVE, ge=0)
    upper: float = allows(NON_NEGATIVE, ge=0)
    init: float = allows("a number")
    beta: float = allows(POSITIVE, gt=0)
    approximate: Literal["none", "tanh"] = allows("none or tanh")


@dataclass
class Norm:
    kind: Literal["none", "batch", "layer"] = allows("none, batch or layer")
    input: bool = allows(BOOL)


@dataclass
class LayerNorm(Norm):
    position: Literal["before", "after"] = allows("before or after (the activation)")
    eps: float = allows(POSITIVE, gt=0)


@dataclass
class BatchNorm(LayerNorm):
    momentum: float = allows("a number in (0, 1]: the weight of each new batch", gt=0, le=1)


@dataclass
class Optimizer(Component):
    lr: float = allows(POSITIVE, gt=0)
    momentum: float = allows("a number in [0, 1)", ge=0, lt=1)
    nesterov: bool = allows(BOOL)
    betas: list[float] = allows("two numbers in [0, 1), e.g. [0.9,0.999]", ge=0, lt=1, min_len=2, max_len=2)
    alpha: float = allows("a number in [0, 1)", ge=0, lt=1)
    eps: float = allows(POSITIVE, gt=0)
    weight_decay: float = allows(NON_NEGATIVE, ge=0)
    initial_accumulator_value: float = allows(NON_NEGATIVE, ge=0)
    learning_rate_power: float = allows("a number <= 0 (Keras: -0.5)", le=0)
    l1: float = allows(NON_NEGATIVE, ge=0)
    l2: float = allows(NON_NEGATIVE, ge=0)
    l2_shrinkage: float = allows(NON_NEGATIVE, ge=0)
    beta: float = allows(NON_NEGATIVE, ge=0)
    fused: bool | None = allows("true, false or null (torch's choice)")  # torch's faster kernels
    foreach: bool | None = allows("true, false or null (torch's choice)")


@dataclass
class ConstantSchedule(Component):
    warmup_steps: int = allows("an integer >= 0", ge=0)


@dataclass
class DecaySchedule(ConstantSchedule):
    s: float = allows(POSITIVE, gt=0)


@dataclass
class PowerSchedule(DecaySchedule):
    c: float = allows(NON_NEGATIVE, ge=0)


@dataclass
class ExponentialSchedule(DecaySchedule):
    unit: Literal["step", "epoch"] = allows("step or epoch (what t counts in lr0 * 0.1^(t/s))")


@dataclass
class PiecewiseSchedule(ConstantSchedule):
    boundaries: list[int] = allows("a list of increasing epoch numbers >= 1, e.g. [5,15]", ge=1, min_len=1,
                                   test=increasing)
    values: list[float] = allows("a list of learning rates > 0, one more than boundaries", gt=0, min_len=2)


@dataclass
class CosineSchedule(ConstantSchedule):
    min_lr: float = allows(NON_NEGATIVE, ge=0)


@dataclass
class PerformanceSchedule(CosineSchedule):
    factor: float = allows("a number in (0, 1)", gt=0, lt=1)
    patience: int = allows("an integer >= 0", ge=0)
    min_delta: float = allows(NON_NEGATIVE, ge=0)


@dataclass
class OneCycleSchedule(ConstantSchedule):
    max_lr: float = allows(POSITIVE, gt=0)
    div_factor: float = allows("a number >= 1", ge=1)
    final_div_factor: float = allows("a number >= 1", ge=1)
    pct_rise: float = allows("a number in (0, 0.5)", gt=0, lt=0.5)
    cycle_momentum: bool = allows(BOOL)
    base_momentum: float = allows("a number in [0, 1)", ge=0, lt=1)
    max_momentum: float = allows("a number in [0, 1)", ge=0, lt=1)


@dataclass
class Dropout:
    rate: float = allows("a rate in [0, 1)", ge=0, lt=1)
    top_k: int | None = allows("null (all hidden layers) or an integer >= 1", ge=1)
    input: bool = allows(BOOL)


@dataclass
class Regularizer:
    l1: float = allows(NON_NEGATIVE, ge=0)
    l2: float = allows(NON_NEGATIVE, ge=0)
    max_norm: float = allows(POSITIVE, gt=0)
    dropout: Dropout = section(Dropout)
    alpha_dropout: Dropout = section(Dropout)


@dataclass
class EarlyStopping:
    monitor: Literal["val_loss", "val_acc"] | None = allows("val_loss, val_acc or null (off)")
    patience: int = allows("an integer >= 0", ge=0)
    restore_best_weights: bool = allows(BOOL)


@dataclass
class Trainer:
    epochs: int = allows(f"an integer from 1 to {MAX_EPOCHS:,}", ge=1, le=MAX_EPOCHS)
    batch_size: int = allows("an integer >= 1", ge=1)
    clip_value: float | None = allows("null or a number > 0", gt=0)
    clip_norm: float | None = allows("null or a number > 0", gt=0)
    device: str = allows("auto, cpu, cuda, cuda:N or mps", test=device_ok)
    threads: Literal["auto"] | int = allows("auto or an integer >= 1", ge=1)
    seed: int = allows("an integer")
    deterministic: bool = allows(BOOL)
    precision: Literal["fp32", "bf16"] = allows("fp32 or bf16")
    compile: bool = allows(BOOL)
    native: Literal["auto"] | bool = allows("auto, true or false")
    early_stopping: EarlyStopping = section(EarlyStopping)
    resume: bool = allows(BOOL)
    checkpoint_every: int = allows("an integer >= 0 (0: only last and best)", ge=0)
    keep_checkpoints: int | None = allows("null (keep all) or an integer >= 1", ge=1)
    limit_batches: int | None = allows(AT_LEAST_1, ge=1)
    overfit_batches: int | None = allows(AT_LEAST_1, ge=1)
    progress: bool = allows(BOOL)


@dataclass
class Diagnostics:
    enabled: bool = allows(BOOL)


@dataclass
class DiagnosticsOn(Diagnostics):
    every: int = allows("an integer >= 1 (record every N training steps)", ge=1)
    saturation_margin: float = allows("a number in (0, 0.5)", gt=0, lt=0.5)
    histograms: bool = allows(BOOL)


@dataclass
class Transfer:
    source: str | None = allows("null or a run directory or checkpoint", test=lambda v: v != "")


@dataclass
class TransferReuse(Transfer):
    reuse_layers: Literal["all"] | int = allows("all or an integer >= 1", ge=1)
    freeze: bool = allows(BOOL)
    cache: bool = allows(BOOL)
    unfreeze_top: Literal["all"] | int = allows("all or an integer >= 0", ge=0)
    unfreeze_lr_factor: float = allows("a number > 0 (usually below 1)", gt=0)
    frozen_epochs: int | None = allows(AT_LEAST_1, ge=1)


@dataclass
class Pretrain:
    kind: Literal["autoencoder", "same_digit"] = allows("autoencoder or same_digit")
    epochs: int = allows("an integer >= 1", ge=1)


@dataclass
class AutoencoderPretrain(Pretrain):
    greedy: bool = allows(BOOL)
    noise: float = allows(NON_NEGATIVE, ge=0)


@dataclass
class SameDigitPretrain(Pretrain):
    head_units: int = allows("an integer >= 1", ge=1)


# Each section's classes (an option's, and those they inherit from), in the order of the checks.
SECTIONS = {"data": (Data,), "model": (Model,), "init": (Init,), "activation": (Activation,),
            "norm": (Norm, LayerNorm, BatchNorm), "optimizer": (Optimizer,),
            "schedule": (ConstantSchedule, PowerSchedule, ExponentialSchedule, PiecewiseSchedule, CosineSchedule,
                         PerformanceSchedule, OneCycleSchedule),
            "regularizer": (Regularizer,), "trainer": (Trainer,), "pretrain": (AutoencoderPretrain, SameDigitPretrain),
            "diagnostics": (Diagnostics, DiagnosticsOn), "transfer": (Transfer, TransferReuse)}
OPEN = ("init", "activation", "optimizer", "regularizer")  # no schema node (see the module's doc)


@functools.cache
def declarations() -> dict[str, tuple]:
    """key: (type, what it allows) of every key of every section (a key in several of a section's classes is one
    field, inherited)."""
    return {path: found for name, classes in SECTIONS.items() for cls in classes
            for path, found in declared(cls, name).items()}


def stored_name(cls: type) -> str:
    """The name a YAML option's defaults list gives for `cls`'s node: schema_batch_norm for BatchNorm."""
    return "schema_" + re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()


def register() -> None:
    """Every schema node into Hydra's ConfigStore, under the name its options' defaults lists give."""
    for name, classes in SECTIONS.items():
        for cls in classes if name not in OPEN else ():
            ConfigStore.instance().store(name=stored_name(cls), node=node(cls))


# At import: a config composed elsewhere and pickled (a launcher's workers) holds these nodes' classes.
register()
