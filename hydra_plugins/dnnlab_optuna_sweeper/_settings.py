"""The sweeper's settings (hydra.sweeper, the fields of config.DnnlabOptunaSweeperConf): checked before anything is
written (RULES), then settled into the Plan that every batch of the sweep follows."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from dnnlab.trial import PRUNERS, is_url

from . import _space

SAMPLERS = ("tpe", "random", "grid")
DIRECTIONS = ("maximize", "minimize")
JOURNAL = "optuna.journal"


class SweepError(CompactHydraException):
    """A sweeper setting that cannot work (Hydra prints the message without a traceback)."""


def shown(storage: str) -> str:
    """The storage for logs and tables: a database URL without its password."""
    if not is_url(storage):
        return storage
    try:
        from sqlalchemy.engine import make_url

        return make_url(storage).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy knows: Optuna will say so
        return storage


def infer_direction(metric: str) -> str:
    if metric.endswith("acc") or metric.endswith("accuracy"):
        return "maximize"
    if metric.endswith("loss"):
        return "minimize"
    raise SweepError(f"cannot tell whether to maximize or minimize {metric!r}: set hydra.sweeper.direction")


def integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def at_least(low: int) -> tuple[Callable[[Any, Callable[[str], Any]], bool], str]:
    return (lambda value, setting: integer(value) and value >= low), f"an integer >= {low}"


# The settings checked before the study is opened, so that a bad one writes nothing: (key, whether a value is allowed
# given a lookup of the other settings, what is allowed), in order (a later row may rely on an earlier one). A key
# under tpe., median. or hyperband. is checked when that sampler or pruner is the one in use.
RULES: tuple[tuple[str, Callable[[Any, Callable[[str], Any]], bool], str], ...] = (
    ("sampler", lambda value, setting: value in SAMPLERS, ", ".join(SAMPLERS)),
    ("pruner", lambda value, setting: value in PRUNERS, ", ".join(PRUNERS)),
    ("n_trials", *at_least(1)),
    ("n_jobs", *at_least(1)),
    ("heartbeat_interval", *at_least(1)),
    ("grace_period", lambda value, setting: integer(value) and value > setting("heartbeat_interval"),
     "an integer > hydra.sweeper.heartbeat_interval"),
    ("tpe.n_startup_trials", *at_least(0)),
    ("median.n_startup_trials", *at_least(0)),
    ("median.n_warmup_steps", *at_least(0)),
    ("median.interval_steps", *at_least(1)),
    ("hyperband.min_resource", *at_least(1)),
    ("hyperband.max_resource", lambda value, setting: value == "auto" or (
        integer(value) and value > setting("hyperband.min_resource")), "auto or an integer > min_resource"),
    ("hyperband.reduction_factor", *at_least(2)),  # 1 would make every trial fail dividing by log(1)
)


@dataclass
class Plan:
    """What every batch of the sweep needs, settled before the study is opened."""
    params: dict[str, _space.Param]
    fixed: list[str]
    metric: str
    direction: str
    use_return: bool
    sampler: str
    grid: dict | None
    pruner: dict
    storage: str
    n_trials: int
    n_jobs: int


def setting(settings: Mapping[str, Any], key: str) -> Any:
    """A setting by its dotted key under hydra.sweeper (median.n_warmup_steps); None if absent."""
    node: Any = settings
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) or OmegaConf.is_dict(node) else None
    return node


def check_settings(settings: Mapping[str, Any]) -> None:
    """Refuse a setting that cannot work (RULES) before anything is written: one line naming key and value."""
    lookup = functools.partial(setting, settings)
    in_use = (lookup("sampler"), lookup("pruner"))
    for key, allowed, text in RULES:
        section = key.rpartition(".")[0]
        if section and section not in in_use:
            continue
        value = lookup(key)
        if not allowed(value, lookup):
            raise SweepError(f"hydra.sweeper.{key}={value!r} is not allowed: {text}")


def make_plan(settings: Mapping[str, Any], config: DictConfig, sweep_dir: Path, arguments: Sequence[str]) -> Plan:
    """The Plan from the settings, the sweep's config and the command line's sweep arguments."""
    params, fixed = search_space(settings, config, arguments)
    metric, direction, use_return = metric_of(settings, config)
    sampler = settings.get("sampler") or "tpe"
    grid = _space.grid_space(params) if sampler == "grid" else None
    return Plan(params, fixed, metric, direction, use_return, sampler, grid, pruner_spec(settings, config),
                storage_text(settings, sweep_dir), int(settings["n_trials"]), int(settings["n_jobs"]))


def search_space(settings: Mapping[str, Any], config: DictConfig,
                 arguments: Sequence[str]) -> tuple[dict[str, _space.Param], list[str]]:
    declared = _space.flatten(settings.get("params"))
    typed = config.hydra.overrides.get("hydra", [])
    declared.update(_space.command_line_params(typed))
    texts = [_space.param_override(k, v) for k, v in declared.items()]
    return _space.parse(texts + list(arguments))


def metric_of(settings: Mapping[str, Any], config: DictConfig) -> tuple[str, str, bool]:
    """(metric, direction, use_return_value): by default the task's return value, the early-stopping monitor."""
    metric = settings.get("metric")
    use_return = metric is None
    if use_return:
        metric = OmegaConf.select(config, "trainer.early_stopping.monitor", default=None) or "val_acc"
    direction = settings.get("direction") or infer_direction(metric)
    if direction not in DIRECTIONS:
        raise SweepError(f"hydra.sweeper.direction={direction!r} is not allowed: maximize or minimize")
    return metric, direction, use_return


def storage_text(settings: Mapping[str, Any], sweep_dir: Path) -> str:
    storage = settings.get("storage")
    if not storage:
        return str((sweep_dir / JOURNAL).absolute())
    if storage.startswith("sqlite:///") and storage[10:] and not storage[10:].startswith((":", "/")):
        return f"sqlite:///{Path(storage[10:]).absolute()}"  # the same file for runs in other directories
    if is_url(storage):
        return storage
    path = Path(storage).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path)


def pruner_spec(settings: Mapping[str, Any], config: DictConfig) -> dict:
    name = settings.get("pruner") or "none"  # a known one: check_settings
    spec = {"name": name}
    if name != "none":
        spec.update(OmegaConf.to_container(settings[name]) if OmegaConf.is_config(settings[name]) else settings[name])
    if name == "hyperband" and spec.get("max_resource") == "auto":
        epochs = OmegaConf.select(config, "trainer.epochs", default=None)
        if isinstance(epochs, int):  # a full trial's epochs (keras-tuner's max_epochs)
            spec["max_resource"] = epochs
    return spec
