"""One row per activation function: everything dnnlab keys on the activation, in one table.

Each row says, for one torch class: the config option that names it (conf/activation/<option>.yaml), the C++ step's
kernels for it (dnnlab/fast/native.py, fast/csrc/mlp_step.cpp), the initialization the book pairs with it (`init=auto`,
dnnlab/init.py), the asymptotes that make it saturate (dnnlab/diagnostics.py) and why a stacked sweep cannot train
it (dnnlab/stacked.py). Adding an activation is adding a row here (and its YAML, and a kernel in the C++ file if it
is to train natively); tests/test_activations.py checks the row against the configs, torch and the C++ source.
"""
from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

SELU = (1.6732632423543772848170429916717, 1.0507009873554804934193349852946)  # torch's alpha and scale


@dataclass(frozen=True)
class Init:
    """A VarianceScaling initialization: Var(w) = scale / fan, fan chosen by mode."""
    name: str
    scale: float
    mode: str


HE, GLOROT, LECUN = Init("He", 2.0, "fan_in"), Init("Glorot", 1.0, "fan_avg"), Init("LeCun", 1.0, "fan_in")

KernelCall = Callable[[nn.Module], tuple[str, list[float]]]


@dataclass(frozen=True)
class Activation:
    """What dnnlab does with one activation class. `kernels`: the ids csrc/mlp_step.cpp's parse() knows it by
    (empty: autograd only); `kernel_call`: which of them a module runs and the arguments the C++ step reads for it
    (without one, the only id and no arguments)."""
    target: str  # the class path, as configs write it (_target_) and init=auto receives it
    option: str | None = None  # conf/activation/<option>.yaml; None: a class the code knows but no config names
    kernels: tuple[str, ...] = ()
    kernel_call: KernelCall | None = None
    init: Init = HE  # what init=auto draws for it
    saturation: tuple[float, float] | None = None  # (lower, upper) asymptotes of its output, where it has two
    unstackable: str | None = None  # why a stacked sweep cannot train it (None: it can)

    @property
    def cls(self) -> type:
        module, _, name = self.target.rpartition(".")
        return getattr(importlib.import_module(module), name)

    def native_spec(self, m: nn.Module) -> tuple[str, list[float]] | None:
        """(kernel id, arguments) of the C++ step for module `m` of this class, or None where it has no kernel."""
        if not self.kernels:
            return None
        return self.kernel_call(m) if self.kernel_call else (self.kernels[0], [])


def _gelu(m: nn.GELU) -> tuple[str, list[float]]:
    return ("gelu_tanh" if m.approximate == "tanh" else "gelu"), []  # torch's two GELUs are two kernels


ROWS = (
    # ELU and SELU share one kernel: SELU is ELU with its two constants (alpha, scale, input scale).
    Activation("torch.nn.ELU", "elu", ("elu",), lambda m: ("elu", [float(m.alpha), 1.0, 1.0])),
    Activation("torch.nn.SELU", "selu", ("elu",), lambda m: ("elu", [SELU[0], SELU[1], 1.0]), init=LECUN),
    Activation("torch.nn.ReLU", "relu", ("relu",)),
    Activation("torch.nn.LeakyReLU", "leaky_relu", ("leaky_relu",),
               lambda m: ("leaky_relu", [float(m.negative_slope)])),
    Activation("torch.nn.PReLU", "prelu", unstackable="PReLU has learned per-unit slopes"),
    Activation("torch.nn.RReLU", "rrelu", unstackable="RReLU draws random slopes"),
    Activation("torch.nn.GELU", "gelu", ("gelu", "gelu_tanh"), _gelu),
    Activation("torch.nn.SiLU", "swish", ("silu",)),
    Activation("torch.nn.Mish", "mish", ("mish",)),
    Activation("torch.nn.Softplus", "softplus", ("softplus",),
               lambda m: ("softplus", [float(m.beta), float(m.threshold)]), init=GLOROT),
    Activation("torch.nn.Sigmoid", "sigmoid", ("sigmoid",), init=GLOROT, saturation=(0.0, 1.0)),
    Activation("torch.nn.Tanh", "tanh", ("tanh",), init=GLOROT, saturation=(-1.0, 1.0)),
    # No config names these; the diagnostics measure their saturation, and init=auto gives them its default, He.
    Activation("torch.nn.Hardsigmoid", saturation=(0.0, 1.0)),
    Activation("torch.nn.Hardtanh", saturation=(-1.0, 1.0)),
    Activation("torch.nn.Softsign", saturation=(-1.0, 1.0)),
)
BY_TARGET = {row.target: row for row in ROWS}


@functools.cache
def _by_class() -> dict[type, Activation]:
    return {row.cls: row for row in ROWS}


def of(m: nn.Module) -> Activation | None:
    """The row of a module's exact class (a subclass may compute something else: it has none)."""
    return _by_class().get(type(m))


def matching_inits() -> dict[str, tuple[float, str]]:
    """{class path: (scale, fan mode)} of init=auto."""
    return {row.target: (row.init.scale, row.init.mode) for row in ROWS}


def saturating() -> dict[type, tuple[float, float]]:
    """{class: (lower, upper)} of the activations with two horizontal asymptotes."""
    return {row.cls: row.saturation for row in ROWS if row.saturation}


def unstackable() -> dict[str, str]:
    """{class path: why a stacked sweep cannot train it}."""
    return {row.target: row.unstackable for row in ROWS if row.unstackable}
