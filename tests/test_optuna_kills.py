"""Sweeps that survive kills (issue 25): a killed sweeper's trials are failed as killed and made up, n_trials is the
study's target count of trials with a result (interrupted and killed trials are made up), and bad sweeper settings
are refused before the first trial.

Every sweep is a real `python -m dnnlab train -m hydra/sweeper=optuna ...` subprocess (the `sweep` fixture of
test_optuna.py); a kill is SIGKILL to its process group. The database tests use sqlite and a real PostgreSQL.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from typing import Callable

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from dnnlab.trial import open_storage, owner_record
from hydra_plugins.dnnlab_optuna_sweeper import _space
from tests.test_optuna import journal_study, postgres_url, states, sweep  # noqa: F401 (fixtures)
from tests.conftest import HANG_S

LR = "optimizer.lr=tag(log, interval(1e-3, 1e-1))"
# a trial that runs until it is killed: about 20 ms an epoch on the tiny data, and no early stop
ENDLESS = ["trainer.early_stopping.patience=100000"]
ENDLESS_EPOCHS = 100000
COMPLETE, FAIL, RUNNING = TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING


def wait_running(proc: subprocess.Popen, log_path, load: Callable[[], optuna.Study],
                 timeout: float = HANG_S) -> FrozenTrial:
    """The background sweep's first trial once it is RUNNING and has reported an epoch (bounded wait). The storage is
    read only once the sweep launches a job: by then it has created the study (and a database's tables)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the sweep ended before it was killed:\n" + log_path.read_text()[-3000:]
        if "Launching" in log_path.read_text():
            running = load().get_trials(deepcopy=False, states=(RUNNING,))
            if running and running[0].intermediate_values:
                return running[0]
        time.sleep(0.2)
    pytest.fail(f"no trial was running after {timeout:.0f} s:\n" + log_path.read_text()[-3000:])


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL to the sweep's process group (the sweeper and anything it started), and reap it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=HANG_S)


def nothing_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "nothing to run" in line]


def test_a_killed_sweep_is_failed_as_killed_and_made_up(sweep):
    args = ["hydra.sweeper.sampler=random", "hydra.sweeper.seed=0", "hydra.sweeper.n_trials=2", LR]
    proc = sweep.start(*args, *ENDLESS, epochs=ENDLESS_EPOCHS)
    try:
        running = wait_running(proc, sweep.log, lambda: journal_study(sweep.dir))
    finally:
        kill(proc)
    assert states(journal_study(sweep.dir)) == [RUNNING]  # what a kill leaves: for good, before issue 25
    assert running.user_attrs["owner"]["pid"] == proc.pid
    assert running.user_attrs["owner"]["host"] == socket.gethostname()

    result = sweep(*args, epochs=1)
    study = journal_study(sweep.dir)
    killed = study.trials[0]
    assert killed.state == FAIL and killed.user_attrs["status"] == "killed"
    assert killed.user_attrs["reason"] == f"its sweeper process (pid {proc.pid} on {socket.gethostname()}) is gone"
    assert "trial 0 failed (killed): its sweeper process" in result.stdout
    assert states(study) == [FAIL, COMPLETE, COMPLETE]  # the killed trial had no result: made up

    (sweep.dir / "optuna_study.json").unlink()
    again = sweep(*args, epochs=1)
    assert states(journal_study(sweep.dir)) == [FAIL, COMPLETE, COMPLETE] and "Launching" not in again.stdout
    (line,) = nothing_lines(again.stdout)
    assert line.endswith(f"[HYDRA] optuna study 'dnnlab' in {sweep.dir / 'optuna.journal'} already has 2 of "
                         "hydra.sweeper.n_trials=2 trials with a result: nothing to run (raise "
                         "hydra.sweeper.n_trials to add more)")
    assert [entry for entry in again.stdout.splitlines() if "[HYDRA]" in entry] == [line]  # the only log line
    assert (sweep.dir / "optuna_study.json").exists() and "optuna study dnnlab" in again.stdout  # and the table


def test_an_interrupted_trial_has_no_result_and_is_made_up(sweep):
    args = ["hydra.sweeper.sampler=random", "hydra.sweeper.seed=0", LR]
    sweep(*args, "hydra.sweeper.n_trials=1", epochs=1)
    proc = sweep.start(*args, "hydra.sweeper.n_trials=2", *ENDLESS, epochs=ENDLESS_EPOCHS)
    try:
        assert wait_running(proc, sweep.log, lambda: journal_study(sweep.dir)).number == 1
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        proc.wait(timeout=HANG_S)
    finally:
        kill(proc)
    study = journal_study(sweep.dir)
    assert states(study) == [COMPLETE, FAIL] and study.trials[1].user_attrs["status"] == "interrupted"

    result = sweep(*args, "hydra.sweeper.n_trials=2", epochs=1)
    assert states(journal_study(sweep.dir)) == [COMPLETE, FAIL, COMPLETE]
    assert "1 of hydra.sweeper.n_trials=2 trials with a result; " in result.stdout


