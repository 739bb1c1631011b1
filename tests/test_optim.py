"""Optimizers with the book's defaults; L1/L2, max-norm and clipping as exact rules; dropout and norm placement."""
from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dnnlab import CONF_DIR, checkpoint
from dnnlab.ftrl import Ftrl
from dnnlab.model import build_mlp
from dnnlab.fast.flat_adam import direct_step, fusable, pack, pack_parameters_, span
from dnnlab.optim import GradientRules, build_optimizer

OPTIMIZERS = sorted(p.stem for p in (CONF_DIR / "optimizer").glob("*.yaml"))
CPU = torch.device("cpu")
SMALL = ("model.n_hidden=2", "model.n_neurons=16")

# option -> (torch class, defaults that must hold): the book's (Keras') values
EXPECTED = {
    "ftrl": (Ftrl, {"lr": 1e-3, "learning_rate_power": -0.5, "initial_accumulator_value": 0.1, "l1": 0.0, "l2": 0.0,
                    "l2_shrinkage": 0.0, "beta": 0.0}),
    "sgd": (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.0, "nesterov": False}),
    "momentum": (torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9, "nesterov": False}),
    "nesterov": (torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9, "nesterov": True}),
    "adagrad": (torch.optim.Adagrad, {"lr": 1e-3, "initial_accumulator_value": 0.1, "eps": 1e-7}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 1e-3, "alpha": 0.9, "eps": 1e-7, "momentum": 0.0}),
    "adam": (torch.optim.Adam, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-7, "weight_decay": 0.0}),
    "adamax": (torch.optim.Adamax, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-7}),
    "nadam": (torch.optim.NAdam, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-7}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 1e-5}),
}


def small_model(cfg) -> nn.Sequential:
    torch.manual_seed(0)
    return build_mlp(cfg, 10)


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def leaves(model: nn.Module) -> list[nn.Module]:
    """The layers in forward order, whether build_mlp nests them in blocks or not."""
    return [m for m in model.modules() if not list(m.children())]


def kinds(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in leaves(model)]


