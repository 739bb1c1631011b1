"""Faster forward passes for the training steps: flat_forward (the layers' own forward methods in a loop, without
nn.Module.__call__'s hook checks) and Compiled (`trainer.compile`, torch.compile; CUDA graphs on a GPU). The
fallback is the network itself."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as torch_module


def flat_forward(net: nn.Module):
    """net's forward as a loop over its layers' own forward methods, or None where that could differ from net(x).
    It skips nn.Module.__call__ (its hook checks cost a few microseconds a module, a twentieth of a default
    training step on the CPU), so it is used only for plain nn.Sequential nesting without any hooks (dnnlab's
    diagnostics register some)."""
    if any(getattr(torch_module, name) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                    "_global_backward_hooks", "_global_backward_pre_hooks")):
        return None
    layers = []
    for m in net.modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return None
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
