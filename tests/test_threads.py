"""ThreadTuner: probes one thread against all cores at the start of an epoch and keeps the faster, gives up on all
cores at once or later when they get slow, and waits longer between probes after each loss."""
from __future__ import annotations

import pytest

from dnnlab.fast import threads
from dnnlab.fast.threads import ThreadTuner


@pytest.fixture
def clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(threads.time, "perf_counter", lambda: now[0])
    return now


def run_epoch(tuner, clock, step_ms, steps=100) -> list[int]:
    """One epoch whose step j takes step_ms(threads, j) milliseconds; the thread count chosen for each step."""
    chosen = []
    for j in range(steps):
        tuner.before(j)
        chosen.append(tuner.current)
        clock[0] += step_ms(tuner.current, j) / 1000
        tuner.after(j)
    return chosen


def test_the_faster_count_is_kept_after_the_probe(clock, monkeypatch):
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: 2)  # a stack that starts on all cores
    applied = []
    tuner = ThreadTuner(2, 100, apply=applied.append)
    chosen = run_epoch(tuner, clock, lambda n, j: 1.0 if n == 2 else 1.5)
    assert chosen[:8] == [1] * 8 and chosen[8:16] == [2] * 8 and set(chosen[16:]) == {2}
    assert applied == [1, 2] and tuner.reference == pytest.approx(1.5e-3) and tuner.losses == 0
    tuner.settle()  # evaluation on all cores; the next epoch probes again, and one thread wins it
    chosen = run_epoch(tuner, clock, lambda n, j: 2.0 if n == 2 else 1.5)
    assert set(chosen[16:]) == {1} and tuner.switches == 0 and tuner.losses == 1


def test_all_cores_lose_at_once_when_a_probe_step_is_much_slower(clock):
    tuner = ThreadTuner(2, 100, apply=None)  # the caller reads `current`
    chosen = run_epoch(tuner, clock, lambda n, j: 30.0 if n == 2 else 1.0)
    assert chosen[8] == 2 and set(chosen[9:]) == {1}  # the first step on two threads decides


def test_all_cores_fall_back_to_one_when_the_steps_slow_down(clock):
    tuner = ThreadTuner(2, 100, apply=None)
    chosen = run_epoch(tuner, clock, lambda n, j: (1.0 if j < 40 else 4.0) if n == 2 else 1.5)
    assert set(chosen[16:40]) == {2} and set(chosen[45:]) == {1} and tuner.switches == 1
    assert chosen.index(1, 16) == 45  # once half the window of 10 recent steps was slow


def test_after_each_loss_the_next_probe_waits_longer(clock):
    tuner = ThreadTuner(2, 100, apply=None)
    probed = [2 in run_epoch(tuner, clock, lambda n, j: 30.0 if n == 2 else 1.0) for _ in range(14)]
    # losses at epochs 1, 3, 7 and 15 (counting from 1): pauses of 1, 3 and 7 epochs between them
    assert probed == [True, False, True, False, False, False, True] + [False] * 7
    chosen = run_epoch(tuner, clock, lambda n, j: 1.0)  # the 15th probes again; a tie loses, and the pauses stop
    assert chosen[8:16] == [2] * 8 and set(chosen[16:]) == {1} and (tuner.losses, tuner.pause) == (4, 15)  # growing
    tuner.pause = 0
    run_epoch(tuner, clock, lambda n, j: 0.5 if n == 2 else 1.0)  # a win resets the pauses
    assert tuner.losses == 0 and tuner.pause == 0


def test_epochs_too_short_to_probe_keep_one_thread_for_the_update(clock):
    tuner = ThreadTuner(2, 20, apply=None)
    assert not tuner.enabled and set(run_epoch(tuner, clock, lambda n, j: 1.0, steps=20)) == {1}
