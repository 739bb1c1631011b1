"""Speed-only code, in one place. Each part falls back to the plain torch way, against which the tests check it
(the same numbers, or up to float rounding for torch.compile, which may reorder sums):

- `native`: the C++ training step for plain MLPs on the CPU (and for a stack of them), built once per machine;
  the fallback is autograd (told at INFO with its reason).
- `flat_adam`: fused Adam/AdamW on flat tensors without optimizer.step()'s per-call bookkeeping, and the contract
  with the C++ step, which can take the same update itself (`adam_settings`); the fallback is optimizer.step().
- `forward`: the layers' forward methods in a loop, and `trainer.compile`; the fallback is the network itself.
- `threads`: ThreadTuner, which checks all cores against one while training.

A run asks for them with one call, `speed_up`, once per phase; `dnnlab.steps` builds the step from what it returns
(and takes the flat update and forward pass from `flat_adam` and `forward`, as diagnose and lr-find do too). A stack
(dnnlab.stacked) asks `native_plan` for the C++ stack step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from dnnlab.fast import native
from dnnlab.fast.flat_adam import fusable, pack_parameters_
from dnnlab.fast.forward import Compiled
from dnnlab.fast.threads import ThreadTuner


@dataclass
class Speedups:
    plan: native.Plan | None  # the C++ step's plan, or None: autograd
    tuner: ThreadTuner | None  # chooses the threads of the flat Adam update, or None: torch's threads
    train_net: torch.nn.Module  # what autograd's training steps call: the network, or Compiled


def native_plan(cfg: DictConfig, net: torch.nn.Module, device: torch.device) -> native.Plan | None:
    """How `trainer.native` has `net` trained: the C++ step's plan, or None for autograd."""
    t = cfg.trainer
    needs_autograd = [key for key, on in (("diagnostics=on", cfg.diagnostics.enabled), ("trainer.compile", t.compile),
                                          ("trainer.precision=bf16", t.precision == "bf16")) if on]
    return native.choose(t.native, net, device, needs_autograd)


def update_tuner(setting, cores: int, steps_per_epoch: int, plan: native.Plan | None) -> ThreadTuner | None:
    """With the C++ step and threads=auto, where the matrix products run on one thread: the chooser between that
    one and the job's `cores` for the optimizer's update of the flat parameters (flat_adam.DirectStep), which can
    take half the time on two and whose numbers do not depend on its threads (tested)."""
    if plan is None or setting != "auto" or cores <= torch.get_num_threads():
        return None
    return ThreadTuner(cores, steps_per_epoch, apply=None)


def speed_up(cfg: DictConfig, net: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
             cores: int, steps_per_epoch: int) -> Speedups:
    """What makes this phase's training faster: the C++ step's plan for `net` (the trainable part), the optimizer's
    parameters moved into one flat tensor (one fused update for all of them, see flat_adam.DirectStep), the tuner
    of that update's threads, and torch.compile's network where trainer.compile asks for it."""
    plan = native_plan(cfg, net, device)
    if device.type == "cpu" and fusable(optimizer):
        pack_parameters_([p for group in optimizer.param_groups for p in group["params"]])
    tuner = update_tuner(cfg.trainer.threads, cores, steps_per_epoch, plan)
    return Speedups(plan, tuner, Compiled(net, device) if cfg.trainer.compile else net)


