"""Stacked sweeps: jobs that share the network's shape train together, as one batched network.

A sweep over learning rates, seeds, initialisations, optimizers, schedules, L1/L2/max-norm strengths, dropout
rates or early-stopping settings leaves every weight matrix the same shape. Here the J jobs of such a group keep
their weights stacked, layer by layer, in tensors of shape (J, fan_in, fan_out), and one training step runs all J
networks at once: J mini-batches in, J sets of logits out, one backward pass (see "The step" below). What differs
per job stays per job:

- initialisation: `torch.manual_seed(seed)` then `build_mlp(cfg)` for each job, exactly as `dnnlab train` does, so
  every job starts from the weights it would have alone (its init group, scale and seed);
- data order: each job's own `torch.Generator` seeded with its seed draws its permutation every epoch;
- dropout: each job's own generator continues from the global generator's state after its initialisation, and
  draws each layer's mask with the same call (`bernoulli_`) that `nn.Dropout` makes on the CPU;
- optimizer, learning rate and schedule: a real torch optimizer per job (`build_optimizer`) over that job's slices
  of the stacked tensors, and the job's own closed-form schedule (`build_schedule`). Fused Adam/AdamW, the default,
  runs as torch's fused kernel (the one `optimizer.step()` calls) over each run of adjacent jobs whose settings are
  equal at that step, with the moment estimates stacked too;
- L1/L2 penalties, gradient clipping (by value or by global norm) and max-norm: per-job strengths, applied to the
  stacked gradients and weights in one operation each;
- early stopping, epochs and checkpoints: per job. A job that stops (early stopping, its last epoch, or a
  non-finite loss) is taken out of the stack; the others go on with smaller tensors.

Each job's run directory gets what `dnnlab train` writes (metrics.csv, TensorBoard events, checkpoints/last.pt and
best.pt holding that job's own, unstacked model and optimizer state, summary.json, environment.json,
learning_curves.png), through the same functions (dnnlab.record, dnnlab.checkpoint). Its metrics equal those of the
job run alone up to float rounding (batched and single matrix products may sum in a different order);
tests/test_stacked.py checks this.

Jobs that cannot be stacked (batch or layer norm, PReLU/RReLU, alpha dropout, transfer learning, Optuna trials,
diagnostics, resuming, a different network shape, data or batch size) are told apart by `plan()`; the
`hydra/launcher=stacked` launcher runs them one at a time through the normal trainer.

The step: on the CPU, every job's forward pass, loss and backward pass (and, for Adam without penalties or
clipping, its update) run in one C++ call (dnnlab::stack_step, see dnnlab/native.py), which hands the jobs to the
threads one at a time, each job on one thread with the kernels a single job uses; elsewhere (CUDA, bf16, trainer.native=false, no compiler) one batched matrix product (`torch.baddbmm`) per
layer runs all J networks at once under autograd.

Threads: a stack does J times the work of one job, so `trainer.threads=auto` uses every core from
J x batch x widest layer > 8192 on. With the C++ step, whose numbers do not depend on the thread count (tested), it
then checks that choice against one thread at the start of every epoch (dnnlab.threads.ThreadTuner): on a machine
where another program keeps a core busy, one thread is much faster. On CUDA the losses and accuracies stay on the
device and the host reads them once per epoch.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import operator
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dnnlab import checkpoint, memory, native, validate
from dnnlab.components import make
from dnnlab.data import load
from dnnlab.model import build_mlp, dropout_spec, widths
from dnnlab.optim import build_optimizer, fusable, fused_adam_, set_momentum
from dnnlab.record import LearningCurves, Recorder, environment, write_json
from dnnlab.schedule import build_schedule
from dnnlab.threads import ThreadTuner
from dnnlab.train import EarlyStopping, epoch_metrics, evaluate, native_plan, pick_device, restrict, seed_everything

log = logging.getLogger("dnnlab")
SELU_ALPHA, SELU_SCALE = 1.6732632423543772, 1.0507009873554805  # torch.nn.SELU's (Klambauer et al.)

# Config groups a job may set freely within a stack; every other key must be equal across the stack.
PER_JOB_GROUPS = ("init", "optimizer", "schedule", "regularizer")
PER_JOB_TRAINER_KEYS = ("seed", "epochs", "early_stopping", "checkpoint_every", "keep_checkpoints", "progress")
KNOWN_GROUPS = {"data", "model", "init", "activation", "norm", "optimizer", "schedule", "regularizer", "transfer",
                "trainer"}
UNSTACKABLE_ACTIVATIONS = {"torch.nn.PReLU": "PReLU has learned per-unit slopes",
                           "torch.nn.RReLU": "RReLU draws random slopes"}


# ---------------------------------------------------------------------------------------------------------- planning

def why_not(cfg: DictConfig) -> str | None:
    """Why this job cannot train in a stack (None: it can)."""
    # Other groups (diagnostics, an Optuna trial, ...) are features of the normal trainer: fine only when off.
    extra = [key for key in cfg if key not in KNOWN_GROUPS
             and not (OmegaConf.is_dict(cfg[key]) and cfg[key].get("enabled", True) is False)]
    if extra:
        return f"settings a stack does not handle: {', '.join(sorted(extra))}"
    if cfg.norm.kind != "none" or cfg.norm.input:
        return "normalisation layers (norm=none only)"
    if cfg.activation._target_ in UNSTACKABLE_ACTIVATIONS:
        return UNSTACKABLE_ACTIVATIONS[cfg.activation._target_]
    if cfg.regularizer.get("alpha_dropout") and cfg.regularizer.alpha_dropout.rate > 0:
        return "alpha dropout"
    if cfg.transfer.get("source"):
        return "transfer learning"
    if cfg.trainer.get("resume"):
        return "resuming a run (the normal trainer continues it)"
    return None


def shape_key(cfg: DictConfig) -> str:
    """What must be equal for jobs to share a stack: everything but the per-job settings."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for group in PER_JOB_GROUPS:
        resolved.pop(group, None)
    for key in PER_JOB_TRAINER_KEYS:
        resolved["trainer"].pop(key, None)
    return json.dumps(resolved, sort_keys=True, default=str)


