"""Optimizer factory, and everything the trainer does to gradients and weights around optimizer.step()."""
from __future__ import annotations

import math
import operator

import torch
from omegaconf import DictConfig
from torch import nn

from dnnlab.components import make
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
    return make(kwargs, "optimizer")(params)


def fusable(optimizer: torch.optim.Optimizer) -> bool:
    """Torch's fused Adam or AdamW (dnnlab's default) over one parameter group: its step is one kernel call."""
    group = optimizer.param_groups[0]
    return (isinstance(optimizer, torch.optim.Adam) and len(optimizer.param_groups) == 1  # AdamW subclasses Adam
            and bool(group.get("fused")) and not group.get("amsgrad") and not group.get("capturable")
            and not group.get("differentiable"))


def fused_adam_(params, grads, exp_avgs, exp_avg_sqs, steps, group: dict) -> None:
    """The kernel that a fused Adam/AdamW step ends in, with `group`'s current hyperparameters (the caller has
    already counted the step in `steps`)."""
    beta1, beta2 = group["betas"]
    kernel = torch._fused_adamw_ if group.get("decoupled_weight_decay") else torch._fused_adam_
    kernel(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"], beta1=float(beta1),
           beta2=float(beta2), weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
           grad_scale=None, found_inf=None)


def adam_settings(group: dict) -> list[float]:
    """The flat-Adam contract with the C++ step (dnnlab/csrc/mlp_step.cpp, `hyperparameters`): a param group's
    lr, beta1, beta2, weight_decay, eps, decoupled (AdamW), maximize as they are at this step, in this order."""
    beta1, beta2 = group["betas"]
    return [float(v) for v in (group["lr"], beta1, beta2, group["weight_decay"], group["eps"],
                               bool(group.get("decoupled_weight_decay")), group["maximize"])]


def span(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The flat tensor that `tensors` tile (contiguous, one after another in one storage, in this order), or None."""
    first = tensors[0]
    storage, offset = first.untyped_storage(), first.storage_offset()
    for t in tensors:
        if (not t.is_contiguous() or t.dtype != first.dtype or t.untyped_storage().data_ptr() != storage.data_ptr()
                or t.storage_offset() != offset):
            return None
        offset += t.numel()
    return first.detach().new_empty(0).set_(storage, first.storage_offset(), (offset - first.storage_offset(),))


def pack(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of one new flat tensor that hold the values of `tensors`, one after another, each in its shape."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def pack_parameters_(params: list[nn.Parameter]) -> None:
    """Move `params` into one flat tensor (each parameter's data becomes a view of its piece; values, identity and
    the module's references are kept), so that direct_step updates all of them in one kernel call."""
    with torch.no_grad():
        for p, piece in zip(params, pack(params)):
            p.data = piece


def direct_step(optimizer: torch.optim.Optimizer, tuner=None):
    """A function doing `optimizer.step()`: a DirectStep for fused Adam/AdamW, else optimizer.step itself."""
    return DirectStep(optimizer, tuner) if fusable(optimizer) else optimizer.step


class DirectStep:
    """`optimizer.step()` for fused Adam/AdamW: the fused kernel called directly, from the step after the one that
    created the state, on cached lists of the parameters and their state, which skips the step's per-call Python
    bookkeeping: about 0.2 ms, a sixth of a default autograd training step on the CPU. The optimizer still owns the
    state (state_dict, checkpoints), and the learning rate and betas a schedule writes into param_groups are read at
    every step, so the updates are exactly those of optimizer.step().
    Where the parameters and their gradients each tile one flat tensor (pack_parameters_; the C++ step's
    gradients), the moment estimates move into flat tensors too and one call updates everything, on the threads
    that `tuner` (a dnnlab.threads.ThreadTuner, which times these calls) chooses, else on torch's: the kernel
    works element by element, so the thread count changes its speed only. On a default network's 119,405
    parameters, 2 threads can take half the time of 1, while its matrix products are as fast on one. The C++
    training step can take the same update itself (`flat`, `hyperparameters`, `threads`, `done`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, tuner=None):
        self.optimizer, self.tuner = optimizer, tuner
        self.group = optimizer.param_groups[0]
        self.params = self.group["params"]
        self.kernel_args = None
        self.calls = 0  # flat updates this epoch: the tuner's step number

    def ready(self) -> bool:
        """Whether the kernel's arguments fit the current gradients (rebuilt when the gradients changed); False until
        torch's own first step has created the state."""
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            return False
        if self.kernel_args is None or self.kernel_args[0] and not all(map(operator.is_, grads, self.kernel_args[0])):
            states = [self.optimizer.state.get(p) for p in self.params]
            if not all(states):
                return False
            self.kernel_args = _kernel_args(self.params, grads, states)
        return True

    def __call__(self) -> None:
        if not self.ready():
            return self.optimizer.step()
        flat_grads, counts, tensors = self.kernel_args
        counts.add_(1)
        if not flat_grads:
            return fused_adam_(tensors[0], [p.grad for p in self.params], *tensors[1:], self.group)
        if self.tuner is None:
            return fused_adam_(*tensors, self.group)
        threads, before = self.threads(), torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            fused_adam_(*tensors, self.group)
        finally:
            torch.set_num_threads(before)
        self.done()

    def flat(self) -> list[torch.Tensor] | None:
        """[params, grads, exp_avg, exp_avg_sq, step counters], each one flat tensor, for an update taken elsewhere
        (which counts the step in every counter); None until ready, or where the tensors are not flat."""
        if not self.ready() or not self.kernel_args[0]:
            return None
        _, counts, ((params,), (grads,), (exp_avg,), (exp_avg_sq,), _) = self.kernel_args
        return [params, grads, exp_avg, exp_avg_sq, counts]

    def hyperparameters(self) -> list[float]:
        return adam_settings(self.group)

    def threads(self) -> int:
        """The threads of the next flat update (the tuner's choice, else torch's); `done` follows the update."""
        if self.tuner is None:
            return torch.get_num_threads()
        self.tuner.before(self.calls)
        return self.tuner.current

    def done(self, seconds: float | None = None) -> None:
        """The flat update that `threads` began is done, taking `seconds` (else the tuner's clock tells)."""
        if self.tuner is not None:
            self.tuner.after(self.calls, seconds)
        self.calls += 1


def _kernel_args(params: list, grads: list, states: list) -> tuple:
    """(the gradients the flat tensors hold, or None; step counter; fused_adam_'s tensor lists: params, [grads],
    exp_avgs, exp_avg_sqs, steps). Every parameter's step counter becomes a view into one tensor, so one add_
    counts a step for all of them (_foreach_add_ over a dozen scalars costs as much as a layer's matrix product
    here). With the flat tensors, the lists hold one tensor each."""
    counts = torch.stack([s["step"] for s in states])
    for k, s in enumerate(states):
        s["step"] = counts[k]
    flat_params, flat_grads = span(params), span(grads)
    if flat_params is None or flat_grads is None:
        return None, counts, ([p.detach() for p in params], [s["exp_avg"] for s in states],
                              [s["exp_avg_sq"] for s in states], [s["step"] for s in states])
    moments = []
    for name in ("exp_avg", "exp_avg_sq"):
        if span([s[name] for s in states]) is None:
            for s, piece in zip(states, pack([s[name] for s in states])):
                s[name] = piece
        moments.append([span([s[name] for s in states])])
    return grads, counts, ([flat_params], [flat_grads], *moments, [counts[0]])


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
        self.clip_value = column([c.get("clip_value") for c in clips], math.inf)
        self.clip_norm = column([c.get("clip_norm") for c in clips], math.inf)
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
