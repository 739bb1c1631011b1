"""Optimizer factory, and everything the trainer does to gradients and weights around optimizer.step()."""
from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from dnnlab import components
from dnnlab.model import hidden_linears, weight_matrices

FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(cfg: DictConfig, params: list, device: torch.device, lr: float | None = None
                    ) -> torch.optim.Optimizer:
    """The configured torch optimizer over `params` (at learning rate `lr` if given, else the configured one):
    Hydra's instantiate of the section, once dnnlab's component table has passed its target and settings (a
    checkpoint's config may come from anyone: no other name reaches the importer, no nested _target_ or _args_)."""
    components.settings(cfg, "optimizer")
    components.lookup(cfg.get("_target_"), "optimizer._target_")
    fixed = {} if lr is None else {"lr": lr}
    if cfg.get("fused") and device.type not in FUSED_DEVICES:  # fused kernels exist only for these
        fixed |= {"fused": False, "foreach": True}
    # plain lists (betas), not ListConfig: the optimizer's state_dict goes into checkpoints
    return instantiate(cfg, _partial_=True, _convert_="all", **fixed)(params)


def set_momentum(optimizer: torch.optim.Optimizer, momentum: float) -> None:
    """Write a cycled momentum: SGD's `momentum`, or beta1 for the Adam family (as PyTorch's OneCycleLR does)."""
    for group in optimizer.param_groups:
        if "betas" in group:
            group["betas"] = (momentum, group["betas"][1])
        elif "momentum" in group:
            group["momentum"] = momentum


def set_rates(optimizer: torch.optim.Optimizer, schedule, step: int) -> float:
    """The schedule's learning rate (and momentum, for 1cycle) at `step`, into every parameter group; the rate."""
    lr, momentum = schedule.lr(step), schedule.momentum(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if momentum is not None:
        set_momentum(optimizer, momentum)
    return lr


class JobRules:
    """One job's L1/L2 penalties, gradient clipping and max-norm, applied between backward() and the update (and
    max-norm after it) with the foreach kernels torch's own utilities use. A run applies its network's; a stacked
    sweep (dnnlab.stack) applies each job's to that job's slices of the stack.

    L1/L2 are added to the gradients directly (2*l2*w and l1*sign(w)), which equals differentiating
    l1*sum|w| + l2*sum(w^2) but costs no extra autograd graph. Reported losses are therefore the data loss
    (cross-entropy) alone, comparable between training and validation. Clipping computes what
    nn.utils.clip_grad_value_ and clip_grad_norm_(foreach=True) compute, max-norm what torch.renorm does."""

    def __init__(self, reg: DictConfig, trainer: DictConfig):
        self.l1, self.l2 = float(reg.get("l1", 0.0)), float(reg.get("l2", 0.0))
        self.clip_value, self.clip_norm = trainer.clip_value, trainer.clip_norm
        self.max_norm = reg.get("max_norm")
        self.change_gradients = bool(self.l1 or self.l2 or self.clip_value is not None or self.clip_norm is not None)

    @torch.no_grad()  # the penalties change the gradients in place; autograd must not record that
    def before_step(self, kernels: list[torch.Tensor], kernel_grads: list[torch.Tensor], grads: list[torch.Tensor]
                    ) -> None:
        """kernels and their gradients; grads: every trainable tensor's gradient (what clipping sees)."""
        if self.l2:
            torch._foreach_add_(kernel_grads, kernels, alpha=2 * self.l2)
        if self.l1:
            torch._foreach_add_(kernel_grads, torch._foreach_sign(kernels), alpha=self.l1)
        if self.clip_value is not None:
            torch._foreach_clamp_min_(grads, -self.clip_value)
            torch._foreach_clamp_max_(grads, self.clip_value)
        if self.clip_norm is not None:  # scale by clip_norm / (global norm + 1e-6), at most 1
            total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            torch._foreach_mul_(grads, torch.clamp(self.clip_norm / (total + 1e-6), max=1.0))

    @torch.no_grad()
    def after_step(self, hidden_kernels: list[torch.Tensor], neuron_dim: int) -> None:
        """Each hidden neuron's incoming weights (its slices along `neuron_dim`) rescaled to norm <= max_norm."""
        if self.max_norm is not None:
            for w in hidden_kernels:
                w.copy_(torch.renorm(w, 2, neuron_dim, self.max_norm))


class GradientRules:
    """JobRules on a torch network: its Linear kernels (a row holds a neuron's incoming weights) and every
    trainable parameter's gradient, read at each step (backward() makes fresh ones)."""

    def __init__(self, model: nn.Module, reg: DictConfig, trainer: DictConfig):
        self.rules = JobRules(reg, trainer)
        self.change_gradients = self.rules.change_gradients
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.kernels = [w for w in weight_matrices(model) if w.requires_grad]
        self.constrained = [m.weight for m in hidden_linears(model) if m.weight.requires_grad]

    def before_step(self) -> None:
        if self.change_gradients:
            penalised = [w for w in self.kernels if w.grad is not None] if self.rules.l1 or self.rules.l2 else []
            self.rules.before_step([w.detach() for w in penalised], [w.grad for w in penalised],
                                   [p.grad for p in self.params if p.grad is not None])

    def after_step(self) -> None:
        if self.rules.max_norm is not None:
            self.rules.after_step([w.detach() for w in self.constrained], neuron_dim=0)
