"""The study shared by every sweeper process: opening it, failing the trials a killed sweeper left RUNNING,
heartbeats for this sweeper's running trials, and the count of trials toward n_trials."""
from __future__ import annotations

import contextlib
import functools
import logging
import threading
import warnings
from typing import Any, Iterator, Mapping

import optuna
from optuna.trial import FrozenTrial, TrialState

from dnnlab.trial import make_pruner, open_storage, owner_alive

from . import _space
from ._settings import SAMPLERS, SweepError, shown
from ._trials import has_result, params_text, running_elsewhere, told

log = logging.getLogger(__name__)


def make_sampler(settings: Mapping[str, Any], grid: dict | None, seed: int | None):
    name = settings.get("sampler") or "tpe"
    if name == "tpe":
        tpe = settings.get("tpe") or {}
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tpe.get("n_startup_trials", 10),
                                          multivariate=tpe.get("multivariate", False))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(grid, seed=seed)
    raise SweepError(f"hydra.sweeper.sampler={name!r} is not allowed: {', '.join(SAMPLERS)}")


def open_study(settings: Mapping[str, Any], storage: str, metric: str, direction: str, grid: dict | None,
               pruner: dict) -> tuple[optuna.Study, Any]:
    """(the study, the Optuna storage it is in)."""
    name, seed = settings.get("study_name") or "dnnlab", settings.get("seed")
    heartbeat = {"heartbeat_interval": settings.get("heartbeat_interval"),
                 "grace_period": settings.get("grace_period"),
                 "heartbeat_stale_trial_callback": functools.partial(stale, settings.get("grace_period"))}
    try:
        opened = open_storage(storage, heartbeat=heartbeat)
        study = optuna.create_study(study_name=name, storage=opened, direction=direction,
                                    sampler=make_sampler(settings, grid, seed), pruner=make_pruner(pruner),
                                    load_if_exists=True)
    except SweepError:
        raise
    except Exception as e:
        raise SweepError(f"cannot open the optuna study {name!r} in {shown(storage)}: {type(e).__name__}: {e}")
    if study.direction.name.lower() != direction:
        raise SweepError(f"the study {name!r} in {shown(storage)} was created to "
                         f"{study.direction.name.lower()}; this sweep would {direction} (set "
                         f"hydra.sweeper.direction, or another hydra.sweeper.study_name)")
    known = study.user_attrs.get("metric")
    if known is None:
        study.set_user_attr("metric", metric)
    elif known != metric:
        raise SweepError(f"the study {name!r} in {shown(storage)} optimises {known}, not {metric} (set "
                         f"hydra.sweeper.metric={known}, or another hydra.sweeper.study_name)")
    existing = len(study.trials)
    if existing and seed is not None:  # a resumed seeded sampler must not replay the first run's draws
        study.sampler = make_sampler(settings, grid, seed + existing)
    return study, opened


def reap(study: optuna.Study, storage: Any) -> None:
    """Fail the RUNNING trials of a killed sweeper, so that none stays RUNNING forever and the study makes them
    up: on this host, those whose owner process is gone; on a database, those without a heartbeat for
    grace_period seconds (a sweeper on another host). A trial whose owner still runs is left alone."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("owner")
        if not isinstance(owner, dict) or owner_alive(owner) is not False:
            continue
        reason = f"its sweeper process (pid {owner.get('pid')} on {owner.get('host')}) is gone"
        try:
            storage.set_trial_user_attr(trial._trial_id, "status", "killed")
            storage.set_trial_user_attr(trial._trial_id, "reason", reason)
            told(study, trial.number, None, TrialState.FAIL, skip_if_finished=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another sweeper starting up failed it first
        log.warning(f"trial {trial.number} failed (killed): {reason}{params_text(trial.params)}")
    if isinstance(storage, optuna.storages.RDBStorage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # calls stale for each trial it failed


def stale(grace_period: Any, study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna's heartbeat check failed this trial: its status stays unset, which status_of reads as killed."""
    owner = trial.user_attrs.get("owner") or {}
    whose = f" (pid {owner.get('pid')} on {owner.get('host')})" if owner else ""
    log.warning(f"trial {trial.number} failed (killed): its sweeper{whose} sent no heartbeat for "
                f"{grace_period} s{params_text(trial.params)}")


@contextlib.contextmanager
def heartbeat(storage: Any, trial_ids: list[int]) -> Iterator[None]:
    """On a database, record a heartbeat for each trial now and every heartbeat_interval seconds while the
    block runs (the launcher runs the trials): a sweeper that dies stops beating."""
    if not isinstance(storage, optuna.storages.RDBStorage) or not trial_ids:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            for trial_id in trial_ids:
                try:
                    storage.record_heartbeat(trial_id)
                except Exception as e:  # a lost connection: the next beat may get through, within the grace
                    log.warning(f"no heartbeat recorded for trial id {trial_id}: {type(e).__name__}: {e}")
            if stop.wait(storage.get_heartbeat_interval()):
                return

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def tally(study: optuna.Study, grid: dict | None) -> tuple[int, int, set | None, list[tuple]]:
    """(trials with a result, trials running elsewhere, the grid points neither covers (None: no grid), those
    of them a trial without a result tried: the grid sampler counts them as visited, so they are enqueued)."""
    trials = study.get_trials(deepcopy=False)
    results = sum(has_result(t) for t in trials)
    running = sum(running_elsewhere(t) for t in trials)
    if grid is None:
        return results, running, None, []

    def point(t: FrozenTrial) -> tuple:
        return tuple(t.params.get(k) for k in grid)

    left = _space.grid_points(grid) - {point(t) for t in trials if has_result(t) or running_elsewhere(t)}
    tried = left & {point(t) for t in trials}
    return results, running, left, sorted(tried, key=repr)