def backward(model: nn.Module, scale: float = 1.0, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(8, 784, generator=g), torch.randint(0, 10, (8,), generator=g)
    model.zero_grad(set_to_none=True)
    (scale * F.cross_entropy(model(x), y)).backward()


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


# --- (a) optimizers ---

def test_every_optimizer_option_has_an_expectation():
    assert set(OPTIMIZERS) == set(EXPECTED)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_builds_with_the_books_defaults(make_cfg, name):
    cfg = make_cfg(f"optimizer={name}", "trainer.clip_value=0.5", "trainer.clip_norm=1.0", *SMALL)
    model = small_model(cfg)
    opt = build_optimizer(cfg.optimizer, list(model.parameters()), CPU)
    cls, defaults = EXPECTED[name]
    assert type(opt) is cls
    for key, value in defaults.items():
        assert opt.defaults[key] == pytest.approx(value), key
    assert not {"clip_value", "clip_norm"} & set(opt.defaults)  # the trainer's, never torch arguments
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    backward(model)
    opt.step()  # fused / foreach kernels work on the CPU
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_lr_argument_overrides_the_configured_rate(make_cfg):
    cfg = make_cfg("optimizer=nesterov", *SMALL)
    opt = build_optimizer(cfg.optimizer, list(small_model(cfg).parameters()), CPU, lr=0.123)
    assert opt.defaults["lr"] == 0.123 and opt.defaults["nesterov"] is True


def test_fused_falls_back_to_foreach_on_other_devices(make_cfg):
    cfg = make_cfg("optimizer=adam", *SMALL)
    assert cfg.optimizer.fused is True
    opt = build_optimizer(cfg.optimizer, list(small_model(cfg).parameters()), torch.device("mps"))
    assert opt.defaults["fused"] is False and opt.defaults["foreach"] is True
    assert build_optimizer(cfg.optimizer, list(small_model(cfg).parameters()), CPU).defaults["fused"] is True


# --- (b) L1 / L2 penalties as gradient terms ---

def strengths(rules: GradientRules, *names: str) -> tuple[float, ...]:
    """The network's strengths in its JobRules (0 where the rule is off)."""
    return tuple(getattr(rules.rules, n) or 0.0 for n in names)


@pytest.mark.parametrize("reg,l1,l2", [("l2", 0.0, 0.01), ("l1", 0.01, 0.0), ("l1_l2", 0.01, 0.01)])
def test_penalties_add_exactly_their_gradient_to_weight_matrices(make_cfg, reg, l1, l2):
    cfg = make_cfg(f"regularizer={reg}", *SMALL)
    model = small_model(cfg)
    rules = GradientRules(model, cfg.regularizer, cfg.trainer)
    assert strengths(rules, "l1", "l2") == pytest.approx((l1, l2))
    backward(model)
    plain = grads(model)
    rules.before_step()
    weights = {id(m.weight) for m in linears(model)}
    assert len(weights) == 3  # two hidden layers and the output layer, as Keras' kernel_regularizer on each
    for name, p in model.named_parameters():
        if id(p) in weights:
            expected = 2 * l2 * p.detach() + l1 * torch.sign(p.detach())
            torch.testing.assert_close(p.grad - plain[name], expected, rtol=1e-5, atol=1e-6)
        else:  # biases (and any norm or PReLU parameters) are not penalised
            assert torch.equal(p.grad, plain[name]), name


@pytest.mark.parametrize("reg,l1,l2", [("l2", 0.0, 0.01), ("l1", 0.01, 0.0), ("l1_l2", 0.003, 0.02)])
def test_penalties_equal_autograd_of_the_explicit_penalty(make_cfg, reg, l1, l2):
    cfg = make_cfg(f"regularizer={reg}", *([f"regularizer.l1={l1}"] if l1 else []),
                   *([f"regularizer.l2={l2}"] if l2 else []), *SMALL)
    model = small_model(cfg)
    rules = GradientRules(model, cfg.regularizer, cfg.trainer)
    backward(model)
    rules.before_step()
    via_rules = grads(model)
    g = torch.Generator().manual_seed(1)  # the same batch as backward()
    x, y = torch.rand(8, 784, generator=g), torch.randint(0, 10, (8,), generator=g)
    model.zero_grad(set_to_none=True)
    kernels = [m.weight for m in linears(model)]
    penalty = sum(l1 * w.abs().sum() + l2 * (w ** 2).sum() for w in kernels)
    (F.cross_entropy(model(x), y) + penalty).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(via_rules[name], p.grad, rtol=1e-5, atol=1e-6)


def test_no_penalty_leaves_gradients_alone(make_cfg):
    cfg = make_cfg(*SMALL)
    model = small_model(cfg)
    backward(model)
    plain = grads(model)
    GradientRules(model, cfg.regularizer, cfg.trainer).before_step()
    assert all(torch.equal(p.grad, plain[n]) for n, p in model.named_parameters())


# --- (c) max-norm ---

def test_max_norm_caps_every_hidden_neurons_incoming_weights(make_cfg):
    cfg = make_cfg("regularizer=max_norm", "regularizer.max_norm=1.0", *SMALL)
    assert cfg.regularizer.max_norm == 1.0
    model = small_model(cfg)
    *hidden, out = linears(model)
    with torch.no_grad():
        for m in hidden:  # He init gives rows of norm ~sqrt(2) > 1; make the even rows short ones
            m.weight[::2] *= 0.5 / m.weight[::2].norm(dim=1, keepdim=True)
        out.weight.mul_(20)  # far above 1: must stay as it is
    before = [m.weight.detach().clone() for m in hidden]
    out_before = out.weight.detach().clone()
    assert all((w.norm(dim=1) > 1).sum() > 0 for w in before)
    GradientRules(model, cfg.regularizer, cfg.trainer).after_step()
    for m, w0 in zip(hidden, before):
        norms, norms0 = m.weight.norm(dim=1), w0.norm(dim=1)
        assert torch.all(norms <= 1.0 + 1e-6)
        short = norms0 <= 1.0
        assert torch.equal(m.weight[short], w0[short])  # already short: untouched
        torch.testing.assert_close(norms[~short], torch.ones(int((~short).sum())), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.weight[~short], w0[~short] / norms0[~short, None], rtol=1e-5, atol=1e-6)
    assert torch.equal(out.weight, out_before)


def test_max_norm_holds_after_real_training_steps(make_cfg, tmp_path):
    from dnnlab.train import train

    train(make_cfg("regularizer=max_norm", "regularizer.max_norm=0.5", "optimizer.lr=0.01"), tmp_path)
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")["model"]
    hidden = [v for k, v in state.items() if k.startswith("hidden") and k.endswith("0.weight")]
    assert len(hidden) == 5 and all(torch.all(w.norm(dim=1) <= 0.5 + 1e-5) for w in hidden)


def test_max_norm_radius_is_configurable_and_off_by_default(make_cfg):
    cfg = make_cfg("regularizer=max_norm", "regularizer.max_norm=0.3", *SMALL)
    model = small_model(cfg)
    GradientRules(model, cfg.regularizer, cfg.trainer).after_step()
    assert all(torch.all(m.weight.norm(dim=1) <= 0.3 + 1e-6) for m in linears(model)[:-1])
    plain_cfg = make_cfg(*SMALL)
    plain = small_model(plain_cfg)
    w0 = [m.weight.detach().clone() for m in linears(plain)]
    GradientRules(plain, plain_cfg.regularizer, plain_cfg.trainer).after_step()
    assert all(torch.equal(m.weight, w) for m, w in zip(linears(plain), w0))


# --- (d) gradient clipping ---

def test_clip_value_bounds_every_component(make_cfg):
    cfg = make_cfg("trainer.clip_value=0.001", *SMALL)
    model = small_model(cfg)
    backward(model, scale=10.0)
    plain = grads(model)
    assert max(g.abs().max() for g in plain.values()) > 0.01
    GradientRules(model, cfg.regularizer, cfg.trainer).before_step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name].clamp(-0.001, 0.001), rtol=0, atol=0)


