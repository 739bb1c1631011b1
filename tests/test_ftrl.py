"""FTRL-Proximal: the published per-coordinate rule (McMahan et al. 2013, Algorithm 1), Keras' generalisation,
exact zeros from l1, and the optimizer=ftrl config option."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dnnlab.ftrl import Ftrl
from dnnlab.model import build_mlp
from dnnlab.optim import build_optimizer


def paper_ftrl_logistic(xs, ys, alpha, beta, l1, l2, n0=0.0):
    """Algorithm 1 of McMahan et al. 2013, literally: per-coordinate FTRL-Proximal with L1 and L2 for logistic
    regression, one example per round, only the coordinates with x_i != 0 touched. Returns w after every round."""
    d = len(xs[0])
    z, n = [0.0] * d, [n0] * d
    w = [0.0] * d
    history = []
    for x, y in zip(xs, ys):
        active = [i for i in range(d) if x[i] != 0]
        for i in active:
            if abs(z[i]) <= l1:
                w[i] = 0.0
            else:
                w[i] = -(z[i] - math.copysign(l1, z[i])) / ((beta + math.sqrt(n[i])) / alpha + l2)
        p = 1.0 / (1.0 + math.exp(-sum(x[i] * w[i] for i in active)))
        for i in active:
            g = (p - y) * x[i]
            sigma = (math.sqrt(n[i] + g * g) - math.sqrt(n[i])) / alpha
            z[i] += g - sigma * w[i]
            n[i] += g * g
        # the weights the next round will use (Algorithm 1 computes them lazily at the start of the round)
        history.append([0.0 if abs(z[i]) <= l1 else
                        -(z[i] - math.copysign(l1, z[i])) / ((beta + math.sqrt(n[i])) / alpha + l2)
                        for i in range(d)])
    return history


def logistic_data(seed=0, n=60, d=8):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * (rng.random((n, d)) < 0.7)  # sparse rows: untouched coordinates must stay put
    y = (x @ rng.normal(size=d) + 0.3 * rng.normal(size=n) > 0).astype(float)
    return x, y


def torch_ftrl_logistic(x, y, **kwargs):
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = Ftrl([w], **kwargs)
    history = []
    for xi, yi in zip(torch.as_tensor(x), torch.as_tensor(y)):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(xi @ w, yi).backward()  # gradient (p - y) x, as in the paper
        opt.step()
        history.append(w.detach().clone().tolist())
    return history


@pytest.mark.parametrize("alpha,beta,lambda1,lambda2", [(0.1, 1.0, 0.0, 0.0), (0.1, 1.0, 0.5, 0.2),
                                                         (0.5, 1.0, 2.0, 1.0), (0.05, 0.5, 0.1, 0.0)])
def test_matches_the_published_update_rule(alpha, beta, lambda1, lambda2):
    x, y = logistic_data()
    expected = paper_ftrl_logistic(x.tolist(), y.tolist(), alpha, beta, lambda1, lambda2)
    # the paper's n starts at 0 and its L2 is (lambda2 / 2) ||w||^2; Keras' l2 is the penalty l2 * w^2
    got = torch_ftrl_logistic(x, y, lr=alpha, beta=beta, l1=lambda1, l2=lambda2 / 2, initial_accumulator_value=0.0)
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-12, atol=1e-14)
    if lambda1 >= 0.5:
        assert (np.array(got)[-1] == 0).any()  # l1 leaves exact zeros


def test_keras_initial_accumulator_is_the_papers_n_starting_there():
    x, y = logistic_data(seed=3)
    expected = paper_ftrl_logistic(x.tolist(), y.tolist(), 0.1, 0.0, 0.3, 0.0, n0=0.1)
    got = torch_ftrl_logistic(x, y, lr=0.1, l1=0.3)  # Keras' defaults otherwise: n0 = 0.1, beta 0, power -0.5
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-12, atol=1e-14)


def keras_ftrl_step(w, g, accum, linear, lr, power, l1, l2, shrinkage, beta):
    """Keras 3's Ftrl.update_step (and TensorFlow's ApplyFtrlV2), transcribed in numpy."""
    l2 = l2 + beta / (2.0 * lr)
    grad_to_use = g + 2 * shrinkage * w
    new_accum = accum + g * g
    linear = linear + grad_to_use - (new_accum ** -power - accum ** -power) / lr * w
    quadratic = new_accum ** -power / lr + 2 * l2
    w = (np.clip(linear, -l1, l1) - linear) / quadratic
    return w, new_accum, linear


def test_matches_keras_from_nonzero_weights_with_every_option():
    rng = np.random.default_rng(7)
    settings = dict(lr=0.05, power=-0.3, l1=0.01, l2=0.02, shrinkage=0.03, beta=0.5)
    w0 = rng.normal(size=(4, 5))
    grads = [rng.normal(size=(4, 5)) for _ in range(6)]
    w, accum, linear = w0.copy(), np.full_like(w0, 0.2), np.zeros_like(w0)
    p = torch.nn.Parameter(torch.tensor(w0))
    opt = Ftrl([p], lr=0.05, learning_rate_power=-0.3, initial_accumulator_value=0.2, l1=0.01, l2=0.02,
               l2_shrinkage=0.03, beta=0.5)
    for g in grads:
        w, accum, linear = keras_ftrl_step(w, g, accum, linear, **settings)
        p.grad = torch.tensor(g)
        opt.step()
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(opt.state[p]["accumulator"].numpy(), accum, rtol=1e-12)
    np.testing.assert_allclose(opt.state[p]["linear"].numpy(), linear, rtol=1e-12)


def test_first_step_keeps_only_a_fraction_of_the_initial_weights():
    """Keras' FTRL starts its closed form at z = 0: the first step keeps (1 - sqrt(n0 / n1)) of w0."""
    w0, g = torch.tensor([0.5, -0.2, 0.0]), torch.tensor([0.1, 0.0, -0.3])
    p = torch.nn.Parameter(w0.clone())
    p.grad = g.clone()
    Ftrl([p], lr=0.01).step()
    n1 = 0.1 + g ** 2
    expected = w0 * (1 - (0.1 / n1).sqrt()) - 0.01 * g / n1.sqrt()
    torch.testing.assert_close(p.detach(), expected)


