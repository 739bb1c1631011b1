"""Faster forward passes for the training steps: flat_forward (the layers' own forward methods in a loop, without
nn.Module.__call__'s hook checks) and Compiled (`trainer.compile`, torch.compile; CUDA graphs on a GPU). The
fallback is the network itself."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as torch_module


HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def has_hooks(net: nn.Module) -> bool:
    """Whether a hook would run in net(x): one of its modules' own, or one registered for every module."""
    return (any(getattr(torch_module, f"_global{name}") for name in HOOKS)
            or any(getattr(m, name) for m in net.modules() for name in HOOKS))


def flat_forward(net: nn.Module):
    """net's forward as a loop over its layers' own forward methods, or None where that could differ from net(x).
    It skips nn.Module.__call__ (its hook checks cost a few microseconds a module, a twentieth of a default
    training step on the CPU), so it is used only for plain nn.Sequential nesting without any hooks (dnnlab's
    diagnostics register some)."""
    if has_hooks(net):
        return None
    layers = []
    for m in net.modules():
        if m._modules:
            if type(m).forward is not nn.Sequential.forward:  # a container that does more than chain its layers
                return None
        else:
            layers.append(m.forward)

    def forward(x):
        for f in layers:
            x = f(x)
        return x

    return forward


class Compiled(torch.nn.Module):
    """`trainer.compile`: the network as torch.compile builds it, for the training steps (evaluation keeps the
    plain network: other batch shapes, no graphs to record). On CUDA mode "reduce-overhead" replays each step's
    kernels as a CUDA graph, which removes the launch overhead that dominates small batches of small networks."""

    def __init__(self, net: torch.nn.Module, device: torch.device):
        super().__init__()
        self.net, self.cuda_graphs = net, device.type == "cuda"
        self.compiled = torch.compile(net, mode="reduce-overhead" if self.cuda_graphs else None, dynamic=False)

    def forward(self, x):
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new training step: earlier graph outputs may be reused
        return self.compiled(x)
