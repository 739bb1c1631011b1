"""Weight initialisation: every conf/init option gives the variance (and shape) of its formula; biases; the MLP."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dnnlab import CONF_DIR
from dnnlab.init import apply_init, matching
from dnnlab.model import build_mlp

FAN_IN, FAN_OUT = 600, 400  # unequal, so fan_in, fan_out and fan_avg give three different variances
FAN_AVG = (FAN_IN + FAN_OUT) / 2
N = FAN_IN * FAN_OUT
INITS = sorted(p.stem for p in (CONF_DIR / "init").glob("*.yaml"))
TRUNC_STD = 0.87962566103423978  # std of a standard normal cut at +-2

# option -> (distribution, variance): the book's formulas
EXPECTED = {
    "glorot_normal": ("normal", 2 / (FAN_IN + FAN_OUT)),
    "glorot_uniform": ("uniform", 2 / (FAN_IN + FAN_OUT)),
    "he_normal": ("normal", 2 / FAN_IN),
    "he_uniform": ("uniform", 2 / FAN_IN),
    "he_avg_uniform": ("uniform", 2 / FAN_AVG),
    "lecun_normal": ("normal", 1 / FAN_IN),
    "lecun_uniform": ("uniform", 1 / FAN_IN),
    "normal": ("normal", 1.0),
    "constant": ("constant", 0.0),
    "orthogonal": ("orthogonal", None),
    "auto": ("normal", 2 / FAN_IN),  # with the default activation, ELU: He
}


def init_layer(cfg, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(FAN_IN, FAN_OUT)
    apply_init([layer], cfg.init)
    return layer


def assert_moments(w: torch.Tensor, var: float) -> None:
    """Mean within 5 standard errors of 0; variance within 2 % (the standard error is ~0.3 % for 240,000 draws)."""
    w = w.double().flatten()
    assert abs(w.mean().item()) < 5 * math.sqrt(var / w.numel())
    assert w.var().item() == pytest.approx(var, rel=0.02)


def test_every_init_option_has_an_expectation():
    assert set(INITS) == set(EXPECTED), "a new conf/init option needs its formula in EXPECTED"


@pytest.mark.parametrize("name", INITS)
def test_init_matches_its_formula(make_cfg, name):
    cfg = make_cfg(f"init={name}")
    w = init_layer(cfg).weight.detach()
    kind, var = EXPECTED[name]
    if kind == "constant":
        assert torch.all(w == cfg.init.val)
    elif kind == "orthogonal":  # 400 rows in a 600-dim space: orthonormal rows, W W^T = I
        torch.testing.assert_close(w @ w.T, torch.eye(FAN_OUT), atol=1e-4, rtol=0)
    else:
        assert_moments(w, var)
        bound = math.sqrt(3 * var)  # U(-r, r) has variance r^2 / 3
        if kind == "uniform":
            assert w.abs().max().item() <= bound
            assert w.abs().max().item() > 0.999 * bound  # draws reach the bound, not a narrower range
        else:  # a normal has many draws beyond sqrt(3) std, and some beyond 4 std
            assert w.abs().max().item() > 4 * math.sqrt(var)


@pytest.mark.parametrize("name", INITS)
@pytest.mark.parametrize("bias", [None, 0.1])
def test_biases_get_the_configured_value(make_cfg, name, bias):
    cfg = make_cfg(f"init={name}", *([f"init.bias={bias}"] if bias is not None else []))
    expected = 0.0 if bias is None else bias
    assert cfg.init.bias == expected
    b = init_layer(cfg).bias.detach()
    assert torch.all(b == torch.tensor(expected, dtype=b.dtype))


def test_truncated_normal_keeps_the_variance_and_cuts_at_two_std(make_cfg):
    cfg = make_cfg("init=he_normal", "init.distribution=truncated_normal")
    w = init_layer(cfg).weight.detach()
    var = 2 / FAN_IN
    assert_moments(w, var)  # the 1/0.8796 stretch compensates the cut
    cut = 2 * math.sqrt(var) / TRUNC_STD
    assert w.abs().max().item() <= cut * (1 + 1e-6)
    assert w.abs().max().item() > 0.99 * cut
    assert w.abs().max().item() > 2 * math.sqrt(var)  # a plain N(0, var) cut at 2 std would stop here


@pytest.mark.parametrize("distribution", ["normal", "uniform", "truncated_normal"])
def test_fan_out_mode(make_cfg, distribution):
    cfg = make_cfg("init=lecun_normal", "init.mode=fan_out", f"init.distribution={distribution}")
    assert_moments(init_layer(cfg).weight.detach(), 1 / FAN_OUT)


def test_two_layers_get_independent_draws(make_cfg):
    torch.manual_seed(0)
    a, b = nn.Linear(FAN_IN, FAN_OUT), nn.Linear(FAN_IN, FAN_OUT)
    apply_init([a, b], make_cfg("init=he_normal").init)
    assert not torch.equal(a.weight, b.weight)
    assert_moments(b.weight.detach(), 2 / FAN_IN)


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def test_mlp_inits_hidden_layers_only_and_the_output_is_glorot_uniform(make_cfg):
    torch.manual_seed(0)
    cfg = make_cfg("init=constant", "init.bias=0.1", "model.n_hidden=2", "model.n_neurons=500")
    *hidden, out = linears(build_mlp(cfg, 10))
    assert [(m.in_features, m.out_features) for m in hidden] == [(784, 500), (500, 500)]
    for m in hidden:
        assert torch.all(m.weight == 0.05) and torch.all(m.bias == 0.1)
    w = out.weight.detach()  # 5000 draws: looser variance tolerance (standard error ~1.3 %)
    bound = math.sqrt(6 / (500 + 10))
    assert w.abs().max().item() <= bound and w.abs().max().item() > 0.99 * bound
    assert w.double().var().item() == pytest.approx(2 / (500 + 10), rel=0.06)
    assert torch.all(out.bias == 0)  # Keras' default zeros, not init.bias


def test_mlp_hidden_layers_follow_the_configured_formula(make_cfg):
    torch.manual_seed(0)
    cfg = make_cfg("init=lecun_normal", "model.n_hidden=2", "model.n_neurons=300")
    first, second, out = linears(build_mlp(cfg, 10))
    assert_moments(first.weight.detach(), 1 / 784)  # fan_in of each layer, not of the layer shape above
    assert first.weight.abs().max().item() > 4 * math.sqrt(1 / 784)  # normal, not uniform
    assert second.weight.double().var().item() == pytest.approx(1 / 300, rel=0.03)
    assert out.weight.abs().max().item() <= math.sqrt(6 / 310)


# activation option -> the variance init=auto draws: the book's pairing (LeCun, Glorot, He; softplus: Glorot)
AUTO = {"selu": 1 / FAN_IN, "sigmoid": 1 / FAN_AVG, "tanh": 1 / FAN_AVG, "softplus": 1 / FAN_AVG,
        **{a: 2 / FAN_IN for a in ("elu", "relu", "leaky_relu", "prelu", "rrelu", "gelu", "swish", "mish")}}


def test_every_activation_option_has_an_auto_expectation():
    assert sorted(AUTO) == sorted(p.stem for p in (CONF_DIR / "activation").glob("*.yaml"))


@pytest.mark.parametrize("activation,var", sorted(AUTO.items()))
def test_auto_init_follows_the_books_table_for_each_activation(make_cfg, activation, var):
    assert_moments(init_layer(make_cfg("init=auto", f"activation={activation}")).weight.detach(), var)


def test_auto_init_is_he_for_an_activation_without_a_row():
    torch.manual_seed(0)
    assert_moments(matching(torch.empty(FAN_OUT, FAN_IN), "torch.nn.ReLU6"), 2 / FAN_IN)