def global_norm(gs) -> float:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs])).item()


def test_clip_norm_rescales_the_whole_gradient(make_cfg):
    cfg = make_cfg("trainer.clip_norm=0.5", *SMALL)
    model = small_model(cfg)
    backward(model, scale=100.0)
    plain = grads(model)
    total = global_norm(plain.values())
    assert total > 5
    GradientRules(model, cfg.regularizer, cfg.trainer).before_step()
    assert global_norm(p.grad for p in model.parameters()) == pytest.approx(0.5, rel=1e-4)
    for name, p in model.named_parameters():  # one factor for all: the direction is kept
        torch.testing.assert_close(p.grad, plain[name] * (0.5 / total), rtol=1e-4, atol=1e-8)


def test_clip_norm_leaves_a_small_gradient_unchanged(make_cfg):
    cfg = make_cfg("trainer.clip_norm=1000.0", *SMALL)
    model = small_model(cfg)
    backward(model)
    plain = grads(model)
    GradientRules(model, cfg.regularizer, cfg.trainer).before_step()
    assert all(torch.equal(p.grad, plain[n]) for n, p in model.named_parameters())


# --- (e) layer placement in build_mlp ---

def test_dropout_top_k_only_after_the_top_hidden_layers(make_cfg):
    cfg = make_cfg("regularizer=dropout", "regularizer.dropout.top_k=2", "model.n_hidden=4", "model.n_neurons=8")
    model = build_mlp(cfg, 10)
    assert kinds(model) == ["Flatten"] + ["Linear", "ELU"] * 2 + ["Linear", "ELU", "Dropout"] * 2 + ["Linear"]
    assert all(m.p == 0.2 for m in leaves(model) if isinstance(m, nn.Dropout))


def test_dropout_everywhere_by_default_and_on_the_input(make_cfg):
    cfg = make_cfg("regularizer=dropout", "regularizer.dropout.input=true", "regularizer.dropout.rate=0.3", *SMALL)
    model = build_mlp(cfg, 10)
    assert kinds(model) == ["Flatten", "Dropout"] + ["Linear", "ELU", "Dropout"] * 2 + ["Linear"]
    assert all(m.p == 0.3 for m in leaves(model) if isinstance(m, nn.Dropout))


def test_alpha_dropout_placement(make_cfg):
    cfg = make_cfg("activation=selu", "init=lecun_normal", "regularizer=alpha_dropout",
                   "regularizer.alpha_dropout.top_k=1", *SMALL)
    model = build_mlp(cfg, 10)
    assert kinds(model) == ["Flatten", "Linear", "SELU", "Linear", "SELU", "AlphaDropout", "Linear"]


def test_dropout_is_active_in_training_only(make_cfg):
    model = build_mlp(make_cfg("regularizer=dropout", "regularizer.dropout.rate=0.5", *SMALL), 10)
    x = torch.rand(4, 784)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_batchnorm_before_the_activation_drops_the_bias(make_cfg):
    model = build_mlp(make_cfg("norm=batchnorm", *SMALL), 10)
    assert kinds(model) == ["Flatten"] + ["Linear", "BatchNorm1d", "ELU"] * 2 + ["Linear"]
    *hidden, out = linears(model)
    assert all(m.bias is None for m in hidden) and out.bias is not None
    bns = [m for m in leaves(model) if isinstance(m, nn.BatchNorm1d)]
    assert [(b.num_features, b.momentum, b.eps) for b in bns] == [(16, 0.01, 0.001)] * 2


