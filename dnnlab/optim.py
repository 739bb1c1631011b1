"""Optimizer factory, and everything the trainer does to gradients and weights around optimizer.step()."""
from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from dnnlab.model import hidden_linears, weight_matrices

EXTRA_KEYS = ("clip_value", "clip_norm")  # dnnlab's own keys in the optimizer group, not torch arguments
FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(cfg: DictConfig, params: list, device: torch.device, lr: float | None = None
                    ) -> torch.optim.Optimizer:
    """The configured torch optimizer over `params` (at learning rate `lr` if given, else the configured one)."""
    kwargs = {k: v for k, v in cfg.items() if k not in EXTRA_KEYS}
    if kwargs.get("fused") and device.type not in FUSED_DEVICES:  # fused kernels exist only for these
        kwargs["fused"], kwargs["foreach"] = False, True
    if lr is not None:
        kwargs["lr"] = lr
    return instantiate(kwargs)(params)


def set_momentum(optimizer: torch.optim.Optimizer, momentum: float) -> None:
    """Write a cycled momentum: SGD's `momentum`, or beta1 for the Adam family (as PyTorch's OneCycleLR does)."""
    for group in optimizer.param_groups:
        if "betas" in group:
            group["betas"] = (momentum, group["betas"][1])
        elif "momentum" in group:
            group["momentum"] = momentum


class GradientRules:
    """Penalties, clipping and max-norm: applied between backward() and step() (and after step for max-norm).

    L1/L2 are added to the gradients directly (2*l2*w and l1*sign(w)), which equals differentiating
    l1*sum|w| + l2*sum(w^2) but costs no extra autograd graph. Reported losses are therefore the data loss
    (cross-entropy) alone, comparable between training and validation.
    """

    def __init__(self, model: nn.Module, reg: DictConfig, opt_cfg: DictConfig):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.kernels = [w for w in weight_matrices(model) if w.requires_grad]
        self.l1, self.l2 = float(reg.get("l1", 0.0)), float(reg.get("l2", 0.0))
        self.clip_value, self.clip_norm = opt_cfg.clip_value, opt_cfg.clip_norm
        self.max_norm = reg.get("max_norm")
        self.constrained = [m.weight for m in hidden_linears(model) if m.weight.requires_grad]

    def before_step(self) -> None:
        if self.l2:
            torch._foreach_add_([w.grad for w in self.kernels], self.kernels, alpha=2 * self.l2)
        if self.l1:
            torch._foreach_add_([w.grad for w in self.kernels], torch._foreach_sign(self.kernels), alpha=self.l1)
        if self.clip_value is not None:
            nn.utils.clip_grad_value_(self.params, self.clip_value, foreach=True)
        if self.clip_norm is not None:
            nn.utils.clip_grad_norm_(self.params, self.clip_norm, foreach=True)

    @torch.no_grad()
    def after_step(self) -> None:
        if self.max_norm is not None:  # each neuron's incoming weights (a row of the torch kernel) to norm <= r
            for w in self.constrained:
                w.copy_(torch.renorm(w, 2, 0, self.max_norm))
