"""The training step, chosen once for a loop: the C++ step (dnnlab.fast.native), autograd, or autograd with the hooks of
dnnlab.diagnostics. Each is called as `step(idx, t)` (the batch's indices, the loop's step number) and takes the
whole step: forward, loss, backward, the gradient rules and the optimizer's update. `dnnlab train`'s epochs
(trainer.train_epoch), `dnnlab diagnose` and `dnnlab lr-find` all train with it; their loops set the learning rate,
call the step and look at the loss it returns."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from dnnlab.fast import native
from dnnlab.fast.flat_adam import DirectStep, direct_step
from dnnlab.fast.forward import flat_forward


def choose_step(net, x_all, y_all, optimizer, rules, *, autocast=None, diag=None, offset: int = 0,
                plan: native.Plan | None = None, tuner=None, sums: tuple | None = None):
    """`step(idx, t)`: one training step on the batch `x_all[idx]`, returning its mean loss as a 0-d tensor (not
    read here: on a GPU reading it would wait for the device). The step adds the batch's summed loss and correct
    predictions to `sums` (loss_sum, correct; device tensors, fresh ones where not given).
    `rules` (optim.GradientRules) changes the gradients before the update and the weights after it; `diag` (a
    Diagnostics) records at the run's step offset + t: begin before the forward pass, before_step after the
    backward pass (the plain loss gradient, before penalties and clipping), after_step after the update;
    `plan` (see dnnlab.fast.native) has the C++ step do forward, loss and backward (and mostly the update) in one call;
    `tuner` chooses the threads of the flat update (see fast.update_tuner)."""
    device = x_all.device
    loss_sum, correct = sums or (torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long))
    update = direct_step(optimizer, tuner)  # optimizer.step(), for fused Adam without its per-call bookkeeping
    if plan:
        passes = native_passes(plan, x_all, y_all, loss_sum, correct, update, rules)
    else:
        passes = autograd_passes(net, x_all, y_all, loss_sum, correct, optimizer, autocast or nullcontext(), diag,
                                 offset)

    def step(idx: torch.Tensor, t: int) -> torch.Tensor:
        loss, updated = passes(idx, t)
        if not updated:
            rules.before_step()
            update()
        rules.after_step()
        if diag:
            diag.after_step(offset + t)  # the update includes max-norm's rescaling
        return loss

    return step


def native_passes(plan: native.Plan, x_all, y_all, loss_sum, correct, update, rules):
    """The C++ step's passes: (idx, t) -> (the loss, whether it also took the update)."""
    # it takes a flat fused update too where nothing changes the gradients before it (and it computes as torch does)
    fits = isinstance(update, DirectStep) and not rules.change_gradients
    native_step = native.NativeStep(plan, x_all, y_all, loss_sum, correct,
                                    update if fits and native.update_in_step() else None)
    return lambda idx, t: native_step(idx)


def autograd_passes(net, x_all, y_all, loss_sum, correct, optimizer, autocast, diag, offset: int):
    """Autograd's forward and backward pass, with Diagnostics' hooks around them where `diag` is given:
    (idx, t) -> (the detached loss, False)."""
    # the same results with less overhead per step; diagnostics arm forward hooks on the steps they sample
    forward = net if diag else flat_forward(net) or net
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def passes(idx: torch.Tensor, t: int):
        x, y = x_all.index_select(0, idx), y_all.index_select(0, idx)  # 3x faster than x_all[idx] on the CPU
        if diag:
            diag.begin(offset + t)
        with autocast:
            logits = forward(x)
        loss = F.cross_entropy(logits.float(), y)
        for p in params:  # optimizer.zero_grad(set_to_none=True), without its per-call profiler bookkeeping
            p.grad = None
        loss.backward()
        if diag:
            diag.before_step(offset + t)  # the plain loss gradient, before penalties and clipping
        loss = loss.detach()
        loss_sum.add_(loss * len(y))
        correct.add_((logits.argmax(1) == y).sum())
        return loss, False

    return passes


def batches(n: int, batch_size: int, per_pass: int, steps: int, generator: torch.Generator | None, device):
    """(t, the indices of its batch) for `steps` steps over n examples: a fresh shuffle every `per_pass` steps."""
    for t in range(steps):
        i = t % per_pass
        if i == 0:
            perm = torch.randperm(n, device=device, generator=generator)
        yield t, perm[i * batch_size:(i + 1) * batch_size]
