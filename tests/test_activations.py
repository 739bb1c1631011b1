"""The table of activations (dnnlab.activations): a row for every config option, torch classes that exist, kernel ids
the native step accepts and the C++ source knows (with the arguments it reads), and the modules that read it."""
from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf
from torch import nn

from dnnlab import CONF_DIR, activations, diagnostics, init, stacked
from dnnlab.fast import native
from dnnlab.activations import ROWS

OPTIONS = sorted(p.stem for p in (CONF_DIR / "activation").glob("*.yaml"))
# Settings that select another kernel than the class's defaults do (torch's tanh approximation of GELU)
VARIANTS = {"torch.nn.GELU": [{"approximate": "tanh"}]}


def config(option: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "activation" / f"{option}.yaml"))


def modules(row: activations.Activation) -> list[nn.Module]:
    """The row's module as its config builds it (or with torch's defaults), and its kernel-selecting variants."""
    settings = {k: v for k, v in config(row.option).items() if not k.startswith("_")} if row.option else {}
    return [row.cls(**settings)] + [row.cls(**variant) for variant in VARIANTS.get(row.target, [])]


def cpp_kernels() -> dict[str, int]:
    """{kernel id: how many arguments the C++ step reads for it}, from csrc/mlp_step.cpp: parse() maps each id to
    an Act, and the forward and backward cases of that Act index `args`."""
    source = native.SOURCE.read_text()
    ids = dict(re.findall(r'\{"(\w+)",\s*Act::(\w+)\}', source))
    assert ids, "no {\"id\", Act::...} pairs found in parse()"
    counts = {}
    for kernel, act in ids.items():
        cases = re.findall(rf"case Act::{act}:([^\n]*)", source)
        assert cases, f"no case for Act::{act}"
        counts[kernel] = max((int(i) + 1 for case in cases for i in re.findall(r"args\[(\d+)\]", case)), default=0)
    return counts


def test_every_config_option_has_its_row():
    assert OPTIONS
    by_option = {row.option: row for row in ROWS if row.option}
    assert sorted(by_option) == OPTIONS  # and every row that names an option has its config
    for option in OPTIONS:
        assert config(option)["_target_"] == by_option[option].target, option


def test_rows_are_distinct_torch_module_classes():
    assert len({row.target for row in ROWS}) == len(ROWS)
    for row in ROWS:
        assert issubclass(row.cls, nn.Module), row.target
        assert activations.BY_TARGET[row.target] is row
        assert row.init in (activations.HE, activations.GLOROT, activations.LECUN)
        assert row.saturation is None or row.saturation[0] < row.saturation[1]


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.target)
def test_native_step_accepts_exactly_the_rows_kernels(row):
    specs = [native.activation_spec(m) for m in modules(row)]
    if not row.kernels:
        assert specs == [None] * len(specs)
        return
    assert all(spec is not None for spec in specs)
    assert sorted({name for name, _ in specs}) == sorted(row.kernels)  # every id reached by some module
    counts = cpp_kernels()
    for name, args in specs:
        assert name in counts, f"{row.target}: csrc/mlp_step.cpp has no kernel {name!r}"
        assert len(args) == counts[name] and all(isinstance(a, float) for a in args), (name, args)


def test_every_kernel_of_the_cpp_step_has_a_row():
    assert set(cpp_kernels()) == {kernel for row in ROWS for kernel in row.kernels}


def test_a_subclass_gets_no_kernel():
    """Its forward may compute something else than the class's kernel."""
    class Shifted(nn.ReLU):
        def forward(self, x):
            return super().forward(x) + 1

    assert native.activation_spec(Shifted()) is None and native.activation_spec(nn.ReLU()) == ("relu", [])


def test_the_modules_that_key_on_the_activation_read_the_table():
    """init=auto, the diagnostics' saturation and the stack's refusals, as they were before the table."""
    he = (2.0, "fan_in")
    assert {k: v for k, v in init.MATCHING.items() if v != he} == {
        "torch.nn.SELU": (1.0, "fan_in"), "torch.nn.Sigmoid": (1.0, "fan_avg"), "torch.nn.Tanh": (1.0, "fan_avg"),
        "torch.nn.Softplus": (1.0, "fan_avg")}
    assert diagnostics.SATURATING == {nn.Sigmoid: (0.0, 1.0), nn.Tanh: (-1.0, 1.0), nn.Hardsigmoid: (0.0, 1.0),
                                      nn.Hardtanh: (-1.0, 1.0), nn.Softsign: (-1.0, 1.0)}
    assert activations.unstackable() == {"torch.nn.PReLU": "PReLU has learned per-unit slopes",
                                         "torch.nn.RReLU": "RReLU draws random slopes"}
    assert stacked.UNSTACKABLE_ACTIVATIONS == activations.unstackable()
    assert native.SELU is activations.SELU