def plan(cfgs: list[DictConfig], max_group: int | None = None, min_group: int = 2) -> list[list[int]]:
    """Split jobs (by index) into stacks that train together and single jobs (lists of one), in job order.
    A job whose config is invalid or unstackable runs alone (the normal trainer reports it)."""
    groups: dict[str, list[int]] = {}
    singles = []
    for i, cfg in enumerate(cfgs):
        try:
            validate.check(cfg)
            reason = why_not(cfg)
        except Exception:  # noqa: BLE001 - the normal trainer will report it properly
            reason = "invalid"
        if reason:
            singles.append([i])
        else:
            groups.setdefault(shape_key(cfg), []).append(i)
    out = list(singles)
    for members in groups.values():
        size = max_group or len(members)
        for start in range(0, len(members), size):
            chunk = members[start:start + size]
            out += [chunk] if len(chunk) >= max(min_group, 1) else [[i] for i in chunk]
    return sorted(out, key=lambda g: g[0])


def pick_stack_threads(setting, cfg: DictConfig, n_jobs: int) -> int:
    """Threads for a stack: like `dnnlab.train.pick_threads`, but a stack's matrix products are n_jobs times larger,
    so all cores pay off much sooner: from n_jobs x batch x widest layer > 8192 (three default networks). With
    threads=auto, ThreadTuner then checks the choice against one thread on the first epoch's steps."""
    import os

    if setting != "auto":
        return setting
    widest = max(widths(cfg.model), default=1)
    cores = len(os.sched_getaffinity(0))
    return 1 if n_jobs * cfg.trainer.batch_size * widest <= 8192 else cores


# ------------------------------------------------------------------------------------------------- the stacked net

class _Layer(torch.autograd.Function):
    """One stacked layer, act(x @ W + b) for every job at once, whose backward writes the weight and bias gradients
    into the stack's own buffers (the same memory every step: no fresh multi-megabyte gradient per step) and returns
    only the gradient of its input. act: None, or (alpha, scale) of ELU/SELU, whose backward is torch's own."""

    @staticmethod
    def forward(ctx, x, w, b, grad_w, grad_b, act):
        out = torch.baddbmm(b.unsqueeze(1), x, w)
        if act is not None:
            out = torch.ops.aten.elu(out, *act)  # alpha, scale: ELU and SELU
        ctx.save_for_backward(x, w, out if act is not None else None)
        ctx.grads, ctx.act = (grad_w, grad_b), act
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w, out = ctx.saved_tensors
        if ctx.act is not None:
            grad = torch.ops.aten.elu_backward(grad, ctx.act[0], ctx.act[1], 1.0, True, out)
        grad_w, grad_b = ctx.grads
        torch.bmm(x.mT, grad, out=grad_w)
        torch.sum(grad, dim=1, out=grad_b)
        grad_x = torch.bmm(grad, w.mT) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None, None


def activation_fn(cfg: DictConfig):
    """(alpha, scale) for ELU and SELU, computed inside the stacked layers; any other activation as its module."""
    target = cfg.activation._target_
    if target == "torch.nn.ELU":
        return (float(cfg.activation.get("alpha", 1.0)), 1.0)
    if target == "torch.nn.SELU":
        return (SELU_ALPHA, SELU_SCALE)
    return make(cfg.activation, "activation")()


class Job:
    """One job of a stack: its config, run directory, generators, optimizer, schedule, stopper and results."""

    def __init__(self, index: int, cfg: DictConfig, run_dir: Path, logger: logging.Logger):
        self.index, self.cfg, self.run_dir, self.log = index, cfg, Path(run_dir), logger
        self.t = cfg.trainer
        self.rows: list[dict] = []
        self.status, self.reason, self.steps_done = "completed", None, 0
        self.stopper = EarlyStopping(self.t.early_stopping)
        self.config_text = OmegaConf.to_yaml(cfg, resolve=True)
        self.active, self.final_state, self.lr = True, None, cfg.optimizer.lr