def test_batchnorm_after_the_activation_keeps_the_bias(make_cfg):
    model = build_mlp(make_cfg("norm=batchnorm", "norm.position=after", *SMALL), 10)
    assert kinds(model) == ["Flatten"] + ["Linear", "ELU", "BatchNorm1d"] * 2 + ["Linear"]
    assert all(m.bias is not None for m in linears(model))


def test_input_batchnorm_first(make_cfg):
    model = build_mlp(make_cfg("norm=input_batchnorm", *SMALL), 10)
    assert kinds(model) == ["Flatten", "BatchNorm1d"] + ["Linear", "ELU"] * 2 + ["Linear"]
    bn = leaves(model)[1]
    assert bn.num_features == 784 and bn.momentum == 0.01 and bn.eps == 0.001
    assert all(m.bias is not None for m in linears(model))


def test_layernorm_works_at_batch_size_one(make_cfg):
    model = build_mlp(make_cfg("norm=layernorm", *SMALL), 10)
    assert kinds(model) == ["Flatten"] + ["Linear", "LayerNorm", "ELU"] * 2 + ["Linear"]
    lns = [m for m in leaves(model) if isinstance(m, nn.LayerNorm)]
    assert [(m.normalized_shape, m.eps) for m in lns] == [((16,), 0.001)] * 2
    # LN(Wx + b) still depends on b (unlike BN, whose shift absorbs it), so the hidden Linear layers keep it
    assert all(m.bias is not None for m in leaves(model) if isinstance(m, nn.Linear))
    model.train()
    assert model(torch.rand(1, 784)).shape == (1, 10)  # BN would fail on one example


def test_prelu_has_one_slope_per_unit(make_cfg):
    model = build_mlp(make_cfg("activation=prelu", "model.n_hidden=2", "model.n_neurons=[12,7]"), 10)
    prelus = [m for m in leaves(model) if isinstance(m, nn.PReLU)]
    assert [m.num_parameters for m in prelus] == [12, 7]
    assert all(torch.all(m.weight == 0.25) for m in prelus)


def test_regularizer_list_combines_l2_and_dropout(make_cfg):
    cfg = make_cfg("regularizer=[l2,dropout]", *SMALL)
    assert cfg.regularizer.l2 == 0.01 and cfg.regularizer.dropout.rate == 0.2
    model = small_model(cfg)
    assert kinds(model).count("Dropout") == 2
    rules = GradientRules(model, cfg.regularizer, cfg.trainer)
    model.eval()  # no dropout noise, so the gradient is the same before and after
    backward(model)
    plain = grads(model)
    rules.before_step()
    for m in linears(model):
        name = next(n for n, p in model.named_parameters() if p is m.weight)
        torch.testing.assert_close(m.weight.grad - plain[name], 0.02 * m.weight.detach(), rtol=1e-5, atol=1e-6)


def test_regularizer_list_combines_max_norm_and_l1(make_cfg):
    cfg = make_cfg("regularizer=[l1,max_norm]", *SMALL)
    rules = GradientRules(small_model(cfg), cfg.regularizer, cfg.trainer)
    assert strengths(rules, "l1", "max_norm") == pytest.approx((0.01, 1.0))


# --- direct_step: the fused kernel without optimizer.step()'s bookkeeping ----------------------------------------

def fixed_threads(n: int):
    """Stands in for a ThreadTuner that always chooses n threads."""
    return SimpleNamespace(current=n, before=lambda j: None, after=lambda j, elapsed=None: None)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("target,kwargs", [("torch.optim.Adam", {}), ("torch.optim.Adam", {"weight_decay": 0.01}),
                                           ("torch.optim.AdamW", {"weight_decay": 0.01})])
