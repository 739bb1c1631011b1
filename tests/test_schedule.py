"""Learning-rate schedules: every class gives its book formula at chosen steps; the trainer really applies them."""
from __future__ import annotations

import csv
import math

import pytest
import torch
from hydra.utils import get_class

from dnnlab import CONF_DIR, checkpoint
from dnnlab.model import build_mlp
from dnnlab.optim import build_optimizer, set_momentum
from dnnlab.schedule import (Constant, Cosine, Exponential, OneCycle, Performance, Piecewise, Power, Warmup,
                             build_schedule)
from dnnlab.train import train

SCHEDULES = sorted(p.stem for p in (CONF_DIR / "schedule").glob("*.yaml"))
LR0, TOTAL, SPE = 0.01, 1000, 10  # lr0, total steps, steps per epoch


def build(make_cfg, name, *overrides, lr0=LR0, total=TOTAL, spe=SPE):
    cfg = make_cfg(f"schedule={name}", *overrides)
    return build_schedule(cfg.schedule, lr0, total, spe)


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_yaml_builds_its_class_and_gives_positive_rates(make_cfg, name):
    cfg = make_cfg(f"schedule={name}")
    schedule = build_schedule(cfg.schedule, LR0, TOTAL, SPE)
    assert type(schedule) is get_class(cfg.schedule._target_)
    assert all(math.isfinite(schedule.lr(t)) and schedule.lr(t) > 0 for t in range(0, TOTAL, 7))
    assert schedule.momentum(0) is None  # only 1cycle with cycle_momentum=true moves momentum


def test_constant(make_cfg):
    schedule = build(make_cfg, "constant")
    assert type(schedule) is Constant
    assert [schedule.lr(t) for t in (0, 1, 500, TOTAL - 1, 5 * TOTAL)] == [LR0] * 5


@pytest.mark.parametrize("s,c", [(10000, 1.0), (100, 1.0), (50, 2.0), (20, 0.5)])
def test_power(make_cfg, s, c):
    schedule = build(make_cfg, "power", f"schedule.s={s}", f"schedule.c={c}")
    assert (schedule.s, schedule.c) == (s, c)
    for t in (0, 1, s, 2 * s, 3 * s + 7, TOTAL - 1):
        assert schedule.lr(t) == pytest.approx(LR0 / (1 + t / s) ** c, rel=1e-12)
    assert schedule.lr(s) == pytest.approx(LR0 / 2 ** c)  # after s steps: divided by 2^c


def test_power_yaml_has_the_books_defaults(make_cfg):
    schedule = build(make_cfg, "power")
    assert (schedule.s, schedule.c) == (10000, 1.0)