def test_a_live_owner_is_spared_and_a_reused_pid_is_not_taken_for_its_owner(sweep):
    sweep.dir.mkdir(parents=True)
    study = optuna.create_study(study_name="dnnlab", storage=open_storage(str(sweep.dir / "optuna.journal")),
                                direction="minimize")
    live, reused = study.ask(), study.ask()
    me = owner_record()  # this test process: alive, on this host
    live.set_user_attr("owner", me)
    reused.set_user_attr("owner", {**me, "started": me["started"] - 1})  # the pid now names a later process

    result = sweep("hydra.sweeper.n_trials=2", LR, epochs=1)
    study = journal_study(sweep.dir)
    assert states(study) == [RUNNING, FAIL, COMPLETE]  # the live trial counts toward the 2: one more ran
    assert study.trials[1].user_attrs["status"] == "killed"
    assert "0 of hydra.sweeper.n_trials=2 trials with a result and 1 running elsewhere" in result.stdout
    assert "trial 1 failed (killed)" in result.stdout and "trial 0 failed" not in result.stdout


def test_a_killed_grid_point_is_tried_again_and_no_point_twice(sweep):
    space = ["optimizer=choice(adam, sgd)", "trainer.batch_size=range(32, 97, 64)"]
    params, _ = _space.parse(space)
    sweep.dir.mkdir(parents=True)
    study = optuna.create_study(study_name="dnnlab", storage=open_storage(str(sweep.dir / "optuna.journal")),
                                direction="minimize", sampler=optuna.samplers.GridSampler(_space.grid_space(params)))
    killed = study.ask({name: p.distribution for name, p in params.items()})  # the grid sampler's first point
    me = owner_record()
    killed.set_user_attr("owner", {**me, "started": me["started"] - 1})  # a sweeper that is gone

    sweep("hydra.sweeper.sampler=grid", "hydra.sweeper.n_trials=10", *space, epochs=1)
    study = journal_study(sweep.dir)
    assert states(study) == [FAIL] + [COMPLETE] * 4 and study.trials[0].user_attrs["status"] == "killed"
    points = sorted((t.params["optimizer"], t.params["trainer.batch_size"]) for t in study.trials[1:])
    assert points == [("adam", 32), ("adam", 96), ("sgd", 32), ("sgd", 96)]  # the killed one's point among them


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_killed_sweeper_stops_beating_and_optuna_fails_its_trial(sweep, tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    heartbeat = {"heartbeat_interval": 1, "grace_period": 5}
    args = [f"hydra.sweeper.storage={url}", "hydra.sweeper.n_trials=1", "hydra.sweeper.heartbeat_interval=1",
            "hydra.sweeper.grace_period=5", LR]

    def load() -> optuna.Study:
        return optuna.load_study(study_name="dnnlab", storage=open_storage(url, heartbeat=heartbeat))

    def check() -> list[TrialState]:  # Optuna's heartbeat check, as any process on any host may run it
        study = load()
        optuna.storages.fail_stale_trials(study)
        return states(study)

    proc = sweep.start(*args, *ENDLESS, epochs=ENDLESS_EPOCHS)
    try:
        wait_running(proc, sweep.log, load)
        time.sleep(7)  # longer than the grace period: the sweeper's heartbeats keep its trial alive
        assert check() == [RUNNING]
    finally:
        kill(proc)
    deadline = time.monotonic() + HANG_S  # no more heartbeats: the check fails the trial once the grace has passed
    while check() == [RUNNING] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert states(load()) == [FAIL] and "status" not in load().trials[0].user_attrs

    sweep(*args, epochs=1)
    assert states(load()) == [FAIL, COMPLETE]  # failed by the heartbeat check: no result, made up


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask() outside optimize(), as the sweeper does
def test_a_database_fails_a_silent_sweeper_elsewhere_and_spares_a_live_one(sweep, postgres_url):
    storage = open_storage(postgres_url, heartbeat={"heartbeat_interval": 1, "grace_period": 2})
    study = optuna.create_study(study_name="pg", storage=storage, direction="minimize")
    silent, live = study.ask(), study.ask()
    for trial, host in ((silent, "gone.example"), (live, "busy.example")):  # sweepers on other hosts
        trial.set_user_attr("owner", {"host": host, "pid": 4242, "started": 1})
        storage.record_heartbeat(trial._trial_id)
    stop = threading.Event()

    def beat() -> None:  # the busy host's sweeper is alive
        while not stop.wait(0.5):
            storage.record_heartbeat(live._trial_id)

    beating = threading.Thread(target=beat)
    beating.start()
    args = [f"hydra.sweeper.storage={postgres_url}", "hydra.sweeper.study_name=pg", "hydra.sweeper.n_trials=3",
            "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=2", LR]
    try:
        time.sleep(3)  # the silent trial's last heartbeat is past the grace period
        result = sweep(*args, epochs=1)
        assert states(optuna.load_study(study_name="pg", storage=storage)) == [FAIL, RUNNING, COMPLETE, COMPLETE]
    finally:
        stop.set()
        beating.join()
    assert "trial 0 failed (killed): its sweeper (pid 4242 on gone.example) sent no heartbeat for 2 s" in result.stdout
    assert "0 of hydra.sweeper.n_trials=3 trials with a result and 1 running elsewhere" in result.stdout

    study.tell(live, 0.5)  # the busy host's trial ends: the study has its 3
    again = sweep(*args, epochs=1)
    assert len(optuna.load_study(study_name="pg", storage=storage).trials) == 4
    assert len(nothing_lines(again.stdout)) == 1
    assert "already has 3 of hydra.sweeper.n_trials=3 trials with a result" in again.stdout


# (overrides, the setting as the error shows it, what is allowed): each ran, or failed every trial, or wrote the
# study before it was refused
REFUSALS = [
    (["hydra.sweeper.n_trials=0"], "n_trials=0", "an integer >= 1"),
    (["hydra.sweeper.n_trials=-3"], "n_trials=-3", "an integer >= 1"),
    (["hydra.sweeper.n_jobs=0"], "n_jobs=0", "an integer >= 1"),
    (["hydra.sweeper.sampler=bayes"], "sampler='bayes'", "tpe, random, grid"),
    (["hydra.sweeper.heartbeat_interval=0"], "heartbeat_interval=0", "an integer >= 1"),
    (["hydra.sweeper.grace_period=60"], "grace_period=60", "an integer > hydra.sweeper.heartbeat_interval"),
    (["hydra.sweeper.tpe.n_startup_trials=-1"], "tpe.n_startup_trials=-1", "an integer >= 0"),
    (["hydra.sweeper.pruner=median", "hydra.sweeper.median.n_startup_trials=-1"], "median.n_startup_trials=-1",
     "an integer >= 0"),
    (["hydra.sweeper.pruner=median", "hydra.sweeper.median.n_warmup_steps=-1"], "median.n_warmup_steps=-1",
     "an integer >= 0"),
    (["hydra.sweeper.pruner=median", "hydra.sweeper.median.interval_steps=0"], "median.interval_steps=0",
     "an integer >= 1"),
    (["hydra.sweeper.pruner=hyperband", "hydra.sweeper.hyperband.min_resource=0"], "hyperband.min_resource=0",
     "an integer >= 1"),
    (["hydra.sweeper.pruner=hyperband", "hydra.sweeper.hyperband.max_resource=1"], "hyperband.max_resource=1",
     "auto or an integer > min_resource"),
    (["hydra.sweeper.pruner=hyperband", "hydra.sweeper.hyperband.max_resource=abc"],
     "hyperband.max_resource='abc'", "auto or an integer > min_resource"),
    (["hydra.sweeper.pruner=hyperband", "hydra.sweeper.hyperband.reduction_factor=1"],
     "hyperband.reduction_factor=1", "an integer >= 2"),
]


@pytest.mark.parametrize("overrides, shown, allowed", REFUSALS, ids=[shown for _, shown, _ in REFUSALS])
def test_bad_sweeper_settings_are_refused_before_the_first_trial(sweep, overrides, shown, allowed):
    result = sweep(*overrides, LR, epochs=1, check=False)
    assert result.returncode == 2, result.stdout[-3000:]
    assert result.stderr.strip().splitlines() == [f"error: hydra.sweeper.{shown} is not allowed: {allowed}"]
    assert "Traceback" not in result.stdout + result.stderr
    assert not (sweep.dir / "optuna.journal").exists() and "Launching" not in result.stdout


def test_an_owner_in_another_pid_namespace_cannot_be_judged_and_one_from_an_earlier_boot_is_gone():
    """A container sharing this host name but not its process ids: its pid means nothing here (None, never reaped
    by this host's check). A record from before this machine booted: its process is gone, whatever its pid."""
    from dnnlab.trial import owner_alive, owner_record

    mine = owner_record()
    assert owner_alive(mine) is True
    assert owner_alive({**mine, "pid_namespace": "pid:[1]"}) is None
    assert owner_alive({**mine, "boot": "another-boot"}) is False
