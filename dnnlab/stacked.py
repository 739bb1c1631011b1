"""Stacked sweeps: jobs that share the network's shape train together, as one batched network (dnnlab.stack), each
job keeping what it would have alone — its initial weights, data order, dropout masks, optimizer, schedule,
penalties, clipping, max-norm, early stopping and checkpoints — and getting the run directory `dnnlab train` writes,
through the same functions. docs/design.md ("The stacked launcher") tells the design: what stays per job, the
step (the C++ stack step on the CPU, one `torch.baddbmm` per layer under autograd elsewhere), threads, and how
far a job's metrics drift from the job trained alone. `plan()` tells the jobs that can be stacked from those that
run one at a time through the normal trainer."""
from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dnnlab import activations, checkpoint, hparams, memory, validate
from dnnlab.bookkeeping import checkpoint_state, end_epoch, evaluate, steps_per_epoch, summary_fields
from dnnlab.data import load
from dnnlab.model import build_mlp
from dnnlab.prepare import pick_device, pick_threads, restrict, seed_everything
from dnnlab.record import LearningCurves, Recorder, environment, write_json
from dnnlab.schedule import build_schedule
from dnnlab.stack import (Dropout, Job, Stack, StateView, Stepper, activation_fn, evaluate_stack, job_rules,
                          set_lr)
from dnnlab import fast
from dnnlab.fast import native
from dnnlab.fast.threads import ThreadTuner

log = logging.getLogger("dnnlab")

# Config groups a job may set freely within a stack; every other key must be equal across the stack.
PER_JOB_GROUPS = ("init", "optimizer", "schedule", "regularizer")
PER_JOB_TRAINER_KEYS = ("seed", "epochs", "early_stopping", "checkpoint_every", "keep_checkpoints", "progress",
                        "clip_value", "clip_norm")
KNOWN_GROUPS = {"data", "model", "init", "activation", "norm", "optimizer", "schedule", "regularizer", "transfer",
                "trainer"}
UNSTACKABLE_ACTIVATIONS = activations.unstackable()


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


# ------------------------------------------------------------------------------------------------- the stacked net

def check_group(cfgs: list[DictConfig]) -> None:
    for cfg in cfgs:
        validate.check(cfg)
        reason = why_not(cfg)
        if reason:
            raise ValueError(f"this job cannot be stacked: {reason}")
    if len({shape_key(c) for c in cfgs}) != 1:
        raise ValueError("these jobs differ in more than per-job settings; plan() them into groups first")


