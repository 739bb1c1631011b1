"""Learning-rate schedules as closed-form functions of the global step t (the book's formulas).

Each schedule gives `lr(t)` and optionally `momentum(t)`; the trainer writes them into the optimizer's param
groups before every step. Closed forms (rather than torch's recursive schedulers) compose with warm-up, resume
from any step and are checked against their formulas in the tests.
"""
from __future__ import annotations

import math

from omegaconf import DictConfig

from dnnlab.components import make


class Schedule:
    def __init__(self, lr0: float, total_steps: int, steps_per_epoch: int):
        self.lr0, self.total_steps, self.steps_per_epoch = lr0, total_steps, steps_per_epoch

    def lr(self, t: int) -> float:
        raise NotImplementedError

    def momentum(self, t: int) -> float | None:
        return None

    def end_epoch(self, val_loss: float) -> None:
        """Called once per epoch with the validation loss (only performance scheduling uses it)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Constant(Schedule):
    def lr(self, t):
        return self.lr0


class Power(Schedule):
    def __init__(self, lr0, total_steps, steps_per_epoch, s: float = 10000, c: float = 1.0):
        super().__init__(lr0, total_steps, steps_per_epoch)
        self.s, self.c = s, c

    def lr(self, t):
        return self.lr0 / (1 + t / self.s) ** self.c


class Exponential(Schedule):
    """unit "step": t counts steps; "epoch": whole epochs, the rate set at each epoch's start (Keras'
    LearningRateScheduler, as the book's exponential_decay_fn)."""

    def __init__(self, lr0, total_steps, steps_per_epoch, s: float = 20000, unit: str = "step"):
        super().__init__(lr0, total_steps, steps_per_epoch)
        self.s, self.unit = s, unit

    def lr(self, t):
        return self.lr0 * 0.1 ** ((t // self.steps_per_epoch if self.unit == "epoch" else t) / self.s)


class Piecewise(Schedule):
    def __init__(self, lr0, total_steps, steps_per_epoch, boundaries=(5, 15), values=(0.01, 0.005, 0.001)):
        super().__init__(lr0, total_steps, steps_per_epoch)
        self.boundaries, self.values = list(boundaries), list(values)

    def lr(self, t):
        epoch = t // self.steps_per_epoch
        return self.values[sum(epoch >= b for b in self.boundaries)]


class Performance(Schedule):
    """Reduce on plateau: lr *= factor after `patience` epochs without the validation loss falling by min_delta."""

    def __init__(self, lr0, total_steps, steps_per_epoch, factor: float = 0.5, patience: int = 5,
                 min_lr: float = 0.0, min_delta: float = 1e-4):
        super().__init__(lr0, total_steps, steps_per_epoch)
        self.factor, self.patience, self.min_lr, self.min_delta = factor, patience, min_lr, min_delta
        self.current, self.best, self.bad_epochs = lr0, math.inf, 0

    def lr(self, t):
        return self.current

    def end_epoch(self, val_loss):
        if val_loss < self.best - self.min_delta:
            self.best, self.bad_epochs = val_loss, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:  # Keras semantics: reduce after `patience` bad epochs
            self.current, self.bad_epochs = max(self.current * self.factor, self.min_lr), 0

    def state_dict(self):
        return {"current": self.current, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state):
        self.current, self.best, self.bad_epochs = state["current"], state["best"], state["bad_epochs"]


class OneCycle(Schedule):
    """The book's 1cycle: rise, fall, then a final fall by final_div_factor; all three phases linear."""

    def __init__(self, lr0, total_steps, steps_per_epoch, max_lr: float = 0.01, div_factor: float = 10.0,
                 final_div_factor: float = 1000.0, pct_rise: float = 0.45, cycle_momentum: bool = False,
                 base_momentum: float = 0.85, max_momentum: float = 0.95):
        super().__init__(lr0, total_steps, steps_per_epoch)
        self.max_lr, self.start_lr = max_lr, max_lr / div_factor
        self.end_lr = self.start_lr / final_div_factor
        # rise over ~pct_rise of the steps, fall back over as many, and keep at least one step for the final fall
        self.fall_end = max(0, min(2 * round(pct_rise * total_steps), total_steps - 2))
        self.rise = self.fall_end // 2
        self.cycle_momentum, self.base_momentum, self.max_momentum = cycle_momentum, base_momentum, max_momentum

    def _phase(self, t, high, low, last):
        """Interpolate linearly: `high` at the top of the cycle, `low` at its ends and `last` at the very end."""
        if t <= self.rise:
            return low + (high - low) * t / max(1, self.rise)
        if t <= self.fall_end:
            return high + (low - high) * (t - self.rise) / max(1, self.fall_end - self.rise)
        return low + (last - low) * (t - self.fall_end) / max(1, self.total_steps - 1 - self.fall_end)

    def lr(self, t):
        return self._phase(min(t, self.total_steps - 1), self.max_lr, self.start_lr, self.end_lr)

    def momentum(self, t):
        if not self.cycle_momentum:
            return None
        t = min(t, self.total_steps - 1)
        return self._phase(t, self.base_momentum, self.max_momentum, self.max_momentum)


class Cosine(Schedule):
    def __init__(self, lr0, total_steps, steps_per_epoch, min_lr: float = 0.0):
        super().__init__(lr0, total_steps, steps_per_epoch)
        self.min_lr = min_lr

    def lr(self, t):
        progress = min(t, self.total_steps - 1) / max(1, self.total_steps - 1)  # min_lr at the last step
        return self.min_lr + (self.lr0 - self.min_lr) * (1 + math.cos(math.pi * progress)) / 2


class Warmup(Schedule):
    """Linear warm-up in front of any schedule: lr(t) * (t + 1) / warmup_steps for the first steps."""

    def __init__(self, inner: Schedule, warmup_steps: int):
        super().__init__(inner.lr0, inner.total_steps, inner.steps_per_epoch)
        self.inner, self.warmup_steps = inner, warmup_steps

    def lr(self, t):
        return self.inner.lr(t) * min(1.0, (t + 1) / self.warmup_steps)

    def momentum(self, t):
        return self.inner.momentum(t)

    def end_epoch(self, val_loss):
        self.inner.end_epoch(val_loss)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def build_schedule(cfg: DictConfig, lr0: float, total_steps: int, steps_per_epoch: int) -> Schedule:
    params = {k: v for k, v in cfg.items() if k != "warmup_steps"}
    schedule = make(params, "schedule")(lr0=lr0, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    return Warmup(schedule, cfg.warmup_steps) if cfg.warmup_steps else schedule
