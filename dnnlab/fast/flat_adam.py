"""Fused Adam/AdamW without optimizer.step()'s per-call bookkeeping: the parameters, gradients and moment estimates
as flat tensors and torch's fused kernel called directly (DirectStep), and the contract with the C++ step, which can
take the same update itself (adam_settings, DirectStep.flat). The fallback is torch's own optimizer.step()."""
from __future__ import annotations

import operator

import torch
from torch import nn


def fusable(optimizer: torch.optim.Optimizer) -> bool:
    """Torch's fused Adam or AdamW (dnnlab's default) over one parameter group: its step is one kernel call."""
    group = optimizer.param_groups[0]
    return (isinstance(optimizer, torch.optim.Adam) and len(optimizer.param_groups) == 1  # AdamW subclasses Adam
            and bool(group.get("fused")) and not group.get("amsgrad") and not group.get("capturable")
            and not group.get("differentiable"))


def fused_adam_(params, grads, exp_avgs, exp_avg_sqs, steps, group: dict) -> None:
    """The kernel that a fused Adam/AdamW step ends in, with `group`'s current hyperparameters (the caller has
    already counted the step in `steps`)."""
    lr, beta1, beta2, weight_decay, eps, decoupled, maximize = adam_settings(group)
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    kernel(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=lr, beta1=beta1, beta2=beta2,
           weight_decay=weight_decay, eps=eps, maximize=bool(maximize), grad_scale=None, found_inf=None)


def adam_settings(group: dict) -> list[float]:
    """The flat-Adam contract with the C++ step (dnnlab/fast/csrc/mlp_step.cpp, `hyperparameters`): a param group's
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
    that `tuner` (a dnnlab.fast.threads.ThreadTuner, which times these calls) chooses, else on torch's: the kernel
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