def job_major(stacked: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The values of per-layer stacked tensors (each jobs x ...) in one new flat tensor, job after job (a job's
    tensors adjacent, in the order given), and views of it shaped and indexed like `stacked`, each job's slice
    contiguous. A run of adjacent jobs is then one range of the flat tensor: one fused Adam call, where the
    layer-major layout needed one per tensor (the kernel's per-tensor cost is most of its time here)."""
    jobs = stacked[0].shape[0]
    per_job = sum(t.shape[1:].numel() for t in stacked)
    flat = stacked[0].new_empty(jobs * per_job)
    views, offset = [], 0
    for t in stacked:
        inner = t.shape[1:]
        strides = tuple(itertools.accumulate(reversed(inner[1:]), operator.mul, initial=1))[::-1]
        view = flat.as_strided((jobs, *inner), (per_job, *strides), offset)
        view.copy_(t)
        views.append(view)
        offset += inner.numel()
    return flat, views


class Stack:
    """The stacked weights of the active jobs and the batched forward pass."""

    def __init__(self, jobs: list[Job], models: list[nn.Sequential], act, device, kernel=None):
        self.act, self.device, self.kernel = act, device, kernel  # kernel: the C++ step's (activation, args)
        linears = [[m for m in model.modules() if isinstance(m, nn.Linear)] for model in models]
        names = [name for name, m in models[0].named_modules() if isinstance(m, nn.Linear)]
        self.keys = [(f"{n}.weight", f"{n}.bias") for n in names]  # the job's own state_dict keys
        self.n_layers = len(names)
        with torch.no_grad():  # (J, fan_in, fan_out): x @ W, Keras' kernel layout, the fastest for baddbmm
            self.weights = [torch.stack([lin[i].weight.t() for lin in linears]) for i in range(self.n_layers)]
            self.biases = [torch.stack([lin[i].bias for lin in linears]) for i in range(self.n_layers)]
        self.jobs = jobs
        self._buffers()

    def _buffers(self) -> None:
        """The weights and biases moved into one job-major flat tensor (job_major), gradients laid out the same
        way (written by _Layer's backward or the C++ step, read by the rules and the optimizers), the weights as
        plain tensors (for the C++ step) and the batch buffer."""
        with torch.no_grad():
            self.flat_params, views = job_major(self.params())
            self.flat_grads, grads = job_major([torch.zeros_like(v) for v in views])
        self.weights = [v.detach().requires_grad_() for v in views[0::2]]
        self.biases = [v.detach().requires_grad_() for v in views[1::2]]
        self.grad_w, self.grad_b = grads[0::2], grads[1::2]
        self.per_job = sum(p.shape[1:].numel() for p in self.params())
        self.plain = [w.detach() for w in self.weights], [b.detach() for b in self.biases]
        self.batch = None

    def grads(self) -> list[torch.Tensor]:
        """Interleaved like params()."""
        return [g for pair in zip(self.grad_w, self.grad_b) for g in pair]

    def job_grads(self) -> list[list[torch.Tensor]]:
        per_tensor = [g.unbind(0) for g in self.grads()]
        return [[views[k] for views in per_tensor] for k in range(len(self.jobs))]

    def gather(self, x_all: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x_all[idx] for idx (J, b) into a buffer reused from step to step: (J, b, features)."""
        shape = (idx.shape[0], idx.shape[1], x_all.shape[1])
        if self.batch is None or self.batch.shape != shape:
            self.batch = torch.empty(shape, dtype=x_all.dtype, device=x_all.device)
        torch.index_select(x_all, 0, idx.reshape(-1), out=self.batch.view(-1, shape[2]))
        return self.batch

    def params(self) -> list[torch.Tensor]:
        """Interleaved like model.parameters(): W1, b1, W2, b2, ..."""
        return [p for pair in zip(self.weights, self.biases) for p in pair]

    def job_params(self) -> list[list[torch.Tensor]]:
        """For each job, its slices of the stacked tensors (leaves without grad: what its optimizer updates)."""
        per_tensor = [p.detach().unbind(0) for p in self.params()]
        return [[views[k] for views in per_tensor] for k in range(len(self.jobs))]

    def keep(self, positions: list[int]) -> None:
        """Drop every job but those at `positions` from the stack."""
        self.weights = [w.detach()[positions] for w in self.weights]
        self.biases = [b.detach()[positions] for b in self.biases]
        self.jobs = [self.jobs[k] for k in positions]
        self._buffers()

    def state_dict(self, k: int) -> dict:
        """Job k's own model state, as build_mlp's network names and shapes it (contiguous copies)."""
        out = {}
        for (wk, bk), w, b in zip(self.keys, self.weights, self.biases):
            out[wk] = w.detach()[k].t().contiguous()
            out[bk] = b.detach()[k].clone()
        return out

    def forward(self, x: torch.Tensor, dropout=None) -> torch.Tensor:
        """Training: x (J, batch, 784), one mini-batch per job; dropout(position, h) -> h or None."""
        fused = isinstance(self.act, tuple)
        h = x if dropout is None else dropout(0, x)
        last = self.n_layers - 1
        for i, (w, b, gw, gb) in enumerate(zip(self.weights, self.biases, self.grad_w, self.grad_b)):
            h = _Layer.apply(h, w, b, gw, gb, self.act if fused and i < last else None)
            if i < last:
                if not fused:
                    h = self.act(h)
                if dropout is not None:
                    h = dropout(i + 1, h)
        return h

    def native_step(self, x_all: torch.Tensor, y_all: torch.Tensor, idx: torch.Tensor, dropout: _Dropout,
                    loss_sum: torch.Tensor, correct: torch.Tensor, update: tuple[list, list] | None = None
                    ) -> list[float]:
        """Every job's forward pass, loss and backward pass in one C++ call (dnnlab::stack_step, see
        dnnlab/native.py), the gradients written into grad_w / grad_b, the jobs spread over the threads; with
        `update` (_Stepper.fused), each job's Adam update too. Adds the jobs' summed losses and hits to loss_sum
        and correct; returns their mean losses."""
        weights, biases = self.plain
        shape = (len(self.jobs), idx.shape[1])
        masks = [dropout.mask(i, (*shape, w.shape[1]), x_all) for i, w in enumerate(weights)] if dropout.any \
            else [None] * self.n_layers
        return torch.ops.dnnlab.stack_step.default(x_all, y_all, idx, weights, biases, self.grad_w, self.grad_b,
                                                   *self.kernel, masks, loss_sum, correct, *(update or ([], [])))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation: x (batch, 784) shared by every job -> logits (J, batch, classes); the first layer is one wide
        matrix product for all jobs."""
        fused = isinstance(self.act, tuple)
        last = self.n_layers - 1
        h = x
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if h.dim() == 2:
                n_in, n_out = w.shape[1], w.shape[2]
                wide = w.detach().permute(1, 0, 2).reshape(n_in, -1)
                h = torch.addmm(b.detach().reshape(-1), h, wide).view(len(h), -1, n_out).transpose(0, 1)
            else:
                h = torch.baddbmm(b.detach().unsqueeze(1), h, w.detach())
            if i < last:
                h = torch.ops.aten.elu(h, *self.act) if fused else self.act(h)
        return h


# --------------------------------------------------------------------------------------------------- the training

class _Rules:
    """Per-job L1/L2, clipping and max-norm as stacked tensors, rebuilt when the stack shrinks."""

    def __init__(self, jobs: list[Job], device):
        def column(values, default):
            if all(v is None or v == default for v in values):
                return None
            return torch.tensor([default if v is None else float(v) for v in values], device=device)

        regs = [j.cfg.regularizer for j in jobs]
        opts = [j.cfg.optimizer for j in jobs]
        self.l1 = column([r.get("l1", 0.0) for r in regs], 0.0)
        self.l2 = column([2 * r.get("l2", 0.0) for r in regs], 0.0)
        self.clip_value = column([o.get("clip_value") for o in opts], math.inf)
        self.clip_norm = column([o.get("clip_norm") for o in opts], math.inf)
        self.max_norm = column([r.get("max_norm") for r in regs], math.inf)
        self.change_gradients = any(c is not None for c in (self.l1, self.l2, self.clip_value, self.clip_norm))

    def before_step(self, stack: Stack) -> None:
        weights = stack.grad_w
        if self.l2 is not None:
            for w, g in zip(stack.weights, weights):
                g.addcmul_(w.detach(), self.l2.view(-1, 1, 1))
        if self.l1 is not None:
            for w, g in zip(stack.weights, weights):
                g.addcmul_(torch.sign(w.detach()), self.l1.view(-1, 1, 1))
        grads = stack.grads()
        if self.clip_value is not None:
            for g in grads:
                c = self.clip_value.view(-1, *[1] * (g.dim() - 1))
                torch.clamp(g, -c, c, out=g)
        if self.clip_norm is not None:  # clip_grad_norm_: scale by max_norm / (total_norm + 1e-6), at most 1
            norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0)
            coef = (self.clip_norm / (norms + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))

    @torch.no_grad()
    def after_step(self, stack: Stack) -> None:
        if self.max_norm is None:
            return
        r = self.max_norm.view(-1, 1, 1)
        for w in stack.weights[:-1]:  # hidden layers: each neuron's incoming weights (a column here) to norm <= r
            norm = w.norm(dim=1, keepdim=True)
            w.mul_(torch.where(norm > r, r / (norm + 1e-7), torch.ones_like(norm)))


class _Dropout:
    """Per-job dropout masks at each position (0: the inputs, i: after hidden layer i), from per-job generators."""

    def __init__(self, jobs: list[Job], models: list[nn.Sequential], generators, n_hidden: int):
        self.rates = []  # rates[k][position]
        for job, model in zip(jobs, models):
            spec = dropout_spec(job.cfg.regularizer)
            rates = [0.0] * (n_hidden + 1)
            if spec:
                first = n_hidden - (spec[1].top_k if spec[1].top_k is not None else n_hidden)
                if spec[1].input:
                    rates[0] = spec[1].rate
                for i in range(max(first, 0), n_hidden):
                    rates[i + 1] = spec[1].rate
            self.rates.append(rates)
        self.generators = list(generators)
        self.any = any(r for rates in self.rates for r in rates)

    def keep(self, positions: list[int]) -> None:
        self.rates = [self.rates[k] for k in positions]
        self.generators = [self.generators[k] for k in positions]

    def mask(self, position: int, shape, like: torch.Tensor) -> torch.Tensor | None:
        """Every job's scaled mask at a position (shape: jobs x batch x width; like's dtype and device), or None
        if no job drops there."""
        dropping = [(k, rates[position]) for k, rates in enumerate(self.rates) if rates[position] > 0]
        if not dropping:
            return None
        noise = like.new_ones(shape) if len(dropping) < len(self.rates) else like.new_empty(shape)
        for k, p in dropping:  # what F.dropout does on the CPU: bernoulli_(1 - p), divided by 1 - p
            noise[k].bernoulli_(1 - p, generator=self.generators[k]).div_(1 - p)
        return noise

    def __call__(self, position: int, h: torch.Tensor) -> torch.Tensor:
        noise = self.mask(position, h.shape, h)
        return h if noise is None else h * noise


class _Stepper:
    """Each job's own optimizer (`build_optimizer`, its config) over its slices of the stack.

    Fused Adam/AdamW, dnnlab's default, runs as torch's fused kernel called directly: once every job's optimizer
    has taken its first step (which creates the state as torch does), their moment estimates move into flat
    tensors laid out like the stack's parameters (job_major), with each optimizer's state pointing at its own
    slices, and one kernel call over one range updates every run of adjacent jobs whose hyperparameters are equal
    at this step (all of them in a seed sweep; the kernel works element by element, so this equals one call per
    job up to the rounding of its vectorised and scalar loops, and spreads over the cores). Where nothing changes
    the gradients first (no L1/L2 penalty, no clipping), the C++ stack step takes each job's update itself instead
    (`fused`): fewer waits for the slowest thread on a busy machine, the gradients still in the cache. Other
    optimizers step one job at a time through optimizer.step()."""

    def __init__(self, jobs: list[Job], stack: Stack, device):
        self.device = device
        self.build(jobs, stack, carry=None)

    def build(self, jobs, stack, carry):
        self.params, self.grads = stack.job_params(), stack.job_grads()
        self.flat_params, self.flat_grads, self.per_job = stack.flat_params, stack.flat_grads, stack.per_job
        new = []
        for k, job in enumerate(jobs):
            opt = build_optimizer(job.cfg.optimizer, self.params[k], self.device, lr=job.cfg.optimizer.lr)
            if carry is not None:
                opt.load_state_dict(carry[k].state_dict())
            new.append(opt)
        self.optimizers = new
        self.slab = None if all(fusable(opt) for opt in new) else False
        self.runs: dict[tuple[int, int], list] = {}

    def keep(self, positions, jobs, stack):
        self.build(jobs, stack, carry=[self.optimizers[k] for k in positions])

    def _stack_state(self):
        """The optimizers' moment estimates as job-major flat tensors (each optimizer keeps views of its slices),
        and one step counter (every job of a stack has taken the same number of steps)."""
        states = [[opt.state[p] for p in params] for opt, params in zip(self.optimizers, self.params)]
        if any(len(s) == 0 for job in states for s in job):
            return None  # not every optimizer has stepped yet
        flats, views = {}, {}
        for name in ("exp_avg", "exp_avg_sq"):
            flats[name], views[name] = job_major([torch.stack([job[i][name] for job in states])
                                                  for i in range(len(states[0]))])
        step = states[0][0]["step"].clone()
        for k, job in enumerate(states):
            for i, s in enumerate(job):
                s["exp_avg"], s["exp_avg_sq"], s["step"] = views["exp_avg"][i][k], views["exp_avg_sq"][i][k], step
        return flats["exp_avg"], flats["exp_avg_sq"], step

    def fused(self) -> tuple[list, list] | None:
        """What the C++ stack step needs to take every job's Adam/AdamW update itself, right after the job's
        backward pass on the job's thread (while its gradients are in the cache; the same arithmetic as a single
        job's update): the flat tensors and step counter, and each job's hyperparameters at this step. None until
        every optimizer has taken its first step, or for other optimizers."""
        if self.slab is None:
            self.slab = self._stack_state()
        if not self.slab:
            return None
        exp_avgs, exp_avg_sqs, step = self.slab
        adam = []
        for opt in self.optimizers:
            g = opt.param_groups[0]
            adam += [g["lr"], *g["betas"], g["weight_decay"], g["eps"], bool(g.get("decoupled_weight_decay")),
                     g["maximize"]]
        return [self.flat_params, self.flat_grads, exp_avgs, exp_avg_sqs, step], [float(v) for v in adam]

    def step(self, stack: Stack) -> None:
        if self.slab is None:
            self.slab = self._stack_state()
        if not self.slab:
            for k, opt in enumerate(self.optimizers):
                for p, g in zip(self.params[k], self.grads[k]):
                    p.grad = g
                opt.step()
                for p in self.params[k]:
                    p.grad = None
            return
        exp_avgs, exp_avg_sqs, step = self.slab
        step.add_(1)
        groups = [opt.param_groups[0] for opt in self.optimizers]
        keys = [(g["lr"], tuple(g["betas"]), g["eps"], g["weight_decay"], g.get("decoupled_weight_decay", False),
                 g["maximize"]) for g in groups]
        n, a = len(groups), 0
        while a < n:  # runs of adjacent jobs with the same hyperparameters: one kernel call each
            b = a + 1
            while b < n and keys[b] == keys[a]:
                b += 1
            tensors = self.runs.get((a, b))
            if tensors is None:  # the ranges of this run of jobs, kept until the stack changes
                tensors = self.runs[a, b] = [[flat[a * self.per_job:b * self.per_job]] for flat in (
                    self.flat_params, self.flat_grads, exp_avgs, exp_avg_sqs)]
            fused_adam_(*tensors, [step], groups[a])
            a = b

    def state_dict(self, k: int, kernels: set[int]) -> dict:
        """Job k's optimizer state as a normal run saves it: kernel-shaped tensors back to (out, in), copies."""
        state = self.optimizers[k].state_dict()
        copied = {}
        for i, entry in state["state"].items():
            copied[i] = {name: (v.t().contiguous() if i in kernels and torch.is_tensor(v) and v.dim() == 2
                                else v.clone() if torch.is_tensor(v) else v) for name, v in entry.items()}
        return {"state": copied, "param_groups": [dict(g) for g in state["param_groups"]]}


def _set_lr(jobs: list[Job], optimizers, schedules, step: int) -> None:
    for job, opt in zip(jobs, optimizers):
        schedule = schedules[job.index]
        lr = schedule.lr(step)
        for group in opt.param_groups:
            group["lr"] = lr
        momentum = schedule.momentum(step)
        if momentum is not None:
            set_momentum(opt, momentum)
        job.lr = lr


@torch.no_grad()
def _evaluate(stack: Stack, x: torch.Tensor, y: torch.Tensor, autocast, chunk: int = 8192):
    """Mean cross-entropy and accuracy of every job over a split: two lists, read from the device once."""
    n_jobs = len(stack.jobs)
    loss = torch.zeros(n_jobs, device=x.device)
    correct = torch.zeros(n_jobs, device=x.device, dtype=torch.long)
    for i in range(0, len(x), chunk):
        xb, yb = x[i:i + chunk], y[i:i + chunk]
        with autocast:
            logits = stack.predict(xb).float()
        targets = yb.expand(n_jobs, -1)
        loss += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                reduction="none").view(n_jobs, -1).sum(1)
        correct += (logits.argmax(-1) == targets).sum(1)
    n = max(len(x), 1)
    return [v / n for v in loss.tolist()], [v / n for v in correct.tolist()]


