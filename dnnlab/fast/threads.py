"""Choosing between all cores and one while training, where the choice changes speed only (the C++ steps and the
flat optimizer update, tested to give the same numbers on any thread count)."""
from __future__ import annotations

import logging
import math
import statistics
import time
from typing import Callable

import torch

log = logging.getLogger("dnnlab")


class ThreadTuner:
    """threads=auto on a multi-core CPU. Which is faster, all cores or one, depends on the work and on what else the
    machine runs: a second thread that must wait for a core busy with another program (another training job, say)
    makes the work many times slower. So an epoch starts with a few steps on one thread and a few on all cores and
    keeps the faster; all cores lose at once when a step on them takes `abort` times as long as on one, and later,
    as soon as the recent steps take much longer than the one-thread steps did. After a loss the next probes wait
    1, 3, 7, then 15 epochs (on one thread), so that a busy machine pays for few of them.
    `before(j)` and `after(j)` wrap the j-th timed piece of work of an epoch (j = 0 starts one): a stack's whole
    step, whose thread count `apply` (torch.set_num_threads) sets, or a single job's optimizer update, which reads
    `current` (apply=None) and may be timed inside the C++ step. The log records the probes."""

    def __init__(self, many: int, steps_per_epoch: int, apply: Callable[[int], None] | None = torch.set_num_threads,
                 probe: int = 8, skip: int = 2, window: int = 10, abort: float = 5.0):
        self.many, self.apply, self.probe, self.skip, self.window, self.abort = many, apply, probe, skip, window, abort
        self.enabled = steps_per_epoch >= 6 * probe
        # a stack runs on the threads it has; a single job's update starts on one (and stays there in epochs too
        # short to probe)
        self.current = torch.get_num_threads() if apply else 1
        self.probing = False
        self.times: dict[int, list[float]] = {}
        self.recent: list[float] = []
        self.reference = math.inf
        self.start = 0.0
        self.losses = 0   # probes and runs on all cores lost in a row
        self.pause = 0    # epochs left before the next probe
        self.switches = 0  # falls back to one thread within an epoch

    def _use(self, threads: int) -> None:
        if threads != self.current:
            if self.apply:
                self.apply(threads)
            self.current = threads

    def _lose(self) -> None:
        self._use(1)
        self.probing = False
        self.losses += 1
        self.pause = min(2 ** self.losses - 1, 15)

    def settle(self) -> None:
        """All cores again, for what must not depend on the machine's load: evaluation, whose batched products
        round by thread count."""
        self._use(self.many)

    def before(self, j: int) -> None:
        if not self.enabled:
            return
        if j == 0:
            self.recent = []
            self.probing = self.pause == 0
            self.pause = max(0, self.pause - 1)
            self.times = {1: [], self.many: []}
            self._use(1)
        elif j == self.probe and self.probing:
            self._use(self.many)
        self.start = time.perf_counter()

    def after(self, j: int, elapsed: float | None = None) -> None:
        """`elapsed`: the work's seconds where it timed itself (else the time since `before`)."""
        if not self.enabled:
            return
        if elapsed is None:
            elapsed = time.perf_counter() - self.start
        if self.probing:
            if j % self.probe >= self.skip:  # the first steps after a switch are slower either way
                self.times[1 if j < self.probe else self.many].append(elapsed)
            if j == self.probe - 1:
                self.reference = statistics.median(self.times[1])
            elif j >= self.probe and elapsed > self.abort * self.reference:
                log.debug("thread probe: %.2f ms on %d threads, %.2f ms on 1", 1e3 * elapsed, self.many,
                          1e3 * self.reference)
                self._lose()
            elif j == 2 * self.probe - 1:
                many = statistics.median(self.times[self.many])
                log.debug("thread probe: %.2f ms on %d threads, %.2f ms on 1", 1e3 * many, self.many,
                          1e3 * self.reference)
                self.probing = False
                if many < self.reference:
                    self.losses = 0
                else:
                    self._lose()
            return
        if self.current == self.many:
            self.recent = (self.recent + [elapsed])[-self.window:]
            if len(self.recent) == self.window and statistics.median(self.recent) > 1.5 * self.reference:
                log.debug("step %d: %.2f ms on %d threads, one thread took %.2f", j,
                          1e3 * statistics.median(self.recent), self.many, 1e3 * self.reference)
                self._lose()  # the machine got busy: one thread for the rest of the epoch
                self.switches += 1
