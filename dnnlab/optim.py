"""Optimizer factory, and everything the trainer does to gradients and weights around optimizer.step()."""
from __future__ import annotations

import math

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
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
    """L1/L2 penalties, gradient clipping and max-norm for J jobs at once, each with its own strengths (one job: J=1).
    Every tensor carries the jobs in its first dimension; kernels are laid out (jobs, fan_in, fan_out), so a column
    holds one neuron's incoming weights. Applied between backward() and the update (and max-norm after it).

    L1/L2 are added to the gradients directly (2*l2*w and l1*sign(w)), which equals differentiating
    l1*sum|w| + l2*sum(w^2) but costs no extra autograd graph. Reported losses are therefore the data loss
    (cross-entropy) alone, comparable between training and validation. Clipping computes what
    nn.utils.clip_grad_value_ and clip_grad_norm_ do, max-norm what torch.renorm does, each job on its own."""

    def __init__(self, regs: list[DictConfig], clips: list[DictConfig], device):
        def column(values, default):
            if all(v is None or v == default for v in values):
                return None
            return torch.tensor([default if v is None else float(v) for v in values], device=device)

        self.l1 = column([r.get("l1", 0.0) for r in regs], 0.0)
        self.l2 = column([r.get("l2", 0.0) for r in regs], 0.0)
        # trainer.clip_value/clip_norm, found beside whichever section of each job's config `clips` holds
        self.clip_value = column([OmegaConf.select(c, "..trainer.clip_value") for c in clips], math.inf)
        self.clip_norm = column([OmegaConf.select(c, "..trainer.clip_norm") for c in clips], math.inf)
        self.max_norm = column([r.get("max_norm") for r in regs], math.inf)
        self.change_gradients = any(c is not None for c in (self.l1, self.l2, self.clip_value, self.clip_norm))

    @torch.no_grad()  # the penalties change the gradients in place; autograd must not record that
    def before_step(self, kernels: list[torch.Tensor], kernel_grads: list[torch.Tensor], grads: list[torch.Tensor]
                    ) -> None:
        """kernels and their gradients; grads: every trainable tensor's gradient (what clipping sees)."""
        for strength, term, factor in ((self.l2, lambda w: w, 2.0), (self.l1, torch.sign, 1.0)):
            if strength is not None:
                for w, g in zip(kernels, kernel_grads):
                    g.addcmul_(term(w), strength.view(-1, 1, 1), value=factor)
        if self.clip_value is not None:
            for g in grads:
                c = self.clip_value.view(-1, *[1] * (g.dim() - 1))
                torch.clamp(g, -c, c, out=g)
        if self.clip_norm is not None:  # scale by clip_norm / (global norm + 1e-6), at most 1
            norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0)
            coef = (self.clip_norm / (norms + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))

    @torch.no_grad()
    def after_step(self, hidden_kernels: list[torch.Tensor]) -> None:
        """Each hidden neuron's incoming weights (a column) rescaled to norm <= max_norm, as torch.renorm does."""
        if self.max_norm is None:
            return
        r = self.max_norm.view(-1, 1, 1)
        for w in hidden_kernels:
            norm = w.norm(dim=1, keepdim=True)
            w.mul_(torch.where(norm > r, r / (norm + 1e-7), torch.ones_like(norm)))


def as_job(t: torch.Tensor) -> torch.Tensor:
    """A torch kernel (fan_out, fan_in) or any other tensor seen as one job of a stack: (1, fan_in, fan_out)."""
    return (t.t() if t.dim() == 2 else t).unsqueeze(0)


class GradientRules:
    """JobRules for one torch model, its tensors seen as a stack of one job (views: the rules change them in
    place). The views are taken at each step: backward() makes fresh gradients."""

    def __init__(self, model: nn.Module, reg: DictConfig, clip: DictConfig):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.kernels = [w for w in weight_matrices(model) if w.requires_grad]
        self.constrained = [m.weight for m in hidden_linears(model) if m.weight.requires_grad]
        self.rules = JobRules([reg], [clip], self.params[0].device if self.params else "cpu")
        self.change_gradients = self.rules.change_gradients

    def before_step(self) -> None:
        if self.change_gradients:
            self.rules.before_step([as_job(w.detach()) for w in self.kernels], [as_job(w.grad) for w in self.kernels],
                                   [as_job(p.grad) for p in self.params if p.grad is not None])

    def after_step(self) -> None:
        self.rules.after_step([as_job(w.detach()) for w in self.constrained])
