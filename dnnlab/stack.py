"""The stacked network: J jobs' MLPs of one shape as batched tensors (jobs x fan_in x fan_out), trained by one step
for all of them, with each job's own optimizer, schedule, penalties, clipping, max-norm and dropout (dnnlab.stacked
explains the design and trains groups of jobs with it)."""
from __future__ import annotations

import itertools
import logging
import operator
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dnnlab import activations
from dnnlab.bookkeeping import EarlyStopping
from dnnlab.components import make
from dnnlab.model import dropout_rates
from dnnlab.fast.flat_adam import adam_settings, fusable, fused_adam_
from dnnlab.optim import JobRules, build_optimizer, set_rates

SELU_ALPHA, SELU_SCALE = activations.SELU  # torch.nn.SELU's (Klambauer et al.)


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
        self.batch, self.rule_views = None, None

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

    def apply_rules(self, rules: list[JobRules], after: bool = False) -> None:
        """Each job's rules (in the stack's order) on its own slices: before_step on its gradients, or (after the
        update) after_step on its hidden kernels, whose columns hold a neuron's incoming weights here."""
        if not any(r.max_norm is not None if after else r.change_gradients for r in rules):
            return
        if self.rule_views is None:  # views of the stack's buffers: valid until the stack changes (_buffers)
            self.rule_views = ([w.detach().unbind(0) for w in self.weights], [g.unbind(0) for g in self.grad_w],
                               self.job_grads())
        kernels, kernel_grads, grads = self.rule_views
        for k, r in enumerate(rules):
            if after:
                r.after_step([w[k] for w in kernels[:-1]], neuron_dim=1)
            elif r.change_gradients:
                r.before_step([w[k] for w in kernels], [g[k] for g in kernel_grads], grads[k])

    def native_step(self, x_all: torch.Tensor, y_all: torch.Tensor, idx: torch.Tensor, dropout: Dropout,
                    loss_sum: torch.Tensor, correct: torch.Tensor, update: tuple[list, list] | None = None
                    ) -> list[float]:
        """Every job's forward pass, loss and backward pass in one C++ call (dnnlab::stack_step, see
        dnnlab/fast/native.py), the gradients written into grad_w / grad_b, the jobs spread over the threads; with
        `update` (Stepper.fused), each job's Adam update too. Adds the jobs' summed losses and hits to loss_sum
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

def job_rules(jobs: list[Job]) -> list[JobRules]:
    """Each job's own L1/L2, clipping and max-norm, in the stack's order (rebuilt when the stack shrinks)."""
    return [JobRules(j.cfg.regularizer, j.t) for j in jobs]


class Dropout:
    """Per-job dropout masks at each position (0: the inputs, i: after hidden layer i), from per-job generators."""

    def __init__(self, jobs: list[Job], generators, n_hidden: int):
        self.rates = [dropout_rates(job.cfg.regularizer, n_hidden) for job in jobs]  # rates[k][position]
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


class Stepper:
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
        adam = [v for opt in self.optimizers for v in adam_settings(opt.param_groups[0])]
        return [self.flat_params, self.flat_grads, exp_avgs, exp_avg_sqs, step], adam

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
        keys = [adam_settings(g) for g in groups]
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


def set_lr(jobs: list[Job], optimizers, schedules, step: int) -> None:
    for job, opt in zip(jobs, optimizers):
        job.lr = set_rates(opt, schedules[job.index], step)


@torch.no_grad()
def evaluate_stack(stack: Stack, x: torch.Tensor, y: torch.Tensor, autocast, chunk: int = 8192):
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


class StateView:
    """What EarlyStopping.update needs of a model: state_dict(), here one job's slice of the stack."""

    def __init__(self, stack: Stack, k: int):
        self.stack, self.k = stack, k

    def state_dict(self):
        return self.stack.state_dict(self.k)