class _Group:
    """A stack of jobs being trained: the data, each job's network, generators and schedule as `dnnlab train`
    would draw them alone, and the stack's shared step (optimizers, rules, dropout)."""

    def __init__(self, cfgs: list[DictConfig], run_dirs: list[Path], loggers: list[logging.Logger]):
        first = cfgs[0]
        t = first.trainer
        self.device = device = pick_device(t.device)
        memory.check_fits(first, device, len(first.data.classes or range(10)), copies=len(cfgs))
        self.threads = pick_threads(t.threads, first, stacked=len(cfgs))
        torch.set_num_threads(self.threads)
        seed_everything(t.seed, t.deterministic)
        self.data = data = load(first.data, device)
        restrict(data, t)
        self.jobs = [Job(i, cfg, d, lg) for i, (cfg, d, lg) in enumerate(zip(cfgs, run_dirs, loggers))]
        log.info("data: %s from %s (%d train, %d val, %d test)", first.data.name, data.source,
                 len(data.x_train), len(data.x_val), len(data.x_test))
        log.info("training a stack of %d jobs on %s with %d thread(s)", len(self.jobs), device, self.threads)
        self._draw_jobs()
        self.batch_size, self.steps_per_epoch = t.batch_size, steps_per_epoch(len(data.x_train), t.batch_size)
        self.schedules = {job.index: build_schedule(job.cfg.schedule, job.cfg.optimizer.lr,
                                                    job.t.epochs * self.steps_per_epoch, self.steps_per_epoch)
                          for job in self.jobs}
        self._build_stack(first)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if t.precision == "bf16" else nullcontext()
        # Only the C++ step's numbers do not depend on the thread count (batched products split by thread count
        # do): elsewhere, switching threads at moments set by the machine's load would make a run irreproducible.
        self.tuner = ThreadTuner(self.threads, self.steps_per_epoch) \
            if t.threads == "auto" and self.threads > 1 and self.stack.kernel else None
        self.thread_log, self.step = [], 0
        # Files: the same writers as a normal run, between epochs as there (a writer thread would compete with the
        # training for the cores).
        env = environment(device)  # one process: every job's (it asks git and the installed packages)
        for job in self.jobs:
            job.recorder = Recorder(job.run_dir)
            write_json(job.run_dir / "environment.json", env)

    def _draw_jobs(self) -> None:
        """Each job's initial weights and generators, exactly as `dnnlab train` would draw them alone."""
        self.models, self.drop_generators, self.shuffle_generators = [], [], []
        for job in self.jobs:
            torch.manual_seed(job.t.seed)
            self.models.append(build_mlp(job.cfg, self.data.n_classes).to(self.device))
            g = torch.Generator(device=self.device)
            g.set_state(torch.get_rng_state() if self.device.type == "cpu" else torch.cuda.get_rng_state(self.device))
            self.drop_generators.append(g)
            self.shuffle_generators.append(torch.Generator(device=self.device).manual_seed(job.t.seed))

    def _build_stack(self, first: DictConfig) -> None:
        # The stack's order: jobs with the same optimizer settings and schedule side by side (one optimizer kernel
        # each).
        order = sorted(self.jobs, key=lambda job: json.dumps(
            OmegaConf.to_container(job.cfg.optimizer, resolve=True)
            | {"_schedule": OmegaConf.to_container(job.cfg.schedule, resolve=True)}, sort_keys=True, default=str))
        # trainer.native: the C++ step where it computes what the autograd stack would (refused before any file)
        kernel = fast.native_plan(first, self.models[0], self.device)
        self.stack = Stack(order, [self.models[job.index] for job in order], activation_fn(first), self.device,
                           kernel and (kernel.activation, kernel.act_args))
        self.kernels = {2 * i for i in range(self.stack.n_layers)}  # positions of the weight matrices in parameters()
        self.stepper = Stepper(order, self.stack, self.device)
        self.rules = job_rules(order)
        self.dropout = Dropout(order, [self.drop_generators[job.index] for job in order],
                               n_hidden=self.stack.n_layers - 1)

    def save(self, job: Job, k: int, name: str, epoch: int, model_state: dict) -> None:
        """The job's checkpoint as `dnnlab train` writes it: its own network, optimizer and schedule state, and what
        a resumed run needs (its generators: dropout's as the global one, the shuffling one)."""
        drop, shuffle, device = self.drop_generators[job.index], self.shuffle_generators[job.index], self.device
        rng = {"torch": drop.get_state() if device.type == "cpu" else torch.get_rng_state(),
               "generator": shuffle.get_state(), "cuda": [drop.get_state()] if device.type == "cuda" else []}
        checkpoint.save(job.run_dir / "checkpoints" / name, checkpoint_state(
            model=model_state, optimizer=self.stepper.state_dict(k, self.kernels),
            schedule=self.schedules[job.index].state_dict(), epoch=epoch, step=job.steps_done, phase=0,
            phase_step=job.steps_done, phase_epochs=len(job.rows),
            phases=[{"phase": "train", "lr": job.cfg.optimizer.lr, "first_epoch": 1}], cache_seconds=0.0,
            stopper=job.stopper, rng=rng, position=None, config=job.config_text, classes=self.data.classes))

    def shrink(self, finished: set[int]) -> None:
        """The stack without the finished jobs (their weights kept for the test evaluation)."""
        positions = [k for k, job in enumerate(self.stack.jobs) if job.index not in finished]
        for k, job in enumerate(self.stack.jobs):
            if job.index in finished:
                job.active, job.final_state = False, self.stack.state_dict(k)
        self.stack.keep(positions)
        self.stepper.keep(positions, self.stack.jobs, self.stack)
        self.dropout.keep(positions)
        self.rules = job_rules(self.stack.jobs)

    def train_step(self, idx: torch.Tensor, loss_sum: torch.Tensor, correct: torch.Tensor):
        """One step of every job in the stack: their losses (a list from the C++ step, else a tensor)."""
        stack, data = self.stack, self.data
        set_lr(stack.jobs, self.stepper.optimizers, self.schedules, self.step)
        fits = stack.kernel and not any(r.change_gradients for r in self.rules) and native.update_in_step()
        update = self.stepper.fused() if fits else None
        if stack.kernel:
            losses = stack.native_step(data.x_train, data.y_train, idx, self.dropout, loss_sum, correct, update)
        else:
            b = idx.shape[1]
            x = stack.gather(data.x_train, idx)
            y = data.y_train.index_select(0, idx.reshape(-1)).view(len(idx), b)
            with self.autocast:
                logits = stack.forward(x, self.dropout if self.dropout.any else None)
            losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                     reduction="none").view(len(idx), b).mean(1)
            losses.sum().backward()  # _Layer writes the gradients into stack.grad_w / grad_b
            loss_sum += losses.detach() * b
            correct += (logits.argmax(-1) == y).sum(1)
        if update is None:
            self.stack.apply_rules(self.rules)
            self.stepper.step(self.stack)
        self.stack.apply_rules(self.rules, after=True)
        self.step += 1
        return losses

    def drop_diverged(self, losses, loss_sum: torch.Tensor, epoch: int, i: int) -> list[int] | None:
        """After a step on the CPU: the jobs whose loss stopped being finite leave the stack, which goes on; the
        positions of those that stay, or None when all are finite."""
        if math.isfinite(sum(losses)) if self.stack.kernel else bool(torch.isfinite(loss_sum).all()):
            return None
        bad = [k for k, ok in enumerate(torch.isfinite(loss_sum).tolist()) if not ok]
        values = losses if self.stack.kernel else losses.tolist()
        for k in bad:
            job = self.stack.jobs[k]
            job.status = "diverged"
            job.reason = f"epoch {len(job.rows) + 1}, step {i + 1 + (epoch - 1) * self.steps_per_epoch}: loss is " \
                         f"{values[k]}"
            job.log.warning("diverged at %s; the stack goes on without it", job.reason)
        keep = [k for k in range(len(self.stack.jobs)) if k not in bad]
        self.shrink({self.stack.jobs[k].index for k in bad})
        return keep

    def train_epoch(self, epoch: int, bar) -> tuple[list[float], list[float]] | None:
        """One pass of every job over its own order of the training split: their mean losses and accuracies (None
        when no job is left)."""
        n, bs, device = len(self.data.x_train), self.batch_size, self.device
        perms = torch.stack([torch.randperm(n, device=device, generator=self.shuffle_generators[job.index])
                             for job in self.stack.jobs])
        loss_sum = torch.zeros(len(self.stack.jobs), device=device)
        correct = torch.zeros(len(self.stack.jobs), device=device, dtype=torch.long)
        for i in range(self.steps_per_epoch):
            if self.tuner is not None:
                self.tuner.before(i)
            losses = self.train_step(perms[:, i * bs:(i + 1) * bs], loss_sum, correct)
            if self.tuner is not None:
                self.tuner.after(i)
            if device.type == "cpu":  # on CUDA the host reads the losses once per epoch
                keep = self.drop_diverged(losses, loss_sum, epoch, i)
                if keep is not None:
                    perms, loss_sum, correct = perms[keep], loss_sum[keep], correct[keep]
                    if not self.stack.jobs:
                        return None
            if i % 50 == 0:
                bar.step(i)
        seen = min(n, self.steps_per_epoch * bs)
        return [v / seen for v in loss_sum.tolist()], [v / seen for v in correct.tolist()]

    def end_epoch(self, epoch: int, train: tuple[list[float], list[float]], seconds_from: float, bar) -> None:
        """Each job's validation, row, checkpoints and early stopping, as `dnnlab train` keeps them; the jobs that
        finished (or diverged, found here on CUDA) leave the stack."""
        train_losses, train_accs = train
        if self.tuner is not None:
            self.thread_log.append(self.tuner.current)
            self.tuner.settle()
        val_losses, val_accs = evaluate_stack(self.stack, self.data.x_val, self.data.y_val, self.autocast)
        seconds = time.perf_counter() - seconds_from
        spe, finished = self.steps_per_epoch, set()
        for k, job in enumerate(self.stack.jobs):
            if not math.isfinite(train_losses[k]):  # on CUDA: found once per epoch
                job.status = "diverged"
                job.reason = f"epoch {len(job.rows) + 1}, step {epoch * spe}: mean training loss is {train_losses[k]}"
                finished.add(job.index)
                continue
            job.steps_done += spe
            row = {"epoch": len(job.rows) + 1, "train_loss": train_losses[k], "train_acc": train_accs[k],
                   "val_loss": val_losses[k], "val_acc": val_accs[k], "lr": job.lr, "seconds": seconds}
            state = self.stack.state_dict(k)
            end_epoch(row, job.rows, job.recorder, self.schedules[job.index], (job.steps_done - spe, job.steps_done),
                      job.stopper, StateView(self.stack, k),
                      lambda name, job=job, k=k, epoch=row["epoch"], state=state: self.save(job, k, name, epoch, state),
                      job.t, job.run_dir)
            if job.stopper.should_stop or len(job.rows) >= job.t.epochs:
                finished.add(job.index)
        bar.epoch({"epoch": epoch, "train_loss": min(train_losses), "train_acc": max(train_accs),
                   "val_loss": min(val_losses), "val_acc": max(val_accs)})
        if finished:
            self.shrink(finished)

    def finish(self) -> list[dict]:
        """Every job's test evaluation and summary; one table for the stack."""
        threads = torch.get_num_threads()
        if self.thread_log:
            log.info("threads per epoch (all cores or one, the faster at the time): %s", self.thread_log)
        how = "stacked native" if self.stack.kernel else "stacked autograd"
        curves = LearningCurves()  # one figure for every job's plot
        try:
            summaries = [_finish(job, model, self.data, self.device, threads, len(self.jobs), self.autocast, how,
                                 curves, self.steps_per_epoch) for job, model in zip(self.jobs, self.models)]
        finally:
            curves.close()
        print_group(summaries, [job.run_dir for job in self.jobs])
        return summaries


