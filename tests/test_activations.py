"""dnnlab's CPU ELU and SELU compute what torch's do, values and gradients, and are what the configs build."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from dnnlab.activations import ELU, SELU
from dnnlab.runs import compose_config


@pytest.mark.parametrize("make, reference", [
    (lambda: ELU(), lambda x: F.elu(x)),
    (lambda: ELU(alpha=0.5), lambda x: F.elu(x, alpha=0.5)),
    (lambda: ELU(alpha=2.0), lambda x: F.elu(x, alpha=2.0)),
    (lambda: SELU(), F.selu),
])
def test_values_and_gradients_match_torch(make, reference):
    torch.manual_seed(0)
    x = torch.cat([torch.randn(32, 100) * 3, torch.tensor([[0.0, -1e-6, 1e-6, -20.0, 20.0]]).expand(32, 5)], 1)
    x.requires_grad_(True)
    grad = torch.randn(32, 105)
    mine, theirs = make()(x), reference(x)
    torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-6)
    (g_mine,), (g_theirs,) = torch.autograd.grad(mine, x, grad), torch.autograd.grad(theirs, x, grad)
    torch.testing.assert_close(g_mine, g_theirs, atol=1e-6, rtol=1e-5)


def test_inplace_and_gradient_free_calls_still_work():
    x = torch.randn(8, 10)
    expected = F.elu(x)
    with torch.no_grad():
        torch.testing.assert_close(ELU()(x), expected)
    ELU(inplace=True)(x)  # torch's own kernel: overwrites its input
    torch.testing.assert_close(x, expected)


@pytest.mark.parametrize("option, cls", [("elu", ELU), ("selu", SELU)])
def test_the_activation_group_builds_them(option, cls):
    cfg = compose_config([f"activation={option}"])
    module = instantiate(cfg.activation)()
    assert type(module) is cls and isinstance(module, cls.__mro__[1])  # still a torch.nn.ELU / SELU