class _StateView:
    """What EarlyStopping.update needs of a model: state_dict(), here one job's slice of the stack."""

    def __init__(self, stack: Stack, k: int):
        self.stack, self.k = stack, k

    def state_dict(self):
        return self.stack.state_dict(self.k)


def train_group(cfgs: list[DictConfig], run_dirs: list[Path], loggers: list[logging.Logger] | None = None,
                progress: bool | None = None) -> list[dict]:
    """Train compatible jobs together; write every job's outputs into its run directory; return the summaries."""
    from dnnlab.ui import Progress

    for cfg in cfgs:
        validate.check(cfg)
        reason = why_not(cfg)
        if reason:
            raise ValueError(f"this job cannot be stacked: {reason}")
    if len({shape_key(c) for c in cfgs}) != 1:
        raise ValueError("these jobs differ in more than per-job settings; plan() them into groups first")
    loggers = loggers or [log] * len(cfgs)
    first = cfgs[0]
    t = first.trainer
    device = pick_device(t.device)
    memory.check_fits(first, device, len(first.data.classes or range(10)), copies=len(cfgs))
    threads = pick_stack_threads(t.threads, first, len(cfgs))
    torch.set_num_threads(threads)
    seed_everything(t.seed, t.deterministic)
    data = load(first.data, device)
    restrict(data, t)
    jobs = [Job(i, cfg, d, lg) for i, (cfg, d, lg) in enumerate(zip(cfgs, run_dirs, loggers))]
    log.info("data: %s from %s (%d train, %d val, %d test)", first.data.name, data.source,
             len(data.x_train), len(data.x_val), len(data.x_test))
    log.info("training a stack of %d jobs on %s with %d thread(s)", len(jobs), device, threads)

    # Each job's initial weights and generators, exactly as `dnnlab train` would draw them alone.
    models, drop_generators, shuffle_generators = [], [], []
    for job in jobs:
        torch.manual_seed(job.t.seed)
        models.append(build_mlp(job.cfg, data.n_classes).to(device))
        g = torch.Generator(device=device)
        g.set_state(torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device))
        drop_generators.append(g)
        shuffle_generators.append(torch.Generator(device=device).manual_seed(job.t.seed))
    n, bs = len(data.x_train), t.batch_size
    steps_per_epoch = math.ceil(n / bs) - (n % bs == 1 and n > 1)
    schedules = {job.index: build_schedule(job.cfg.schedule, job.cfg.optimizer.lr, job.t.epochs * steps_per_epoch,
                                           steps_per_epoch) for job in jobs}
    # The stack's order: jobs with the same optimizer settings and schedule side by side (one optimizer kernel each).
    order = sorted(jobs, key=lambda job: json.dumps(OmegaConf.to_container(job.cfg.optimizer, resolve=True)
                                                    | {"_schedule": OmegaConf.to_container(job.cfg.schedule,
                                                                                           resolve=True)},
                                                    sort_keys=True, default=str))
    # trainer.native: the C++ step where it computes what the autograd stack would (refused before any file)
    kernel = native_plan(first, models[0], device)
    stack = Stack(order, [models[job.index] for job in order], activation_fn(first), device,
                  kernel and (kernel.activation, kernel.act_args))
    kernels = {2 * i for i in range(stack.n_layers)}  # positions of the weight matrices in parameters()
    stepper = _Stepper(order, stack, device)
    rules = _Rules(order, device)
    dropout = _Dropout(order, [models[job.index] for job in order], [drop_generators[job.index] for job in order],
                       n_hidden=stack.n_layers - 1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if t.precision == "bf16" else nullcontext()
    check_every_step = device.type == "cpu"  # on CUDA the host reads the losses once per epoch

    # Files: the same writers as a normal run, between epochs as there (a writer thread would compete with the
    # training for the cores).
    env = environment(device)  # one process: every job's (it asks git and the installed packages)
    for job in jobs:
        job.recorder = Recorder(job.run_dir)
        write_json(job.run_dir / "environment.json", env)

    def save(job: Job, k: int, name: str, epoch: int, model_state: dict | None = None) -> None:
        """The job's checkpoint as `dnnlab train` writes it: its own network, optimizer and schedule state, and what
        a resumed run needs (its generators: dropout's as the global one, the shuffling one)."""
        drop, shuffle = drop_generators[job.index], shuffle_generators[job.index]
        rng = {"torch": drop.get_state() if device.type == "cpu" else torch.get_rng_state(),
               "generator": shuffle.get_state(), "cuda": [drop.get_state()] if device.type == "cuda" else []}
        state = {"model": model_state if model_state is not None else stack.state_dict(k),
                 "optimizer": stepper.state_dict(k, kernels), "schedule": schedules[job.index].state_dict(),
                 "epoch": epoch, "step": job.steps_done, "phase": 0, "phase_step": job.steps_done,
                 "phase_epochs": len(job.rows), "phases": [{"phase": "train", "lr": job.cfg.optimizer.lr,
                                                            "first_epoch": 1}],
                 "cache_seconds": 0.0, "rng": rng, "position": None, "config": job.config_text,
                 "classes": list(data.classes)}
        if hasattr(job.stopper, "state_dict"):
            state["stopper"] = job.stopper.state_dict()
        checkpoint.save(job.run_dir / "checkpoints" / name, state)

    def shrink(finished: set[int]) -> None:
        positions = [k for k, job in enumerate(stack.jobs) if job.index not in finished]
        for k, job in enumerate(stack.jobs):
            if job.index in finished:
                job.active, job.final_state = False, stack.state_dict(k)
        stack.keep(positions)
        stepper.keep(positions, stack.jobs, stack)
        dropout.keep(positions)
        nonlocal rules
        rules = _Rules(stack.jobs, device)

    # Only the C++ step's numbers do not depend on the thread count (batched products split by thread count
    # do): elsewhere, switching threads at moments set by the machine's load would make a run irreproducible.
    tuner = ThreadTuner(threads, steps_per_epoch) if t.threads == "auto" and threads > 1 and stack.kernel else None
    thread_log = []
    epochs = max(job.t.epochs for job in jobs)
    progress_on = t.progress if progress is None else progress
    step = 0
    try:
        with Progress(epochs, steps_per_epoch, enabled=progress_on) as bar:
            for epoch in range(1, epochs + 1):
                if not stack.jobs:
                    break
                start = time.perf_counter()
                perms = torch.stack([torch.randperm(n, device=device, generator=shuffle_generators[job.index])
                                     for job in stack.jobs])
                n_active = len(stack.jobs)
                loss_sum = torch.zeros(n_active, device=device)
                correct = torch.zeros(n_active, device=device, dtype=torch.long)
                for i in range(steps_per_epoch):
                    if tuner is not None:
                        tuner.before(i)
                    idx = perms[:, i * bs:(i + 1) * bs]
                    b = idx.shape[1]
                    _set_lr(stack.jobs, stepper.optimizers, schedules, step)
                    fits = stack.kernel and not rules.change_gradients and native.update_in_step()
                    update = stepper.fused() if fits else None
                    if stack.kernel:
                        losses = stack.native_step(data.x_train, data.y_train, idx, dropout, loss_sum, correct, update)
                    else:
                        x = stack.gather(data.x_train, idx)
                        y = data.y_train.index_select(0, idx.reshape(-1)).view(len(idx), b)
                        with autocast:
                            logits = stack.forward(x, dropout if dropout.any else None)
                        losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                 reduction="none").view(len(idx), b).mean(1)
                        losses.sum().backward()  # _Layer writes the gradients into stack.grad_w / grad_b
                        loss_sum += losses.detach() * b
                        correct += (logits.argmax(-1) == y).sum(1)
                    if update is None:
                        rules.before_step(stack)
                        stepper.step(stack)
                    rules.after_step(stack)
                    step += 1
                    if tuner is not None:
                        tuner.after(i)
                    if check_every_step and not (math.isfinite(sum(losses)) if stack.kernel
                                                 else bool(torch.isfinite(loss_sum).all())):
                        bad = [k for k, ok in enumerate(torch.isfinite(loss_sum).tolist()) if not ok]
                        values = losses if stack.kernel else losses.tolist()
                        finished = set()
                        for k in bad:
                            job = stack.jobs[k]
                            job.status = "diverged"
                            job.reason = f"epoch {len(job.rows) + 1}, step {i + 1 + (epoch - 1) * steps_per_epoch}" \
                                         f": loss is {values[k]}"
                            job.log.warning("diverged at %s; the stack goes on without it", job.reason)
                            finished.add(job.index)
                        keep = [k for k in range(len(stack.jobs)) if k not in bad]
                        perms, loss_sum, correct = perms[keep], loss_sum[keep], correct[keep]
                        shrink(finished)
                        if not stack.jobs:
                            break
                    if i % 50 == 0:
                        bar.step(i)
                if not stack.jobs:
                    break
                seen = min(n, steps_per_epoch * bs)
                train_losses = [v / seen for v in loss_sum.tolist()]
                train_accs = [v / seen for v in correct.tolist()]
                if tuner is not None:
                    thread_log.append(tuner.current)
                    tuner.settle()
                val_losses, val_accs = _evaluate(stack, data.x_val, data.y_val, autocast)
                seconds = time.perf_counter() - start
                finished = set()
                for k, job in enumerate(stack.jobs):
                    if not math.isfinite(train_losses[k]):  # on CUDA: found once per epoch
                        job.status = "diverged"
                        job.reason = f"epoch {len(job.rows) + 1}, step {epoch * steps_per_epoch}: mean training " \
                                     f"loss is {train_losses[k]}"
                        finished.add(job.index)
                        continue
                    job.steps_done += steps_per_epoch
                    row = {"epoch": len(job.rows) + 1, "train_loss": train_losses[k], "train_acc": train_accs[k],
                           "val_loss": val_losses[k], "val_acc": val_accs[k], "lr": job.lr, "seconds": seconds}
                    job.rows.append(row)
                    job.recorder.log_epoch(row)
                    job.recorder.log_lr(schedules[job.index].lr, job.steps_done - steps_per_epoch, job.steps_done)
                    schedules[job.index].end_epoch(row["val_loss"])
                    model_state = stack.state_dict(k)
                    if job.stopper.update(row, _StateView(stack, k)):
                        save(job, k, "best.pt", row["epoch"], model_state)
                    if job.t.checkpoint_every and row["epoch"] % job.t.checkpoint_every == 0:
                        save(job, k, f"epoch_{row['epoch']}.pt", row["epoch"], model_state)
                        checkpoint.keep_newest_periodic(job.run_dir / "checkpoints", job.t.get("keep_checkpoints"))
                    save(job, k, "last.pt", row["epoch"], model_state)  # last: see train.train
                    if job.stopper.should_stop or len(job.rows) >= job.t.epochs:
                        finished.add(job.index)
                bar.epoch({"epoch": epoch, "train_loss": min(train_losses), "train_acc": max(train_accs),
                           "val_loss": min(val_losses), "val_acc": max(val_accs)})
                if finished:
                    shrink(finished)
    finally:
        for job in jobs:
            job.recorder.close()

    threads = torch.get_num_threads()
    if thread_log:
        log.info("threads per epoch (all cores or one, the faster at the time): %s", thread_log)
    how = "stacked native" if stack.kernel else "stacked autograd"
    curves = LearningCurves()  # one figure for every job's plot
    try:
        summaries = [_finish(job, model, data, device, threads, len(jobs), autocast, how, curves, steps_per_epoch)
                     for job, model in zip(jobs, models)]
    finally:
        curves.close()
    print_group(summaries, [job.run_dir for job in jobs])
    return summaries