def test_direct_step_updates_exactly_as_optimizer_step(target, kwargs, packed, one_thread):
    """Also with the parameters and gradients in flat tensors (one kernel call, on two threads): then up to a unit in
    the last place, since the kernel's vectorised loop takes elements that its scalar loop took at each tensor's
    end."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"_target_": target, "_partial_": True, "lr": 0.01, "eps": 1e-7, "fused": True, **kwargs})
    torch.manual_seed(0)
    a = [torch.randn(7, 5, requires_grad=True), torch.randn(5, requires_grad=True), torch.randn(3, 9, requires_grad=True)]
    b = [p.detach().clone().requires_grad_() for p in a]
    opt_a, opt_b = (build_optimizer(cfg, ps, torch.device("cpu")) for ps in (a, b))
    same = functools.partial(torch.allclose, rtol=2e-7, atol=0) if packed else torch.equal
    if packed:
        pack_parameters_(a)
        for p, g in zip(a, pack([torch.zeros_like(p) for p in a])):
            p.grad = g
    step_a = direct_step(opt_a, fixed_threads(2))  # its first call is torch's own step, which creates
    # the state
    for k in range(6):
        grads = [torch.randn_like(p) for p in a]
        for pa, pb, g in zip(a, b, grads):
            pb.grad = g.clone()
            if packed:
                pa.grad.copy_(g)
            else:
                pa.grad = g.clone()
        for opt in (opt_a, opt_b):  # what schedules and momentum cycling write between steps
            opt.param_groups[0]["lr"] = 0.01 / (k + 1)
            opt.param_groups[0]["betas"] = (0.9 - 0.01 * k, 0.999)
        step_a()
        opt_b.step()
        assert all(same(pa, pb) for pa, pb in zip(a, b)), k
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert all(same(sa[i][k], sb[i][k]) for i in sa for k in ("step", "exp_avg", "exp_avg_sq"))
    # flat: the parameters, gradients and moment estimates each in one tensor; one thread again afterwards (on
    # torch 2.4, where AdamW is no Adam subclass, it takes optimizer.step: the same numbers, nothing flat)
    assert all((span(ts) is not None) == packed for ts in (a, [p.grad for p in a]))
    assert (span([sa[i]["exp_avg"] for i in sa]) is not None) == (packed and fusable(opt_a))
    assert torch.get_num_threads() == 1


def test_span_finds_only_tensors_that_tile_one_flat_tensor_in_order():
    pieces = pack([torch.arange(6.).view(2, 3), torch.tensor([6.0]), torch.arange(7., 11.)])
    assert [p.shape for p in pieces] == [(2, 3), (1,), (4,)]
    flat = span(pieces)
    assert torch.equal(flat, torch.arange(11.)) and flat.data_ptr() == pieces[0].data_ptr()
    flat[0] = -1  # a view: the same memory
    assert pieces[0][0, 0] == -1
    assert span(pieces[1:]) is not None and span([pieces[0], pieces[2]]) is None  # a gap
    assert span(pieces[::-1]) is None and span([pieces[0].t()]) is None  # out of order; not contiguous
    assert span([torch.zeros(3), torch.zeros(2)]) is None  # two storages


def test_packed_parameters_keep_their_identity_values_and_gradient_flow():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ELU(), torch.nn.Linear(3, 2))
    params, before = list(net.parameters()), [p.detach().clone() for p in net.parameters()]
    pack_parameters_(params)
    assert list(net.parameters()) == params and all(torch.equal(p, q) for p, q in zip(params, before))
    assert span(params) is not None and all(p.requires_grad and p.is_leaf for p in params)
    net(torch.randn(5, 4)).sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in params)


def test_a_flat_update_does_not_depend_on_the_thread_count(one_thread):
    results = []
    for threads in (1, 2):
        torch.manual_seed(0)
        ps = [nn.Parameter(torch.randn(shape)) for shape in ((100, 784), (100,), (10, 100))]
        pack_parameters_(ps)
        for p, grad in zip(ps, pack([torch.zeros_like(p) for p in ps])):
            p.grad = grad
        opt = torch.optim.Adam(ps, lr=0.01, fused=True)
        step = direct_step(opt, fixed_threads(threads))
        for _ in range(4):
            for p in ps:
                p.grad.copy_(torch.randn(p.shape))
            step()
        assert span([opt.state[p]["exp_avg_sq"] for p in ps]) is not None  # the flat update ran
        results.append([p.detach().clone() for p in ps])
    assert all(torch.equal(x, y) for x, y in zip(*results))


def test_direct_step_leaves_other_optimizers_alone():
    p = torch.zeros(3, requires_grad=True)
    for opt in (torch.optim.SGD([p], lr=0.1), torch.optim.Adam([p], foreach=True), torch.optim.Adam([p], fused=True,
                                                                                                      amsgrad=True)):
        p.grad = torch.ones(3)
        opt.step()
        assert direct_step(opt) == opt.step


def test_direct_step_takes_over_from_the_second_step():
    p = torch.zeros(3, requires_grad=True)
    opt = torch.optim.Adam([p], fused=True)
    calls, torch_step = [], opt.step
    opt.step = lambda: calls.append(1) or torch_step()
    step = direct_step(opt)
    for _ in range(5):
        p.grad = torch.ones(3)
        step()
    assert len(calls) == 1 and opt.state[p]["step"].item() == 5
