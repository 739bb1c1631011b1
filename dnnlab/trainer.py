"""One run of `dnnlab train`, top to bottom: `train` starts the run (or finds where it stopped), trains each phase's
epochs, then tests and writes the summary. The step inside an epoch is chosen once: the C++ step or autograd."""
from __future__ import annotations

import logging
import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dnnlab import checkpoint, hparams, hydra_files, stored, transfer
from dnnlab.bookkeeping import (Diverged, EarlyStopping, checkpoint_state, end_epoch, evaluate, steps_per_epoch,
                                summary_fields)
from dnnlab.data import Splits
from dnnlab.diagnostics import Diagnostics
from dnnlab.errors import DnnlabError, Pruned
from dnnlab import fast
from dnnlab.fast import native
from dnnlab.optim import GradientRules, build_optimizer, set_rates
from dnnlab.prepare import core_share, prepare
from dnnlab.record import Recorder, environment, read_metrics, write_json
from dnnlab.schedule import build_schedule
from dnnlab.steps import choose_step
from dnnlab.fast.threads import ThreadTuner
from dnnlab.ui import Progress, print_summary

log = logging.getLogger("dnnlab")


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the step under way finished. `position` is where the epoch stopped."""

    def __init__(self, position: dict):
        super().__init__("interrupted")
        self.position = position


def train_epoch(net, x_all, y_all, steps: int, batch_size: int, optimizer, rules, schedule, step: int, generator,
                autocast, progress, stop: threading.Event, position: dict | None = None, diag=None, offset: int = 0,
                native_plan: native.Plan | None = None, tuner: ThreadTuner | None = None
                ) -> tuple[float, float, int, float]:
    """One pass over the training split in a seeded random order: (mean loss, accuracy, phase step, last lr).
    Loss and accuracy accumulate on the device. On the CPU every step checks that the loss is finite (it costs
    nothing there); on a GPU the host reads them once, at the end of the epoch, and never waits within it: a count
    of finite losses, kept on the device, then tells the step where the loss stopped being finite (non-finite
    weights keep it so).
    `position` continues an epoch that a signal interrupted (its order, steps done and sums so far); `diag` (at the
    run's step `offset + step`: earlier phases' steps come first), `native_plan` and `tuner` choose the step, once
    an epoch (steps.choose_step)."""
    device = x_all.device
    check_every_step = device.type == "cpu"
    if position is None:
        position = {"perm": torch.randperm(len(x_all), device=device, generator=generator), "i": 0,
                    "loss_sum": torch.zeros((), device=device),
                    "correct": torch.zeros((), device=device, dtype=torch.long), "lr": schedule.lr(step)}
    perm, loss_sum, correct, lr = position["perm"], position["loss_sum"], position["correct"], position["lr"]
    finite = position.setdefault("finite", torch.zeros((), device=device, dtype=torch.long))
    first_step = step - position["i"]
    net.train()
    take_step = choose_step(net, x_all, y_all, optimizer, rules, autocast=autocast, diag=diag, offset=offset,
                            plan=native_plan, tuner=tuner, sums=(loss_sum, correct))
    for i in range(position["i"], steps):
        lr = set_rates(optimizer, schedule, step)
        loss = take_step(perm[i * batch_size:(i + 1) * batch_size], step)
        step += 1
        if check_every_step:  # the sum too: finite losses whose sum overflows are no finite training either
            if not (math.isfinite(loss) and math.isfinite(loss_sum)):
                raise Diverged(f"step {step}: loss is {float(loss)}")
        else:
            finite += torch.isfinite(loss)
        if i % 50 == 0:
            progress.step(i)
        if stop.is_set():
            raise Interrupted({"perm": perm, "i": i + 1, "loss_sum": loss_sum, "correct": correct, "lr": lr,
                               "step": step, "finite": finite})
    n = min(len(x_all), steps * batch_size)
    mean_loss = loss_sum.item() / n
    if not math.isfinite(mean_loss):  # on a GPU: found now, at the step after the last finite loss
        raise Diverged(f"step {first_step + finite.item() + 1}: loss is not finite (mean training loss {mean_loss})")
    return mean_loss, correct.item() / n, step, lr


@contextmanager
def stop_on_signals():
    """SIGINT/SIGTERM set an event instead of killing the process, so the step under way can finish and a
    checkpoint can be written (signal handlers exist only in the main thread; elsewhere nothing changes)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def phases(cfg: DictConfig) -> list[tuple[str, float, int]]:
    """(name, learning rate, epochs) of each training phase: one, or two when reused layers are unfrozen."""
    lr, epochs, tr = cfg.optimizer.lr, cfg.trainer.epochs, cfg.transfer
    if not (tr.source and tr.unfreeze_top != 0):
        return [("train", lr, epochs)]
    return [("train", lr, tr.frozen_epochs or epochs), (f"unfreeze {tr.unfreeze_top}", lr * tr.unfreeze_lr_factor, epochs)]


