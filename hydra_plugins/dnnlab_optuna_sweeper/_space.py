"""Search spaces: Hydra override strings -> Optuna distributions, and trial values -> override strings.

    interval(a, b)                FloatDistribution(a, b)
    tag(log, interval(a, b))      FloatDistribution(a, b, log=True)
    int(interval(a, b))           IntDistribution(a, b)           (tag(log, ...): log=True)
    range(a, b, s)                IntDistribution(a, last, s)     the values Hydra's range gives: a, a+s, ... < b
    float(range(...)), range(0.1, 0.5, 0.1)   FloatDistribution(a, last, step=s)
    choice(x, y, z) or x,y,z      CategoricalDistribution; lists and dicts become their override text
Every other override is fixed: passed unchanged to every trial.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.errors import CompactHydraException, HydraException
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution


class SearchSpaceError(CompactHydraException):
    """A search space Optuna cannot take (Hydra prints the message without a traceback)."""


def value_text(value: Any, rounded: bool = False) -> str:
    """A value as override text; rounded: floats to 12 significant digits (a range's 0.30000000000000004 -> 0.3)."""
    if rounded and isinstance(value, float) and math.isfinite(value):
        value = float(f"{value:.12g}")
    return Transformer.str(value)


@dataclass
class Param:
    """One searched key: Optuna's parameter `name`, the override's `key` (with +, ++ or @package) and its space."""
    name: str
    key: str
    distribution: BaseDistribution
    grid: list | None = None                            # the values of a choice or range, for the grid sampler
    texts: list[str] = field(default_factory=list)      # override text of each categorical choice, by index

    def override(self, value: Any) -> str:
        if isinstance(self.distribution, CategoricalDistribution):
            return f"{self.key}={self.texts[self.distribution.to_internal_repr(value)]}"
        return f"{self.key}={value_text(value, rounded=self.distribution.step is not None)}"


def identity(override: Override) -> str:
    """Two overrides of the same key (or group@package) replace one another."""
    return override.key_or_group + (f"@{override.package}" if override.package is not None else "")


def key_text(override: Override) -> str:
    """The key as typed, without the value: +key, ++key, key@package..."""
    prefix = {"ADD": "+", "FORCE_ADD": "++", "DEL": "~"}.get(override.type.name, "")
    return prefix + identity(override)


def to_distribution(override: Override) -> tuple[BaseDistribution, list | None, list[str]]:
    """(distribution, grid values or None, texts of categorical choices) of a sweep override."""
    value = override.value()
    log = "log" in getattr(value, "tags", set())
    try:
        if isinstance(value, ChoiceSweep):
            choices, texts = [], []
            for x in override.sweep_iterator(transformer=Transformer.identity):
                choices.append(x if isinstance(x, (str, int, float, bool)) else Transformer.str(x))
                texts.append(value_text(x))
            if len(set(texts)) != len(texts):
                raise ValueError(f"repeated choices in {texts}")
            return CategoricalDistribution(choices), list(choices), texts
        if isinstance(value, RangeSweep):
            values = list(override.sweep_iterator(transformer=Transformer.identity))  # Hydra's own range
            if not values:
                raise ValueError("the range is empty")
            lo, hi, step = min(values), max(values), abs(value.step)
            if all(isinstance(v, int) for v in values):
                if log and step != 1:
                    raise ValueError("a log range needs step 1: use tag(log, int(interval(a, b)))")
                return IntDistribution(lo, hi, log=log, step=step), sorted(values), []
            if log:
                raise ValueError("a float range cannot be log: use tag(log, interval(a, b))")
            values = sorted(float(value_text(float(v), rounded=True)) for v in values)
            return FloatDistribution(values[0], values[-1], step=float(value_text(step, rounded=True))), values, []
        if isinstance(value, IntervalSweep):
            if isinstance(value.start, int) and isinstance(value.end, int):
                return IntDistribution(value.start, value.end, log=log), None, []
            return FloatDistribution(float(value.start), float(value.end), log=log), None, []
    except ValueError as e:
        raise SearchSpaceError(f"search space {override.input_line!r}: {e}") from None
    raise SearchSpaceError(f"search space {override.input_line!r}: {type(value).__name__} is not supported "
                           f"(use interval, tag(log, interval), int(interval), range or choice)")


def parse(overrides: Iterable[str]) -> tuple[dict[str, Param], list[str]]:
    """Split override strings into searched parameters and fixed overrides; a later override of a key replaces an
    earlier one, so the command line (after the YAML params) may fix a searched key or search a fixed one."""
    parser = OverridesParser.create()
    entries: dict[str, Override] = {}
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except HydraException as e:
            raise SearchSpaceError(f"cannot parse {text!r}: {e}") from None
        entries.pop(identity(override), None)  # a replacing override goes to the end, in command-line order
        entries[identity(override)] = override
    params, fixed = {}, []
    for name, override in entries.items():
        if override.is_sweep_override():
            if override.is_delete():
                raise SearchSpaceError(f"cannot search a deletion: {override.input_line!r}")
            distribution, grid, texts = to_distribution(override)
            params[name] = Param(name, key_text(override), distribution, grid, texts)
        else:
            fixed.append(override.input_line)
    return params, fixed


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """hydra.sweeper.params as {key: value}: nested YAML mappings and dotted keys both name config paths."""
    out: dict[str, Any] = {}
    if node is None:
        return out
    items = node.items_ex(resolve=True) if isinstance(node, DictConfig) else node.items()
    for k, v in items:
        path = f"{prefix}{k}"
        if isinstance(v, (DictConfig, Mapping)) and len(v):
            out.update(flatten(v, path + "."))
        else:
            out[path] = v
    return out


def param_override(key: str, value: Any) -> str:
    """A YAML search-space entry as an override: strings are override grammar already; other values are fixed."""
    if isinstance(value, str):
        return f"{key}={value}"
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return f"{key}={value_text(value)}"


def command_line_params(hydra_overrides: Iterable[str]) -> list[tuple[str, Any]]:
    """The hydra.sweeper.params.KEY=VALUE overrides typed on the command line, each with its full key.

    OmegaConf nests a dotted key: hydra.sweeper.params.optimizer.lr sets params.optimizer.lr, and a later
    hydra.sweeper.params.optimizer replaces that node; reading the typed overrides keeps both searches."""
    prefix = "hydra.sweeper.params."
    parser, out = OverridesParser.create(), []
    for text in hydra_overrides:
        override = parser.parse_override(text)
        if override.key_or_group.startswith(prefix) and not override.is_delete():
            out.append((override.key_or_group[len(prefix):], override.value()))
    return out


def grid_space(params: Mapping[str, Param]) -> dict[str, list]:
    """The grid sampler's search space: the values of every choice and range parameter."""
    continuous = [p.name for p in params.values() if p.grid is None]
    if continuous:
        raise SearchSpaceError(f"the grid sampler needs choice(...) or range(...) for every parameter, not an "
                               f"interval: {', '.join(continuous)}")
    return {p.name: list(p.grid) for p in params.values()}


def grid_size(space: Mapping[str, list]) -> int:
    return math.prod(len(v) for v in space.values())


def grid_points(space: Mapping[str, list]) -> set[tuple]:
    return set(itertools.product(*space.values()))