def train_group(cfgs: list[DictConfig], run_dirs: list[Path], loggers: list[logging.Logger] | None = None,
                progress: bool | None = None) -> list[dict]:
    """Train compatible jobs together; write every job's outputs into its run directory; return the summaries."""
    from dnnlab.ui import Progress

    check_group(cfgs)
    group = _Group(cfgs, run_dirs, loggers or [log] * len(cfgs))
    epochs = max(job.t.epochs for job in group.jobs)
    t = cfgs[0].trainer
    try:
        with Progress(epochs, group.steps_per_epoch, enabled=t.progress if progress is None else progress) as bar:
            for epoch in range(1, epochs + 1):
                if not group.stack.jobs:
                    break
                start = time.perf_counter()
                train = group.train_epoch(epoch, bar)
                if train is None:
                    break
                group.end_epoch(epoch, train, start, bar)
    finally:
        for job in group.jobs:
            job.recorder.close()
    return group.finish()


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
        **summary_fields(job.status, job.reason, rows, stopper, (test_loss, test_acc), model, device, data, t.seed),
        "threads": threads, "update_threads": threads, "steps": job.steps_done,
        "phases": [{"phase": "train", "lr": job.cfg.optimizer.lr, "first_epoch": 1, "epochs": len(rows),
                    "training_step": how}],
        "resumed": False, "training_step": how, "stacked": {"jobs": n_jobs, "position": job.index},
    }
    write_json(job.run_dir / "summary.json", summary)
    hparams.write(job.cfg, job.run_dir, summary)  # as `dnnlab train` writes it: the job's row in the HParams table
    if rows:
        job.recorder.plot(rows, job.cfg, steps_per_epoch, summary["best_epoch"], curves)
    return summary