@pytest.mark.parametrize("s", [20000, 100, 3])
def test_exponential(make_cfg, s):
    schedule = build(make_cfg, "exponential", f"schedule.s={s}")
    for t in (0, 1, s // 2, s, 2 * s, TOTAL - 1):
        assert schedule.lr(t) == pytest.approx(LR0 * 0.1 ** (t / s), rel=1e-12)
    assert schedule.lr(s) == pytest.approx(LR0 / 10) and schedule.lr(2 * s) == pytest.approx(LR0 / 100)


def test_exponential_by_epoch_holds_each_epochs_rate(make_cfg):
    """The book's LearningRateScheduler(exponential_decay_fn): lr0 * 0.1^(epoch / s), set at each epoch's start."""
    schedule = build(make_cfg, "exponential", "schedule.s=20", "schedule.unit=epoch", spe=SPE)
    for epoch in (0, 1, 7, 20):
        for t in (epoch * SPE, epoch * SPE + SPE - 1):
            assert schedule.lr(t) == pytest.approx(LR0 * 0.1 ** (epoch / 20), rel=1e-12)


def test_piecewise_boundaries_are_epochs_and_t_counts_steps(make_cfg):
    schedule = build(make_cfg, "piecewise", spe=SPE)  # boundaries [5, 15] epochs, values [0.01, 0.005, 0.001]
    assert type(schedule) is Piecewise
    expected = {0: 0.01, 49: 0.01, 50: 0.005, 149: 0.005, 150: 0.001, TOTAL - 1: 0.001}
    assert {t: schedule.lr(t) for t in expected} == expected
    other = build(make_cfg, "piecewise", "schedule.boundaries=[1,2,3]", "schedule.values=[4,3,2,1]", spe=7)
    assert [other.lr(t) for t in (0, 6, 7, 13, 14, 20, 21, 100)] == [4, 4, 3, 3, 2, 2, 1, 1]


def test_piecewise_values_replace_the_optimizer_lr(make_cfg):
    schedule = build(make_cfg, "piecewise", lr0=123.0)
    assert schedule.lr(0) == 0.01


def run_epochs(schedule, losses):
    """lr after each epoch's end_epoch(val_loss)."""
    out = []
    for loss in losses:
        schedule.end_epoch(loss)
        out.append(schedule.lr(TOTAL))  # past any warm-up
    return out


def test_performance_reduces_after_patience_epochs_without_a_lower_loss(make_cfg):
    schedule = build(make_cfg, "performance", "schedule.patience=2", "schedule.factor=0.5")
    assert type(schedule) is Performance
    assert schedule.lr(0) == LR0
    # 0.9 is the best; equal losses are no improvement; the count restarts after each reduction (Keras)
    lrs = run_epochs(schedule, [1.0, 0.9, 0.95, 0.9, 0.95, 0.95, 0.95, 0.5, 0.6, 0.4])
    assert lrs == pytest.approx([LR0, LR0, LR0, LR0 / 2, LR0 / 2, LR0 / 4, LR0 / 4, LR0 / 4, LR0 / 4, LR0 / 4])
    assert all(schedule.lr(t) == LR0 / 4 for t in (0, 500, TOTAL))  # independent of the step


def test_performance_yaml_is_the_books_setting(make_cfg):
    schedule = build(make_cfg, "performance")
    assert (schedule.factor, schedule.patience, schedule.min_lr) == (0.5, 5, 0.0)
    assert run_epochs(schedule, [1.0] + [2.0] * 4)[-1] == LR0  # 4 bad epochs: not yet
    assert run_epochs(schedule, [2.0])[-1] == LR0 / 2  # the 5th


def test_performance_min_lr_floor(make_cfg):
    schedule = build(make_cfg, "performance", "schedule.patience=1", "schedule.factor=0.5", "schedule.min_lr=0.003")
    lrs = run_epochs(schedule, [1.0, 2.0, 2.0, 2.0, 2.0])
    assert lrs == pytest.approx([LR0, LR0 / 2, 0.003, 0.003, 0.003])  # 0.0025 would be below the floor


def test_performance_state_dict_round_trip(make_cfg):
    a = build(make_cfg, "performance", "schedule.patience=3")
    run_epochs(a, [1.0, 0.5, 0.7, 0.8, 0.9, 0.6])  # reduced once, then one bad epoch counted
    state = a.state_dict()
    assert state == {"current": LR0 / 2, "best": 0.5, "bad_epochs": 1}
    b = build(make_cfg, "performance", "schedule.patience=3")
    b.load_state_dict(state)
    more = [0.6, 0.6, 0.4, 0.5]
    assert run_epochs(b, more) == run_epochs(a, more) == pytest.approx([LR0 / 2, LR0 / 4, LR0 / 4, LR0 / 4])


def test_1cycle_follows_the_books_three_linear_phases(make_cfg):
    schedule = build(make_cfg, "1cycle", "optimizer.lr=0.02")  # max_lr is ${optimizer.lr}
    assert type(schedule) is OneCycle
    hi, lo, end = 0.02, 0.02 / 10, 0.02 / 10 / 1000
    rise = 450  # pct_rise 0.45 of 1000 steps
    lrs = [schedule.lr(t) for t in range(TOTAL)]
    assert lrs[0] == pytest.approx(lo) and lrs[TOTAL - 1] == pytest.approx(end)
    assert max(lrs) == pytest.approx(hi) and lrs.index(max(lrs)) == rise
    assert lrs[2 * rise] == pytest.approx(lo)
    assert lrs[rise // 2] == pytest.approx((lo + hi) / 2) and lrs[3 * rise // 2] == pytest.approx((lo + hi) / 2)
    assert lrs[(2 * rise + TOTAL - 1) // 2] == pytest.approx(lo + (end - lo) * 49 / 99)
    for a, b in ((0, rise), (rise, 2 * rise), (2 * rise, TOTAL - 1)):  # linear: constant differences per phase
        steps = [lrs[t + 1] - lrs[t] for t in range(a, b)]
        assert max(steps) - min(steps) < 1e-12, (a, b)
    assert schedule.lr(5 * TOTAL) == pytest.approx(end)  # stays at the end value past the last step


@pytest.mark.parametrize("total", [16, 100, 1719, 17190])
def test_1cycle_peak_and_ends_at_any_length(make_cfg, total):
    schedule = build(make_cfg, "1cycle", total=total)
    lrs = [schedule.lr(t) for t in range(total)]
    peak = lrs.index(max(lrs))
    assert abs(peak - 0.45 * total) <= 1
    assert lrs[0] == pytest.approx(1e-4) and max(lrs) == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-7)


def test_1cycle_short_runs_still_end_at_the_final_lr(make_cfg):
    cfg, bad = make_cfg("schedule=1cycle"), []
    for total in range(4, 60):
        schedule = build_schedule(cfg.schedule, LR0, total, 1)
        if schedule.lr(total - 1) != pytest.approx(1e-7):
            bad.append((total, schedule.lr(total - 1)))
    assert not bad


def test_1cycle_momentum_moves_opposite_to_the_lr(make_cfg):
    schedule = build(make_cfg, "1cycle", "schedule.cycle_momentum=true")
    base, top = 0.85, 0.95
    moms = [schedule.momentum(t) for t in range(TOTAL)]
    assert moms[0] == pytest.approx(top) and moms[450] == pytest.approx(base)
    assert moms[900] == pytest.approx(top) and moms[TOTAL - 1] == pytest.approx(top)
    lo, hi = schedule.start_lr, schedule.max_lr
    for t in range(0, 901, 25):  # an exact mirror of the lr during rise and fall
        frac = (schedule.lr(t) - lo) / (hi - lo)
        assert moms[t] == pytest.approx(top - (top - base) * frac)
    off = build(make_cfg, "1cycle")
    assert all(off.momentum(t) is None for t in (0, 450, TOTAL - 1))


@pytest.mark.parametrize("min_lr", [0.0, 0.001])
def test_cosine(make_cfg, min_lr):
    schedule = build(make_cfg, "cosine", f"schedule.min_lr={min_lr}")
    assert type(schedule) is Cosine
    last = TOTAL - 1  # the last step trained at min_lr
    assert schedule.lr(0) == pytest.approx(LR0)
    assert schedule.lr(last / 2) == pytest.approx((LR0 + min_lr) / 2)
    assert schedule.lr(last) == pytest.approx(min_lr, abs=1e-15) and schedule.lr(3 * TOTAL) == schedule.lr(last)
    for t in (1, 123, 777, TOTAL - 2):
        assert schedule.lr(t) == pytest.approx(min_lr + (LR0 - min_lr) * (1 + math.cos(math.pi * t / last)) / 2)


@pytest.mark.parametrize("name", ["constant", "exponential", "1cycle", "cosine", "power"])
def test_warmup_multiplies_by_t_plus_1_over_n_then_1(make_cfg, name):
    n = 20
    extra = ["schedule.cycle_momentum=true"] if name == "1cycle" else []
    plain = build(make_cfg, name, *extra)
    warm = build(make_cfg, name, f"schedule.warmup_steps={n}", *extra)
    assert type(warm) is Warmup and type(warm.inner) is type(plain)
    for t in range(0, 60):
        factor = (t + 1) / n if t < n else 1.0
        assert warm.lr(t) == pytest.approx(plain.lr(t) * factor, rel=1e-12)
        assert warm.momentum(t) == plain.momentum(t)  # warm-up leaves momentum alone
    assert warm.lr(0) == pytest.approx(plain.lr(0) / n) and warm.lr(n - 1) == pytest.approx(plain.lr(n - 1))


def test_warmup_passes_epochs_and_state_to_the_inner_schedule(make_cfg):
    warm = build(make_cfg, "performance", "schedule.patience=1", "schedule.warmup_steps=5")
    assert run_epochs(warm, [1.0, 2.0])[-1] == LR0 / 2
    assert warm.lr(0) == pytest.approx(LR0 / 2 / 5)  # step 0: (0+1)/5 of the reduced lr
    fresh = build(make_cfg, "performance", "schedule.patience=1", "schedule.warmup_steps=5")
    fresh.load_state_dict(warm.state_dict())
    assert fresh.lr(100) == LR0 / 2


def test_classes_work_without_hydra():
    assert Power(0.1, 100, 10, s=5, c=2).lr(10) == pytest.approx(0.1 / 9)
    assert Exponential(0.1, 100, 10, s=5).lr(10) == pytest.approx(0.001)
    assert Piecewise(0.1, 100, 10, boundaries=[2], values=[1.0, 0.5]).lr(20) == 0.5
    assert Cosine(0.1, 101, 10).lr(50) == pytest.approx(0.05)
    assert OneCycle(0.1, 100, 10, max_lr=1.0).lr(45) == pytest.approx(1.0)


# --- the trainer applies the schedule ---

def steps_per_epoch(n: int, bs: int) -> int:
    return math.ceil(n / bs) - (n % bs == 1 and n > 1)


def test_trainer_applies_exponential_schedule(make_cfg, tmp_path):
    summary = train(make_cfg("schedule=exponential", "schedule.s=5", "trainer.epochs=2"), tmp_path)
    spe = steps_per_epoch(summary["n_train"], 32)
    assert spe == 16  # 500 training images of the tiny dataset, batches of 32
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    for row in rows:  # logged: the lr used at the epoch's last step
        last_step = int(row["epoch"]) * spe - 1
        assert float(row["lr"]) == pytest.approx(1e-3 * 0.1 ** (last_step / 5), rel=1e-12)
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 2 * spe
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.1 ** ((2 * spe - 1) / 5))


def test_trainer_cycles_adams_beta1_with_1cycle(make_cfg, tmp_path):
    train(make_cfg("schedule=1cycle", "schedule.cycle_momentum=true", "trainer.epochs=2"), tmp_path)
    group = checkpoint.load(tmp_path / "checkpoints" / "last.pt")["optimizer"]["param_groups"][0]
    assert group["betas"][0] == pytest.approx(0.95) and group["betas"][1] == 0.999  # was 0.9: max_momentum at the end
    assert group["lr"] == pytest.approx(1e-3 / 10 / 1000)


def test_set_momentum_moves_adam_beta1_and_sgd_momentum(make_cfg):
    cfg = make_cfg("schedule=1cycle", "schedule.cycle_momentum=true", "model.n_hidden=1", "model.n_neurons=4")
    model = build_mlp(cfg, 10)
    schedule = build_schedule(cfg.schedule, cfg.optimizer.lr, TOTAL, SPE)
    adam = build_optimizer(cfg.optimizer, list(model.parameters()), torch.device("cpu"))
    assert tuple(adam.param_groups[0]["betas"]) == (0.9, 0.999)  # (torch 2.4 keeps the list it was given)
    for t, beta1 in ((0, 0.95), (450, 0.85), (225, 0.9)):
        set_momentum(adam, schedule.momentum(t))
        assert adam.param_groups[0]["betas"][0] == pytest.approx(beta1) and adam.param_groups[0]["betas"][1] == 0.999
    sgd = build_optimizer(make_cfg("optimizer=momentum").optimizer, list(model.parameters()), torch.device("cpu"))
    set_momentum(sgd, schedule.momentum(450))
    assert sgd.param_groups[0]["momentum"] == pytest.approx(0.85)
