"""Check a composed config before any data is read or any training starts.

Every rule names a key, a test and what is allowed; a key that the chosen options do not have is skipped.
The first failure becomes one line: `key=value is not allowed: what is allowed`.
"""
from __future__ import annotations

import math
import os
import re

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dnnlab import components
from dnnlab.errors import DnnlabError, bad_value
from dnnlab.init import DISTRIBUTIONS, FAN_MODES

_ABSENT = object()


def number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def num(lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False):
    def ok(v):
        return number(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    return ok


def int_min(lo):
    return lambda v: integer(v) and v >= lo


def optional(test):
    return lambda v: v is None or test(v)


def one_of(*choices):
    return lambda v: v in choices


def boolean(v) -> bool:
    return isinstance(v, bool)


def is_list(test, min_len=0):
    return lambda v: OmegaConf.is_list(v) and len(v) >= min_len and all(test(x) for x in v)


def device_ok(v) -> bool:
    return isinstance(v, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None


MAX_EPOCHS = 100_000  # more is a typo: at a second an epoch, over a day of training
POSITIVE = (num(0, lo_open=True), "a number > 0")
NON_NEGATIVE = (num(0), "a number >= 0")
UNIT = (num(0, 1, hi_open=True), "a number in [0, 1)")
RATE = (num(0, 1, hi_open=True), "a rate in [0, 1)")
OPT_POSITIVE = (optional(num(0, lo_open=True)), "null or a number > 0")
BOOL = (boolean, "true or false")

RULES = {
    "data.name": (one_of("mnist", "fashion_mnist"), "mnist or fashion_mnist"),
    "data.root": (optional(lambda v: isinstance(v, str) and os.path.isdir(os.path.expanduser(v))),
                  "null or an existing folder"),
    "data.classes": (optional(lambda v: is_list(num(0, 9), 2)(v) and all(integer(c) for c in v)
                              and len(set(v)) == len(v)),
                     "null or a list of at least 2 distinct digits 0-9, e.g. [0,1,2,3,4]"),
    "data.n_per_class": (optional(int_min(1)), "null or an integer >= 1"),
    "data.n_train": (optional(int_min(1)), "null or an integer >= 1"),
    "data.draw": (one_of("random", "first"), "random or first (how n_per_class and val_per_class pick)"),
    "data.val_per_class": (optional(int_min(1)), "null or an integer >= 1"),
    "data.val_size": (lambda v: integer(v) and 1 <= v < 60000, "an integer from 1 to 59999"),
    "data.val_from": (one_of("first", "last"), "first or last (which training images validate)"),
    "data.folds": (optional(int_min(2)), "null or an integer >= 2 (k-fold cross-validation)"),
    "data.fold": (int_min(0), "an integer from 0 to data.folds - 1"),
    "data.standardize": (one_of("none", "global", "per_pixel"), "none, global or per_pixel"),
    "data.seed": (integer, "an integer"),
    "model.n_hidden": (lambda v: integer(v) and 0 <= v <= 10_000, "an integer from 0 to 10,000"),
    "model.n_neurons": (lambda v: int_min(1)(v) or is_list(int_min(1), 1)(v),
                        "an integer >= 1 or a list of them, e.g. [300,100]"),
    "init.scale": POSITIVE,
    "init.mode": (one_of(*FAN_MODES), " or ".join(FAN_MODES)),
    "init.distribution": (one_of(*DISTRIBUTIONS), " or ".join(DISTRIBUTIONS)),
    "init.std": POSITIVE,
    "init.mean": (number, "a number"),
    "init.gain": POSITIVE,
    "init.val": (number, "a number"),
    "init.bias": (number, "a number"),
    "activation.negative_slope": NON_NEGATIVE,
    "activation.alpha": POSITIVE,
    "activation.lower": NON_NEGATIVE,
    "activation.upper": NON_NEGATIVE,
    "activation.init": (number, "a number"),
    "activation.beta": POSITIVE,
    "activation.approximate": (one_of("none", "tanh"), "none or tanh"),
    "norm.position": (one_of("before", "after"), "before or after (the activation)"),
    "norm.momentum": (num(0, 1, lo_open=True), "a number in (0, 1]: the weight of each new batch"),
    "norm.eps": POSITIVE,
    "norm.input": BOOL,
    "optimizer.lr": POSITIVE,
    "optimizer.momentum": UNIT,
    "optimizer.nesterov": BOOL,
    "optimizer.betas": (lambda v: is_list(num(0, 1, hi_open=True), 2)(v) and len(v) == 2,
                        "two numbers in [0, 1), e.g. [0.9,0.999]"),
    "optimizer.alpha": UNIT,
    "optimizer.eps": POSITIVE,
    "optimizer.weight_decay": NON_NEGATIVE,
    "optimizer.initial_accumulator_value": NON_NEGATIVE,
    "optimizer.learning_rate_power": (num(hi=0), "a number <= 0 (Keras: -0.5)"),
    "optimizer.l1": NON_NEGATIVE,
    "optimizer.l2": NON_NEGATIVE,
    "optimizer.l2_shrinkage": NON_NEGATIVE,
    "optimizer.beta": NON_NEGATIVE,
    "optimizer.clip_value": OPT_POSITIVE,
    "optimizer.clip_norm": OPT_POSITIVE,
    "schedule.warmup_steps": (int_min(0), "an integer >= 0"),
    "schedule.s": POSITIVE,
    "schedule.c": NON_NEGATIVE,
    "schedule.unit": (one_of("step", "epoch"), "step or epoch (what t counts in lr0 * 0.1^(t/s))"),
    "schedule.boundaries": (lambda v: is_list(int_min(1), 1)(v) and list(v) == sorted(set(v)),
                            "a list of increasing epoch numbers >= 1, e.g. [5,15]"),
    "schedule.values": (is_list(num(0, lo_open=True), 2), "a list of learning rates > 0, one more than boundaries"),
    "schedule.factor": (num(0, 1, lo_open=True, hi_open=True), "a number in (0, 1)"),
    "schedule.patience": (int_min(0), "an integer >= 0"),
    "schedule.min_lr": NON_NEGATIVE,
    "schedule.max_lr": POSITIVE,
    "schedule.div_factor": (num(1), "a number >= 1"),
    "schedule.final_div_factor": (num(1), "a number >= 1"),
    "schedule.pct_rise": (num(0, 0.5, lo_open=True, hi_open=True), "a number in (0, 0.5)"),
    "schedule.min_delta": NON_NEGATIVE,
    "schedule.cycle_momentum": BOOL,
    "schedule.base_momentum": UNIT,
    "schedule.max_momentum": UNIT,
    "regularizer.l1": NON_NEGATIVE,
    "regularizer.l2": NON_NEGATIVE,
    "regularizer.max_norm": POSITIVE,
    "trainer.epochs": (lambda v: integer(v) and 1 <= v <= MAX_EPOCHS, f"an integer from 1 to {MAX_EPOCHS:,}"),
    "trainer.batch_size": (int_min(1), "an integer >= 1"),
    "trainer.device": (device_ok, "auto, cpu, cuda, cuda:N or mps"),
    "trainer.threads": (lambda v: v == "auto" or int_min(1)(v), "auto or an integer >= 1"),
    "trainer.seed": (integer, "an integer"),
    "trainer.deterministic": BOOL,
    "trainer.resume": BOOL,
    "trainer.precision": (one_of("fp32", "bf16"), "fp32 or bf16"),
    "trainer.compile": BOOL,
    "trainer.native": (lambda v: v == "auto" or isinstance(v, bool), "auto, true or false"),
    "trainer.early_stopping.monitor": (one_of(None, "val_loss", "val_acc"), "val_loss, val_acc or null (off)"),
    "trainer.early_stopping.patience": (int_min(0), "an integer >= 0"),
    "trainer.early_stopping.restore_best_weights": BOOL,
    "trainer.checkpoint_every": (int_min(0), "an integer >= 0 (0: only last and best)"),
    "trainer.keep_checkpoints": (optional(int_min(1)), "null (keep all) or an integer >= 1"),
    "trainer.limit_batches": (optional(int_min(1)), "null or an integer >= 1"),
    "trainer.overfit_batches": (optional(int_min(1)), "null or an integer >= 1"),
    "trainer.progress": BOOL,
    "pretrain.kind": (one_of("autoencoder", "same_digit"), "autoencoder or same_digit"),
    "pretrain.greedy": BOOL,
    "pretrain.epochs": (int_min(1), "an integer >= 1"),
    "pretrain.head_units": (int_min(1), "an integer >= 1"),
    "pretrain.noise": NON_NEGATIVE,
    "diagnostics.enabled": BOOL,
    "diagnostics.every": (int_min(1), "an integer >= 1 (record every N training steps)"),
    "diagnostics.saturation_margin": (num(0, 0.5, lo_open=True, hi_open=True), "a number in (0, 0.5)"),
    "diagnostics.histograms": BOOL,
    "transfer.source": (optional(lambda v: isinstance(v, str) and v != ""), "null or a run directory or checkpoint"),
    "transfer.reuse_layers": (lambda v: v == "all" or int_min(1)(v), "all or an integer >= 1"),
    "transfer.freeze": BOOL,
    "transfer.cache": BOOL,
    "transfer.unfreeze_top": (lambda v: v == "all" or int_min(0)(v), "all or an integer >= 0"),
    "transfer.unfreeze_lr_factor": (num(0, lo_open=True), "a number > 0 (usually below 1)"),
    "transfer.frozen_epochs": (optional(int_min(1)), "null or an integer >= 1"),
}
for _kind in ("dropout", "alpha_dropout"):
    RULES[f"regularizer.{_kind}.rate"] = RATE
    RULES[f"regularizer.{_kind}.top_k"] = (optional(int_min(1)), "null (all hidden layers) or an integer >= 1")
    RULES[f"regularizer.{_kind}.input"] = BOOL


def walk(node, path: str = ""):
    """(path, key, value) of every entry of plain dicts and lists, at any depth: `a.b[0].c`."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        child = f"{path}[{key}]" if isinstance(node, list) else f"{path}.{key}" if path else str(key)
        yield child, key, value
        yield from walk(value, child)


def targets(data, path: str = ""):
    """(path, target) of every _target_ in plain data, in dicts and lists (Hydra instantiates both)."""
    return ((child, value) for child, key, value in walk(data, path) if key == "_target_")


def check_targets(cfg: DictConfig) -> None:
    """Refuse a _target_ anywhere in the config that is not a known component (see dnnlab.components)."""
    for key, target in targets(OmegaConf.to_container(cfg, resolve=False)):
        if not components.allowed(target):
            raise bad_value(key, target, components.ALLOWED)


def check_device(value: str, key: str = "trainer.device") -> None:
    if not device_ok(value):
        raise bad_value(key, value, "auto, cpu, cuda, cuda:N or mps")
    if value.startswith("cuda"):
        count = torch.cuda.device_count()
        index = int(value.split(":")[1]) if ":" in value else 0
        if index >= count:
            found = f"{count} CUDA device(s) here" if count else "no CUDA device here"
            raise bad_value(key, value, f"{found}; use auto or cpu")
    if value == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise bad_value(key, value, "no MPS device here; use auto or cpu")


def check_transfer(tr: DictConfig, n_hidden: int) -> None:
    if tr.source is None:
        return
    if "reuse_layers" not in tr:
        raise bad_value("transfer.source", tr.source, "null with transfer=none (choose transfer=reuse to reuse layers)")
    reused = n_hidden if tr.reuse_layers == "all" else tr.reuse_layers
    if reused > n_hidden:
        raise bad_value("transfer.reuse_layers", tr.reuse_layers, f"at most model.n_hidden ({n_hidden})")
    if tr.cache and not tr.freeze:
        raise bad_value("transfer.cache", True, "false unless transfer.freeze=true (only frozen outputs are fixed)")
    if tr.unfreeze_top != 0 and not tr.freeze:
        raise bad_value("transfer.unfreeze_top", tr.unfreeze_top, "0 unless transfer.freeze=true")
    if tr.unfreeze_top != "all" and tr.unfreeze_top > reused:
        raise bad_value("transfer.unfreeze_top", tr.unfreeze_top, f"at most the reused layers ({reused}) or all")


def check(cfg: DictConfig) -> None:
    """Raise DnnlabError for the first bad value in the config."""
    if OmegaConf.is_missing(cfg.transfer, "source"):
        raise DnnlabError("transfer.source is required here: a run directory or checkpoint to reuse, e.g. "
                          "transfer.source=outputs/2026-01-01/12-00-00")
    check_values(cfg)
    check_targets(cfg)
    check_device(cfg.trainer.device)
    check_combinations(cfg)


def check_values(cfg: DictConfig, skip: tuple[str, ...] = ()) -> None:
    for key, (ok, allowed) in RULES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=False)
        if key not in skip and value is not _ABSENT and not ok(value):
            raise bad_value(key, OmegaConf.to_container(value) if OmegaConf.is_config(value) else value, allowed)


# What a saved config needs, and the keys that describe the machine it was trained on rather than the network.
SAVED_SECTIONS = ("data", "model", "init", "activation", "norm", "optimizer", "schedule", "regularizer", "transfer",
                  "trainer")
MACHINE_KEYS = ("data.root", "trainer.device", "transfer.source")


def check_saved(cfg: DictConfig, source: str) -> None:
    """A config saved in a file (see dnnlab.stored), checked with the command line's rules; one line naming it."""
    missing = [key for key in SAVED_SECTIONS if not OmegaConf.is_dict(cfg.get(key))]
    if missing:
        raise DnnlabError(f"{source}: its saved config has no '{missing[0]}' section; not a dnnlab training config")
    try:
        check_values(cfg, skip=MACHINE_KEYS)  # where the files were on the machine it was trained on: not here
        for key in MACHINE_KEYS:
            value = OmegaConf.select(cfg, key, default=None)
            if value is not None and not isinstance(value, str):
                raise bad_value(key, value, "null or text (a path or a device name)")
        check_targets(cfg)
        check_combinations(cfg)
    except DnnlabError as e:
        raise DnnlabError(f"{source}: in its saved config, {e}") from None
    except (OmegaConfBaseException, AttributeError, TypeError, KeyError) as e:
        raise DnnlabError(f"{source}: its saved config is not a dnnlab config ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:80]})") from None


def check_combinations(cfg: DictConfig) -> None:
    """The rules between keys."""
    n_hidden = len(cfg.model.n_neurons) if OmegaConf.is_list(cfg.model.n_neurons) else cfg.model.n_hidden
    if OmegaConf.is_list(cfg.model.n_neurons) and len(cfg.model.n_neurons) != cfg.model.n_hidden:
        raise bad_value("model.n_hidden", cfg.model.n_hidden,
                        f"the length of model.n_neurons ({len(cfg.model.n_neurons)}) when n_neurons is a list")
    if cfg.data.get("folds") and cfg.data.fold >= cfg.data.folds:
        raise bad_value("data.fold", cfg.data.fold, f"an integer from 0 to {cfg.data.folds - 1} (data.folds - 1)")
    reg = cfg.regularizer
    if reg.get("dropout") and reg.get("alpha_dropout"):
        raise DnnlabError("regularizer: choose dropout or alpha_dropout, not both")
    for kind in ("dropout", "alpha_dropout"):
        top_k = OmegaConf.select(reg, f"{kind}.top_k")
        if top_k is not None and top_k > n_hidden:
            raise bad_value(f"regularizer.{kind}.top_k", top_k, f"at most model.n_hidden ({n_hidden})")
    if cfg.norm.input and cfg.norm.kind == "layer":
        raise bad_value("norm.input", True, "false with layernorm (use norm=input_batchnorm for an input BN layer)")
    check_transfer(cfg.transfer, n_hidden)
    sched = cfg.schedule
    if "boundaries" in sched and len(sched["values"]) != len(sched.boundaries) + 1:
        raise bad_value("schedule.values", OmegaConf.to_container(sched["values"]),
                        f"{len(sched.boundaries) + 1} learning rates (one more than schedule.boundaries)")
    lr = cfg.optimizer.lr
    if "min_lr" in sched and sched.min_lr > lr:
        raise bad_value("schedule.min_lr", sched.min_lr, f"at most optimizer.lr ({lr}), the rate it decays from")
    if "base_momentum" in sched and sched.base_momentum > sched.max_momentum:
        raise bad_value("schedule.base_momentum", sched.base_momentum,
                        f"at most schedule.max_momentum ({sched.max_momentum}): momentum falls from max to base")
    if "lower" in cfg.activation and cfg.activation.lower > cfg.activation.upper:
        raise bad_value("activation.lower", cfg.activation.lower, f"at most activation.upper ({cfg.activation.upper})")