def rng_state(generator: torch.Generator) -> dict:
    """Every random generator a run draws from: the global ones (init, dropout, RReLU) and the shuffling one."""
    return {"torch": torch.get_rng_state(), "generator": generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


# trainer keys that may differ between a run and its resumption: they change what is shown or kept, not a number
# (keep_checkpoints is also absent from the checkpoints of earlier versions)
RESUMABLE_CHANGES = ("resume", "progress", "keep_checkpoints")


def comparable(cfg: DictConfig) -> dict:
    """The config without the keys that may change between an interrupted run and its resumption."""
    data = OmegaConf.to_container(cfg, resolve=True)
    if isinstance(data.get("trainer"), dict):
        data["trainer"] = {k: v for k, v in data["trainer"].items() if k not in RESUMABLE_CHANGES}
    return data


def resume_point(run_dir: Path, t: DictConfig, config_text: str) -> dict | None:
    """The last checkpoint of this same run, when resuming (asked for, or a run directory reused), else None."""
    last = run_dir / "checkpoints" / "last.pt"
    if not last.exists():
        if t.resume:
            log.warning("trainer.resume=true but %s does not exist: starting from scratch", last)
        return None
    state = checkpoint.load(last)
    if comparable(stored.checkpoint_config(state, str(last))) != comparable(OmegaConf.create(config_text)):
        raise DnnlabError(f"{run_dir} holds a run with a different config; resume it with the same overrides or "
                          "choose another hydra.run.dir (nothing was changed)")
    log.info("resuming from %s (epoch %d)", last, state["epoch"])
    return state


@dataclass
class Run:
    """One run between its phases and epochs: what it was given, what it keeps, and the current phase's state
    (what a checkpoint holds)."""
    cfg: DictConfig
    run_dir: Path
    parallel_jobs: int
    device: torch.device
    data: Splits
    model: torch.nn.Module
    reused: dict | None
    steps_per_epoch: int
    autocast: object
    config_text: str
    resume: dict | None
    recorder: Recorder
    rows: list[dict]
    generator: torch.Generator
    diag: Diagnostics | None
    report: object
    stopper: EarlyStopping
    step: int = 0  # the steps of the phases before the current one
    cache_seconds: float = 0.0
    phase_log: list[dict] = field(default_factory=list)
    phase: int = 0
    phase_step: int = 0
    phase_epochs: int = 0
    optimizer: object = None
    schedule: object = None
    tuner: ThreadTuner | None = None

    def save(self, name: str, position: dict | None = None) -> None:
        """Everything needed to continue exactly from here (the end of an epoch, or `position` within one)."""
        checkpoint.save(self.run_dir / "checkpoints" / name, checkpoint_state(
            model=self.model.state_dict(), optimizer=self.optimizer.state_dict(), schedule=self.schedule.state_dict(),
            epoch=len(self.rows), step=self.step + self.phase_step, phase=self.phase, phase_step=self.phase_step,
            phase_epochs=self.phase_epochs, phases=self.phase_log, cache_seconds=self.cache_seconds,
            stopper=self.stopper, rng=rng_state(self.generator), position=position, config=self.config_text,
            classes=self.data.classes))


def warn_about(cfg: DictConfig) -> None:
    """Combinations that run but undo what one of their parts is for."""
    if cfg.activation._target_ == "torch.nn.SELU" and cfg.norm.kind in ("batch", "layer"):
        log.warning("SELU normalises itself; norm=%s between its layers breaks that (the book uses neither with the "
                    "other)", OmegaConf.select(cfg, "norm.kind"))
    if cfg.regularizer.get("alpha_dropout") and cfg.activation._target_ != "torch.nn.SELU":
        log.warning("alpha_dropout keeps SELU's self-normalisation; with %s plain dropout is the usual choice",
                    cfg.activation._target_.rsplit(".", 1)[-1])


def start(cfg: DictConfig, run_dir: Path, parallel_jobs: int) -> Run:
    """Everything checked before a file is written, then the run's folder started (or its last checkpoint found)."""
    device, data, model = prepare(cfg, parallel_jobs)
    t = cfg.trainer
    if t.native is True:  # where it cannot be: refused before anything is written (auto builds only when it trains)
        fast.native_plan(cfg, model, device)
    warn_about(cfg)
    log.info("data: %s from %s (%d train, %d val, %d test)", cfg.data.name, data.source,
             len(data.x_train), len(data.x_val), len(data.x_test))
    reused = transfer.reuse(model, cfg) if cfg.transfer.source else None
    config_text = OmegaConf.to_yaml(cfg, resolve=True)
    checkpoint.remove_stale_temporaries(run_dir / "checkpoints")  # a killed writer's half-written files
    resume = resume_point(run_dir, t, config_text)
    hydra_files.started(run_dir)
    recorder = Recorder(run_dir, keep_epochs=resume["epoch"] if resume else 0,
                        keep_steps=resume["step"] if resume else None)
    write_json(run_dir / "environment.json", environment(device))
    diag = Diagnostics(model, cfg.diagnostics, run_dir, recorder.steps_tb,
                       keep_until=resume["step"] if resume else None) if cfg.diagnostics.enabled else None
    report = None
    if cfg.get("trial"):  # an Optuna trial: report every epoch to the study, whose pruner may stop the run
        from dnnlab.trial import reporter

        report = reporter(cfg.trial)
    run = Run(cfg=cfg, run_dir=run_dir, parallel_jobs=parallel_jobs, device=device, data=data, model=model,
              reused=reused, steps_per_epoch=steps_per_epoch(len(data.x_train), t.batch_size),
              autocast=torch.autocast(device.type, dtype=torch.bfloat16) if t.precision == "bf16" else nullcontext(),
              config_text=config_text, resume=resume, recorder=recorder,
              rows=[{**r, "epoch": int(r["epoch"])} for r in read_metrics(recorder.csv_path)],
              generator=torch.Generator(device=device).manual_seed(t.seed), diag=diag, report=report,
              stopper=EarlyStopping(t.early_stopping))
    if resume:
        run.step, run.cache_seconds = resume["step"] - resume["phase_step"], resume["cache_seconds"]
        run.phase_log = resume["phases"]
        run.stopper.load_state_dict(resume["stopper"])
    return run


def begin_phase(run: Run, phase: int, name: str, lr0: float, epochs: int):
    """The phase's network, inputs, optimizer, schedule and step (a resumed phase's as they were saved): (the
    network it evaluates, the one it trains, its training and validation inputs, the C++ step's plan or None)."""
    cfg, model = run.cfg, run.model
    resuming = run.resume is not None and phase == run.resume["phase"]
    if phase:  # fine-tuning: start from the best weights so far, unfreeze, continue at a lower rate
        if not resuming:
            run.stopper.restore(model)
            run.stopper.bad_epochs = 0
        run.phase_log[phase - 1]["unfrozen"] = transfer.unfreeze(model, cfg.transfer.unfreeze_top)
    if resuming:
        model.load_state_dict(run.resume["model"])
    frozen, net = transfer.split_frozen(model)
    x_train, x_val = run.data.x_train, run.data.x_val
    if run.reused and cfg.transfer.cache and len(frozen):  # the frozen layers' outputs, computed once
        began = time.perf_counter()
        x_train, x_val = transfer.features(frozen, x_train), transfer.features(frozen, x_val)
        run.cache_seconds += time.perf_counter() - began
    else:
        net = model
    trainable = [p for p in model.parameters() if p.requires_grad]
    run.phase, run.optimizer = phase, build_optimizer(cfg.optimizer, trainable, run.device, lr=lr0)
    speed = fast.speed_up(cfg, net, run.optimizer, run.device, core_share(run.parallel_jobs), run.steps_per_epoch)
    run.tuner = speed.tuner
    run.schedule = build_schedule(cfg.schedule, lr0, epochs * run.steps_per_epoch, run.steps_per_epoch)
    if resuming:
        run.optimizer.load_state_dict(run.resume["optimizer"])
        run.schedule.load_state_dict(run.resume["schedule"])
        set_rng_state(run.resume["rng"], run.generator)
        run.phase_step, run.phase_epochs = run.resume["phase_step"], run.resume["phase_epochs"]
    else:
        run.phase_log.append({"phase": name, "lr": lr0, "first_epoch": len(run.rows) + 1})
        run.phase_step, run.phase_epochs = 0, 0
    return net, speed.train_net, x_train, x_val, speed.plan


def run_phase(run: Run, phase: int, name: str, lr0: float, epochs: int, progress, stop) -> tuple[str, str | None]:
    """Train one phase's epochs (until early stopping, a signal, divergence or pruning): (status, reason)."""
    net, train_net, x_train, x_val, step_plan = begin_phase(run, phase, name, lr0, epochs)
    position = run.resume["position"] if run.resume is not None and phase == run.resume["phase"] else None
    rules = GradientRules(run.model, run.cfg.regularizer, run.cfg.trainer)
    status, reason, spe = "completed", None, run.steps_per_epoch
    try:
        while run.phase_epochs < epochs and not run.stopper.should_stop:
            started = time.perf_counter() - (position["elapsed"] if position else 0.0)
            try:
                train_loss, train_acc, run.phase_step, lr = train_epoch(
                    train_net, x_train, run.data.y_train, spe, run.cfg.trainer.batch_size, run.optimizer, rules,
                    run.schedule, run.phase_step, run.generator, run.autocast, progress, stop, position, run.diag,
                    run.step, step_plan, run.tuner)
            except Interrupted as e:
                run.phase_step = e.position["step"]
                run.save("last.pt", {**e.position, "elapsed": time.perf_counter() - started})
                status, reason = "interrupted", f"signal during epoch {len(run.rows) + 1}, step {run.phase_step}"
                break
            position = None
            val_loss, val_acc = evaluate(net, x_val, run.data.y_val, run.autocast)
            run.phase_epochs += 1
            row = {"epoch": len(run.rows) + 1, "train_loss": train_loss, "train_acc": train_acc,
                   "val_loss": val_loss, "val_acc": val_acc, "lr": lr, "seconds": time.perf_counter() - started}
            end_epoch(row, run.rows, run.recorder, run.schedule, (run.phase_step - spe, run.phase_step), run.stopper,
                      run.model, run.save, run.cfg.trainer, run.run_dir, lr_offset=run.step)
            progress.epoch(row)
            if run.report:
                run.report(row)
    except Diverged as e:
        status, reason = "diverged", f"epoch {len(run.rows) + 1}, {e}"
    except Pruned as e:
        status, reason = "pruned", str(e)
    run.step += run.phase_step
    run.phase_log[-1]["epochs"] = len(run.rows) + 1 - run.phase_log[-1]["first_epoch"]
    run.phase_log[-1]["training_step"] = "native" if step_plan else "autograd"
    return status, reason


def finish(run: Run, status: str, reason: str | None) -> dict:
    """The test evaluation (of the best weights where early stopping restores them), the summary and the plots."""
    run.recorder.close()
    if run.diag:
        run.diag.close()
    run.stopper.restore(run.model)
    test = evaluate(run.model, run.data.x_test, run.data.y_test, run.autocast) \
        if status in ("completed", "pruned") else (math.nan, math.nan)
    if status == "completed" and run.rows:
        checkpoint.mark_final(run.run_dir / "checkpoints", run.stopper.final_checkpoint)
    summary = {
        **summary_fields(status, reason, run.rows, run.stopper, test, run.model, run.device, run.data,
                         run.cfg.trainer.seed, run.cache_seconds),
        "threads": torch.get_num_threads(),
        "update_threads": run.tuner.many if run.tuner else torch.get_num_threads(),
        "steps": run.step, "phases": run.phase_log, "resumed": run.resume is not None,
        "training_step": " then ".join(dict.fromkeys(p.get("training_step", "autograd") for p in run.phase_log)),
    }
    if run.reused:
        summary["transfer"] = {**run.reused, "cache_seconds": run.cache_seconds}
    write_json(run.run_dir / "summary.json", summary)
    hparams.write(run.cfg, run.run_dir, summary)  # TensorBoard's HParams table: settings beside final metrics
    if run.rows:
        run.recorder.plot(run.rows, run.cfg, run.steps_per_epoch, summary["best_epoch"])
    print_summary(summary, run.run_dir)
    return summary


def train(cfg: DictConfig, run_dir: Path, parallel_jobs: int = 1) -> dict:
    """Train one configured network; write every output into run_dir; return the summary."""
    run = start(cfg, run_dir, parallel_jobs)
    status, reason, plan = "completed", None, phases(cfg)
    with Progress(sum(p[2] for p in plan), run.steps_per_epoch, enabled=cfg.trainer.progress) as progress, \
            stop_on_signals() as stop:
        for phase, (name, lr0, epochs) in enumerate(plan):
            if run.resume is not None and phase < run.resume["phase"]:
                continue
            status, reason = run_phase(run, phase, name, lr0, epochs, progress, stop)
            if status != "completed":
                break
    return finish(run, status, reason)
