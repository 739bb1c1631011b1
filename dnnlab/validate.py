"""Check a composed config before any data is read or any training starts.

Every key's type and allowed values are declared in dnnlab.schema, next to each other; a key that the chosen
options do not have is skipped. The first failure becomes one line: `key=value is not allowed: what is allowed`.
The rules between keys (check_combinations) are here.
"""
from __future__ import annotations

import math

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dnnlab import components, schema
from dnnlab.allowed import conforms, integer, number
from dnnlab.errors import DnnlabError, bad_value

_ABSENT = object()


def num(lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False):
    def ok(v):
        return number(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    return ok


def int_min(lo):
    return lambda v: integer(v) and v >= lo


def optional(test):
    return lambda v: v is None or test(v)


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
    if not schema.device_ok(value):
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
    for key in schema.MOVED:  # a config file of the user's own, written before the move
        if OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT:
            raise DnnlabError(schema.moved(key))
    check_values(cfg)
    check_targets(cfg)
    check_device(cfg.trainer.device)
    check_combinations(cfg)


def check_values(cfg: DictConfig, skip: tuple[str, ...] = ()) -> None:
    """Every declared key the config has is of its type and allowed (its range, its choices)."""
    for key, (hint, allowed) in schema.declarations().items():
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=False)
        if key not in skip and value is not _ABSENT and not (conforms(hint, value) and allowed(value)):
            raise bad_value(key, OmegaConf.to_container(value) if OmegaConf.is_config(value) else value, allowed.text)


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
