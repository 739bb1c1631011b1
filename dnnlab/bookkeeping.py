"""A run's bookkeeping, the same for `dnnlab train` and each job of a stack: steps per epoch, evaluation, early
stopping, the end of an epoch (metrics, learning rates, checkpoints in an order that survives a crash), the
checkpoint's contents and the summary's common fields."""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from dnnlab import checkpoint


class Diverged(Exception):
    pass


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches in one pass over n examples; a lone last example joins no batch (it would break BatchNorm)."""
    return math.ceil(n / batch_size) - (n % batch_size == 1 and n > 1)


@torch.no_grad()
def evaluate(model, x, y, autocast, chunk: int = 8192) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a whole split, in large chunks, with one device sync at the end."""
    model.eval()
    loss, correct = torch.zeros((), device=x.device), torch.zeros((), device=x.device, dtype=torch.long)
    for i in range(0, len(x), chunk):
        with autocast:
            logits = model(x[i:i + chunk]).float()
        loss += F.cross_entropy(logits, y[i:i + chunk], reduction="sum")
        correct += (logits.argmax(1) == y[i:i + chunk]).sum()
    model.train()
    return loss.item() / len(x), correct.item() / len(x)


class EarlyStopping:
    """Keras' EarlyStopping: stop after `patience` epochs without improvement; remember the best weights."""

    def __init__(self, cfg: DictConfig):
        self.monitor, self.patience = cfg.monitor, cfg.patience
        # as Keras: only early stopping restores the best weights; with it off a run ends with its last epoch's
        self.restores = cfg.monitor is not None and cfg.restore_best_weights
        self.sign = -1 if self.monitor == "val_acc" else 1  # minimise val_loss, maximise val_acc
        self.best, self.best_epoch, self.bad_epochs, self.best_state = math.inf, 0, 0, None

    def update(self, row: dict, model) -> bool:
        """True if this epoch is the best so far (its weights are kept)."""
        value = self.sign * row[self.monitor or "val_loss"]
        if value < self.best:
            self.best, self.best_epoch, self.bad_epochs = value, row["epoch"], 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return True
        self.bad_epochs += 1
        return False

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "best_state": self.best_state}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]
        self.best_state = state["best_state"]

    @property
    def should_stop(self) -> bool:
        return self.monitor is not None and self.bad_epochs > 0 and self.bad_epochs >= self.patience

    @property
    def final_checkpoint(self) -> str:
        """The checkpoint of the weights a run ends with (checkpoints/final.pt links to it)."""
        return "best.pt" if self.restores and self.best_epoch else "last.pt"

    def restore(self, model) -> None:
        """The best epoch's weights back into `model`, where early stopping restores them."""
        if self.restores and self.best_state is not None:
            model.load_state_dict(self.best_state)


def epoch_metrics(rows: list[dict], stopper: EarlyStopping) -> dict:
    """The summary's per-epoch numbers: the best epoch's validation metrics (what early stopping and a sweeper
    judge) beside the last epoch's (what a Keras fit log ends with), and which epoch's weights were tested."""
    best = rows[stopper.best_epoch - 1] if stopper.best_epoch else {}
    last = rows[-1] if rows else {}
    restored = stopper.restores and stopper.best_epoch
    return {"best_epoch": stopper.best_epoch or None, "monitor": stopper.monitor,
            "val_acc": best.get("val_acc"), "val_loss": best.get("val_loss"),
            **{f"last_{key}": last.get(key) for key in ("val_acc", "val_loss", "train_acc", "train_loss")},
            "test_epoch": (stopper.best_epoch if restored else len(rows)) or None}


def end_epoch(row: dict, rows: list[dict], recorder, schedule, steps: tuple[int, int], stopper: EarlyStopping,
              model, save: Callable[[str], None], t: DictConfig, run_dir: Path, lr_offset: int = 0) -> None:
    """After an epoch: its row, the learning rate of each of its `steps` (first, end), the schedule's end of epoch,
    then the checkpoints. best.pt and epoch_N.pt come before last.pt: a crash before last.pt resumes from the
    previous one, which redoes this epoch and writes them again (the other order could lose or stale them)."""
    rows.append(row)
    recorder.log_epoch(row)
    recorder.log_lr(schedule.lr, *steps, offset=lr_offset)
    schedule.end_epoch(row["val_loss"])  # after log_lr: a performance schedule changes its rate here
    if stopper.update(row, model):
        save("best.pt")
    if t.checkpoint_every and row["epoch"] % t.checkpoint_every == 0:
        save(f"epoch_{row['epoch']}.pt")
        checkpoint.keep_newest_periodic(run_dir / "checkpoints", t.get("keep_checkpoints"))
    save("last.pt")


def checkpoint_state(*, model: dict, optimizer: dict, schedule: dict, epoch: int, step: int, phase: int,
                     phase_step: int, phase_epochs: int, phases: list[dict], cache_seconds: float,
                     stopper: EarlyStopping, rng: dict, position: dict | None, config: str, classes) -> dict:
    """Everything a run needs to continue exactly from a point: what every checkpoint holds."""
    return {"model": model, "optimizer": optimizer, "schedule": schedule, "epoch": epoch, "step": step,
            "phase": phase, "phase_step": phase_step, "phase_epochs": phase_epochs, "phases": phases,
            "cache_seconds": cache_seconds, "stopper": stopper.state_dict(), "rng": rng, "position": position,
            "config": config, "classes": list(classes)}


def summary_fields(status: str, reason, rows: list[dict], stopper: EarlyStopping, test: tuple[float, float],
                   model, device, data, seed: int, extra_seconds: float = 0.0) -> dict:
    """The summary's fields that do not depend on how the run was trained (alone, or in a stack)."""
    return {
        "status": status, "reason": reason, "epochs": len(rows), "stopped_early": stopper.should_stop,
        **epoch_metrics(rows, stopper), "test_acc": test[1], "test_loss": test[0],
        "train_seconds": sum(r["seconds"] for r in rows) + extra_seconds,
        "seconds_per_epoch": statistics.median(r["seconds"] for r in rows) if rows else None,
        "n_params": sum(p.numel() for p in model.parameters()), "device": str(device), "seed": seed,
        "classes": list(data.classes), "n_train": len(data.x_train), "n_val": len(data.x_val),
        "n_test": len(data.x_test), "data_source": data.source,
    }