def test_constant_rate_when_learning_rate_power_is_zero():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = Ftrl([p], lr=0.1, learning_rate_power=0.0)
    total = torch.zeros(3)
    for g in ([1.0, -2.0, 0.5], [0.5, 1.0, 0.5]):
        p.grad = torch.tensor(g)
        total += p.grad
        opt.step()
        torch.testing.assert_close(p.detach(), -0.1 * total)  # dual averaging: w = -lr * sum of gradients


def test_stronger_l1_makes_more_exact_zeros_in_a_network(make_cfg):
    cfg = make_cfg("optimizer=ftrl", "model.n_hidden=2", "model.n_neurons=16")
    zeros = []
    for l1 in (0.0, 1e-3, 1e-2):
        torch.manual_seed(0)
        model = build_mlp(cfg, 10)
        opt = Ftrl(model.parameters(), lr=0.05, l1=l1)
        g = torch.Generator().manual_seed(0)
        for _ in range(20):
            x, y = torch.rand(32, 784, generator=g), torch.randint(0, 10, (32,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        weights = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, torch.nn.Linear)])
        zeros.append((weights == 0).float().mean().item())
    assert zeros[0] == 0.0 and 0.0 < zeros[1] < zeros[2]


def test_config_option_builds_with_keras_defaults(make_cfg):
    cfg = make_cfg("optimizer=ftrl", "trainer.clip_norm=1.0")
    opt = build_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(2))], torch.device("cpu"))
    assert type(opt) is Ftrl
    assert opt.defaults == {"lr": 0.001, "learning_rate_power": -0.5, "initial_accumulator_value": 0.1, "l1": 0.0,
                            "l2": 0.0, "l2_shrinkage": 0.0, "beta": 0.0, "weight_decay": 0.0}
    assert build_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(2))], torch.device("cpu"),
                           lr=0.5).defaults["lr"] == 0.5


def test_state_dict_resumes_identically():
    torch.manual_seed(0)
    a = torch.nn.Linear(5, 3)
    b = copy.deepcopy(a)
    opt_a = Ftrl(a.parameters(), lr=0.1, l1=0.01)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    for model, opt in ((a, opt_a),):
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    b.load_state_dict(a.state_dict())
    opt_b = Ftrl(b.parameters(), lr=0.1, l1=0.01)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for model, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_weight_decay_adds_torchs_l2_term_to_the_gradient():
    w0, g = torch.tensor([0.3, -0.4]), torch.tensor([0.2, 0.1])
    p, q = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    p.grad, q.grad = g.clone(), g + 0.5 * w0
    Ftrl([p], lr=0.1, weight_decay=0.5).step()
    Ftrl([q], lr=0.1).step()
    torch.testing.assert_close(p.detach(), q.detach())


@pytest.mark.parametrize("kwargs", [{"lr": 0.0}, {"learning_rate_power": 0.5}, {"l1": -1.0},
                                    {"initial_accumulator_value": -0.1}, {"l2_shrinkage": -1.0}])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        Ftrl([torch.nn.Parameter(torch.zeros(1))], **kwargs)