def print_group(summaries: list[dict], run_dirs: list[Path]) -> None:
    """One table for the whole stack (a normal run prints one per job)."""
    from rich.table import Table

    from dnnlab.ui import _fmt, console

    parents = {str(Path(d).parent) for d in run_dirs}
    where = f" in {parents.pop()}" if len(parents) == 1 else ""
    table = Table(title=f"dnnlab stack of {len(summaries)} jobs{where}", title_justify="left")
    columns = ("status", "epochs", "best_epoch", "val_acc", "val_loss", "test_acc", "seconds_per_epoch")
    for c in ("run",) + columns:
        table.add_column(c, justify="left" if c == "run" else "right")
    for summary, run_dir in zip(summaries, run_dirs):
        name = Path(run_dir).name if where else str(run_dir)
        table.add_row(name, *(_fmt(summary.get(c)) if summary.get(c) is not None else "" for c in columns))
    console.print(table)


def _finish(job: Job, model: nn.Module, data, device, threads: int, n_jobs: int, autocast, how: str,
            curves: LearningCurves, steps_per_epoch: int) -> dict:
    """The job's test evaluation (its own network, best weights restored) and summary, as `dnnlab train` does."""
    t, stopper, rows = job.t, job.stopper, job.rows
    if stopper.restores and stopper.best_state is not None:
        stopper.restore(model)
    elif job.final_state is not None:  # the weights the job ended with
        model.load_state_dict(job.final_state)
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test, autocast) if job.status != "diverged" \
        else (math.nan, math.nan)
    if job.status == "completed" and rows:
        checkpoint.mark_final(job.run_dir / "checkpoints", stopper.final_checkpoint)
    summary = {
        "status": job.status, "reason": job.reason, "epochs": len(rows), "stopped_early": stopper.should_stop,
        **epoch_metrics(rows, stopper), "test_acc": test_acc, "test_loss": test_loss,
        "train_seconds": sum(r["seconds"] for r in rows),
        "seconds_per_epoch": statistics.median(r["seconds"] for r in rows) if rows else None,
        "n_params": sum(p.numel() for p in model.parameters()), "device": str(device),
        "threads": threads, "update_threads": threads, "seed": t.seed, "classes": list(data.classes),
        "n_train": len(data.x_train), "n_val": len(data.x_val), "n_test": len(data.x_test),
        "data_source": data.source, "steps": job.steps_done,
        "phases": [{"phase": "train", "lr": job.cfg.optimizer.lr, "first_epoch": 1, "epochs": len(rows),
                    "training_step": how}],
        "resumed": False, "training_step": how, "stacked": {"jobs": n_jobs, "position": job.index},
    }
    write_json(job.run_dir / "summary.json", summary)
    if rows:
        job.recorder.plot(rows, job.cfg, steps_per_epoch, summary["best_epoch"], curves)
    return summary
