"""The sweep: ask the study for a batch of trials, launch them as Hydra jobs, tell the study each job's result.

Each job gets the trial's parameter overrides, the fixed overrides, and a `trial` node (dnnlab/trial.py) through
which the run reports its validation metric every epoch to the same storage, so that the pruner can stop it.
Its result comes from <job dir>/summary.json: status completed -> COMPLETE with the metric's value; pruned ->
PRUNED; failed, diverged, a missing or non-finite value, a missing file or an exception -> FAIL. A failed trial
never stops the sweep.

hydra.sweeper.n_trials is the study's target count of trials with a result: COMPLETE, PRUNED, or FAIL from the run
itself (its hyperparameters failed or diverged). A trial that was interrupted (Ctrl-C) or killed has none and is
made up. Everything is stored as it happens: rerunning the command with the same storage and study name tops the
study up to n_trials, and once it is there runs nothing and says so. Trials RUNNING under another live sweeper
(workers sharing a study) count, recounted before each batch, so that the workers do not overshoot.

A killed sweeper (SIGKILL, a crash, a lost machine) leaves its trials RUNNING. Each trial records its owner (host,
pid, process start) when asked; on start-up and before each batch, a RUNNING trial whose owner on this host is gone
is failed with status "killed". On a database the sweeper also records Optuna heartbeats for its running trials,
and fail_stale_trials fails those of a sweeper on another host that stopped beating grace_period seconds ago.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import optuna
from hydra.core.utils import JobReturn, configure_log
from hydra.errors import CompactHydraException
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from dnnlab.trial import PRUNERS, is_url, make_pruner, open_storage, owner_alive, owner_record

from . import _space

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random", "grid")
DIRECTIONS = ("maximize", "minimize")
JOURNAL = "optuna.journal"
STUDY_FILE = "optuna_study.json"
NO_RESULT = ("interrupted", "killed")  # statuses of trials that ended without a result: the study makes them up


class SweepError(CompactHydraException):
    """A sweeper setting that cannot work (Hydra prints the message without a traceback)."""


def shown(storage: str) -> str:
    """The storage for logs and tables: a database URL without its password."""
    if not is_url(storage):
        return storage
    try:
        from sqlalchemy.engine import make_url

        return make_url(storage).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy knows: Optuna will say so
        return storage


def infer_direction(metric: str) -> str:
    if metric.endswith("acc") or metric.endswith("accuracy"):
        return "maximize"
    if metric.endswith("loss"):
        return "minimize"
    raise SweepError(f"cannot tell whether to maximize or minimize {metric!r}: set hydra.sweeper.direction")


def integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def at_least(low: int) -> tuple[Callable[[Any, Callable[[str], Any]], bool], str]:
    return (lambda value, setting: integer(value) and value >= low), f"an integer >= {low}"


# The settings checked before the study is opened, so that a bad one writes nothing: (key, whether a value is allowed
# given a lookup of the other settings, what is allowed), in order (a later row may rely on an earlier one). A key
# under tpe., median. or hyperband. is checked when that sampler or pruner is the one in use.
RULES: tuple[tuple[str, Callable[[Any, Callable[[str], Any]], bool], str], ...] = (
    ("sampler", lambda value, setting: value in SAMPLERS, ", ".join(SAMPLERS)),
    ("pruner", lambda value, setting: value in PRUNERS, ", ".join(PRUNERS)),
    ("n_trials", *at_least(1)),
    ("n_jobs", *at_least(1)),
    ("heartbeat_interval", *at_least(1)),
    ("grace_period", lambda value, setting: integer(value) and value > setting("heartbeat_interval"),
     "an integer > hydra.sweeper.heartbeat_interval"),
    ("tpe.n_startup_trials", *at_least(0)),
    ("median.n_startup_trials", *at_least(0)),
    ("median.n_warmup_steps", *at_least(0)),
    ("median.interval_steps", *at_least(1)),
    ("hyperband.min_resource", *at_least(1)),
    ("hyperband.max_resource", lambda value, setting: value == "auto" or (
        integer(value) and value > setting("hyperband.min_resource")), "auto or an integer > min_resource"),
    ("hyperband.reduction_factor", *at_least(2)),  # 1 would make every trial fail dividing by log(1)
)


def status_of(trial: FrozenTrial) -> str | None:
    """The status the sweeper told; a FAIL without one was failed by Optuna's heartbeat check: killed."""
    status = trial.user_attrs.get("status")
    return "killed" if status is None and trial.state == TrialState.FAIL else status


def has_result(trial: FrozenTrial) -> bool:
    """COMPLETE, PRUNED, or FAIL from the run itself: what its hyperparameters did."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and status_of(trial) not in NO_RESULT


def running_elsewhere(trial: FrozenTrial) -> bool:
    """RUNNING under an owner that may still run it (another worker); a trial with no owner record was left by
    something else, and is not counted."""
    owner = trial.user_attrs.get("owner")
    return trial.state == TrialState.RUNNING and isinstance(owner, dict) and owner_alive(owner) is not False


def told(study: optuna.Study, trial: optuna.trial.Trial | int, value: float | None, state: TrialState,
         skip_if_finished: bool = False) -> None:
    try:
        study.tell(trial, value, state=state, skip_if_finished=skip_if_finished)
    except RuntimeError as e:
        # the grid sampler calls study.stop() once its grid is done, which only works inside optimize(); the
        # trial's result is stored before that
        if "stop" not in str(e):
            raise


def params_text(params: Mapping[str, Any]) -> str:
    text = " ".join(f"{k}={_space.value_text(v)}" for k, v in params.items())
    return f" [{text}]" if text else ""


@dataclass
class Plan:
    """What every batch of the sweep needs, settled before the study is opened."""
    params: dict[str, _space.Param]
    fixed: list[str]
    metric: str
    direction: str
    use_return: bool
    sampler: str
    grid: dict | None
    pruner: dict
    storage: str
    n_trials: int
    n_jobs: int


class OptunaSweep:
    def __init__(self, settings: Mapping[str, Any], config: DictConfig, hydra_context: HydraContext,
                 launcher) -> None:
        self.s = settings  # the fields of config.DnnlabOptunaSweeperConf
        self.config, self.hydra_context, self.launcher = config, hydra_context, launcher
        self.sweep_dir = Path(config.hydra.sweep.dir).absolute()
        # one directory per trial, named by its number, unless the user configured hydra.sweep.subdir: trial
        # numbers are unique in the study, job numbers only in this process (two workers share a sweep dir)
        subdir = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir")
        self.subdir_by_trial = subdir == "${hydra.job.num}"
        self.subdirs: dict[int, str] = {}
        self.job_idx = 0
        self.storage: Any = None  # the Optuna storage, once open_study opened it

    # ---- settings -------------------------------------------------------------------------------------------
    def setting(self, key: str) -> Any:
        """A setting by its dotted key under hydra.sweeper (median.n_warmup_steps); None if absent."""
        node: Any = self.s
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) or OmegaConf.is_dict(node) else None
        return node

    def check_settings(self) -> None:
        """Refuse a setting that cannot work (RULES) before anything is written: one line naming key and value."""
        in_use = (self.setting("sampler"), self.setting("pruner"))
        for key, allowed, text in RULES:
            section = key.rpartition(".")[0]
            if section and section not in in_use:
                continue
            value = self.setting(key)
            if not allowed(value, self.setting):
                raise SweepError(f"hydra.sweeper.{key}={value!r} is not allowed: {text}")

    def search_space(self, arguments: Sequence[str]) -> tuple[dict[str, _space.Param], list[str]]:
        declared = _space.flatten(self.s.get("params"))
        typed = self.config.hydra.overrides.get("hydra", [])
        declared.update(_space.command_line_params(typed))
        texts = [_space.param_override(k, v) for k, v in declared.items()]
        return _space.parse(texts + list(arguments))

    def metric(self) -> tuple[str, str, bool]:
        """(metric, direction, use_return_value): by default the task's return value, the early-stopping monitor."""
        metric = self.s.get("metric")
        use_return = metric is None
        if use_return:
            metric = OmegaConf.select(self.config, "trainer.early_stopping.monitor", default=None) or "val_acc"
        direction = self.s.get("direction") or infer_direction(metric)
        if direction not in DIRECTIONS:
            raise SweepError(f"hydra.sweeper.direction={direction!r} is not allowed: maximize or minimize")
        return metric, direction, use_return

    def storage_text(self) -> str:
        storage = self.s.get("storage")
        if not storage:
            return str((self.sweep_dir / JOURNAL).absolute())
        if storage.startswith("sqlite:///") and storage[10:] and not storage[10:].startswith((":", "/")):
            return f"sqlite:///{Path(storage[10:]).absolute()}"  # the same file for runs in other directories
        if is_url(storage):
            return storage
        path = Path(storage).expanduser().absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        return str(path)

    def sampler(self, grid: dict | None, seed: int | None):
        name = self.s.get("sampler") or "tpe"
        if name == "tpe":
            tpe = self.s.get("tpe") or {}
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tpe.get("n_startup_trials", 10),
                                              multivariate=tpe.get("multivariate", False))
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "grid":
            return optuna.samplers.GridSampler(grid, seed=seed)
        raise SweepError(f"hydra.sweeper.sampler={name!r} is not allowed: {', '.join(SAMPLERS)}")

    def pruner_spec(self) -> dict:
        name = self.s.get("pruner") or "none"  # a known one: check_settings
        spec = {"name": name}
        if name != "none":
            spec.update(OmegaConf.to_container(self.s[name]) if OmegaConf.is_config(self.s[name]) else self.s[name])
        if name == "hyperband" and spec.get("max_resource") == "auto":
            epochs = OmegaConf.select(self.config, "trainer.epochs", default=None)
            if isinstance(epochs, int):  # a full trial's epochs (keras-tuner's max_epochs)
                spec["max_resource"] = epochs
        return spec

    # ---- the study ------------------------------------------------------------------------------------------
    def open_study(self, storage: str, metric: str, direction: str, grid: dict | None,
                   pruner: dict) -> optuna.Study:
        name, seed = self.s.get("study_name") or "dnnlab", self.s.get("seed")
        heartbeat = {"heartbeat_interval": self.s.get("heartbeat_interval"),
                     "grace_period": self.s.get("grace_period"), "heartbeat_stale_trial_callback": self.stale}
        try:
            self.storage = open_storage(storage, heartbeat=heartbeat)
            study = optuna.create_study(study_name=name, storage=self.storage, direction=direction,
                                        sampler=self.sampler(grid, seed), pruner=make_pruner(pruner),
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
            study.sampler = self.sampler(grid, seed + existing)
        return study

    # ---- killed sweepers and the target count ----------------------------------------------------------------
    def reap(self, study: optuna.Study) -> None:
        """Fail the RUNNING trials of a killed sweeper, so that none stays RUNNING forever and the study makes them
        up: on this host, those whose owner process is gone; on a database, those without a heartbeat for
        grace_period seconds (a sweeper on another host). A trial whose owner still runs is left alone."""
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = trial.user_attrs.get("owner")
            if not isinstance(owner, dict) or owner_alive(owner) is not False:
                continue
            reason = f"its sweeper process (pid {owner.get('pid')} on {owner.get('host')}) is gone"
            try:
                self.storage.set_trial_user_attr(trial._trial_id, "status", "killed")
                self.storage.set_trial_user_attr(trial._trial_id, "reason", reason)
                told(study, trial.number, None, TrialState.FAIL, skip_if_finished=True)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another sweeper starting up failed it first
            log.warning(f"trial {trial.number} failed (killed): {reason}{params_text(trial.params)}")
        if isinstance(self.storage, optuna.storages.RDBStorage):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # calls self.stale for each trial it failed

    def stale(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna's heartbeat check failed this trial: its status stays unset, which status_of reads as killed."""
        owner = trial.user_attrs.get("owner") or {}
        whose = f" (pid {owner.get('pid')} on {owner.get('host')})" if owner else ""
        log.warning(f"trial {trial.number} failed (killed): its sweeper{whose} sent no heartbeat for "
                    f"{self.s.get('grace_period')} s{params_text(trial.params)}")

    @contextlib.contextmanager
    def heartbeat(self, trial_ids: list[int]) -> Iterator[None]:
        """On a database, record a heartbeat for each trial now and every heartbeat_interval seconds while the
        block runs (the launcher runs the trials): a sweeper that dies stops beating."""
        if not isinstance(self.storage, optuna.storages.RDBStorage) or not trial_ids:
            yield
            return
        stop = threading.Event()

        def beat() -> None:
            while True:
                for trial_id in trial_ids:
                    try:
                        self.storage.record_heartbeat(trial_id)
                    except Exception as e:  # a lost connection: the next beat may get through, within the grace
                        log.warning(f"no heartbeat recorded for trial id {trial_id}: {type(e).__name__}: {e}")
                if stop.wait(self.storage.get_heartbeat_interval()):
                    return

        thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def tally(self, study: optuna.Study, grid: dict | None) -> tuple[int, int, set | None, list[tuple]]:
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

    def check_composes(self, overrides: Sequence[str]) -> str | None:
        """None if a job with these overrides composes, else the error (an unknown group option, a typo...)."""
        try:
            self.hydra_context.config_loader.load_sweep_config(master_config=self.config,
                                                               sweep_overrides=list(overrides))
        except Exception as e:
            return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        return None

    def subdir(self, trial: optuna.trial.Trial) -> str:
        """The trial's number; NUMBER-2, -3... if a run of another study (or of a deleted journal) is there already:
        dnnlab resumes a run directory that holds a checkpoint, and refuses one with another config."""
        name, k = str(trial.number), 1
        while (self.sweep_dir / name).exists():
            k += 1
            name = f"{trial.number}-{k}"
        self.subdirs[trial.number] = name
        return name

    def run_dir(self, trial: optuna.trial.Trial) -> Path | None:
        """Where the trial's job writes, when the sweeper chose it (else only its JobReturn knows)."""
        return self.sweep_dir / self.subdirs[trial.number] if trial.number in self.subdirs else None

    def job_overrides(self, trial: optuna.trial.Trial, params: dict, fixed: list[str], storage: str,
                      metric: str, direction: str, pruner: dict) -> list[str]:
        overrides = list(fixed) + [p.override(trial.params[name]) for name, p in params.items()]
        node = {"study": trial.study.study_name, "storage": storage, "number": trial.number, "metric": metric,
                "direction": direction}
        overrides += [f"++trial.{k}={_space.value_text(v)}" for k, v in node.items()]
        overrides.append(f"++trial.pruner={_space.value_text(pruner)}")
        if self.subdir_by_trial:
            overrides.append(f"hydra.sweep.subdir={_space.value_text(self.subdir(trial))}")
        return overrides

    def outcome(self, ret: JobReturn | None, run_dir: Path | None, metric: str,
                use_return: bool) -> tuple[TrialState, float | None, str, str | None]:
        """(state, value, status, reason) of a finished job, from its JobReturn (None: the launcher gave none)
        and <run_dir>/summary.json."""
        returned = None
        if ret is not None:
            try:
                returned = ret.return_value
            except Exception as e:  # the task raised: Hydra keeps the exception in the JobReturn
                return TrialState.FAIL, None, "failed", f"{type(e).__name__}: {e}"
            if ret.hydra_cfg is not None:
                run_dir = Path(ret.hydra_cfg.hydra.runtime.output_dir)
        if run_dir is None:
            return TrialState.FAIL, None, "failed", "no result from the launcher"
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except (OSError, ValueError) as e:
            return TrialState.FAIL, None, "failed", f"no readable summary.json in {run_dir}: {e}"
        status, reason = summary.get("status"), summary.get("reason")
        if status == "pruned":
            return TrialState.PRUNED, None, status, reason
        if status != "completed":
            return TrialState.FAIL, None, str(status), reason
        if use_return and ret is not None:
            value = returned
        elif metric in summary:  # also the task value when there is no JobReturn: it is summary[monitor]
            value = summary[metric]
        else:
            return TrialState.FAIL, None, "failed", f"summary.json has no {metric!r} (keys: {', '.join(summary)})"
        try:
            value = float(value)
        except (TypeError, ValueError):
            return TrialState.FAIL, None, "failed", f"{metric} is {value!r}, not a number"
        if not math.isfinite(value):
            return TrialState.FAIL, None, "failed", f"{metric} is {value}"
        return TrialState.COMPLETE, value, status, reason

    def tell(self, study: optuna.Study, trial: optuna.trial.Trial, state: TrialState, value: float | None,
             status: str, reason: str | None) -> None:
        try:
            trial.set_user_attr("status", status)
            if reason:
                trial.set_user_attr("reason", str(reason))
            told(study, trial, value if state == TrialState.COMPLETE else None, state)
        except optuna.exceptions.UpdateFinishedTrialError:  # another sweeper took this one for dead: its result
            log.warning(f"trial {trial.number} was failed by another sweeper meanwhile; its result ({status}) is "
                        "not recorded")
            return
        params = params_text(trial.params)
        if state == TrialState.COMPLETE:
            best = study.best_trial
            log.info(f"trial {trial.number}: {value:.6g}{params}; best: trial {best.number}, {best.value:.6g}")
        elif state == TrialState.PRUNED:
            log.info(f"trial {trial.number} pruned: {reason}{params}")
        else:
            log.warning(f"trial {trial.number} failed ({status}): {reason}{params}")

    # ---- the loop -------------------------------------------------------------------------------------------
    def run(self, arguments: Sequence[str]) -> list[Sequence[JobReturn]]:
        self.check_settings()
        plan = self.plan(arguments)  # every setting refused here leaves no sweep folder
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweeper logs one line per trial
        study = self.open_study(plan.storage, plan.metric, plan.direction, plan.grid, plan.pruner)
        self.job_idx = len(study.trials)  # job numbers continue a resumed study's
        self.reap(study)
        returns: list[Sequence[JobReturn]] = []
        if self.announce(study, plan):
            before = -1
            while True:  # recounted before each batch: workers sharing the study finish trials meanwhile
                results, running, left, tried = self.tally(study, plan.grid)
                size = min(plan.n_jobs, self.to_run(plan, results, running, left))
                if size < 1:
                    break
                if results == before:  # the count never falls: a batch without a result would repeat for ever
                    log.warning("no trial of the last batch got a result: the sweep stops")
                    break
                before = results
                batch = self.run_batch(study, plan, size, tried)
                if batch is not None:
                    returns.append(batch)
                self.reap(study)  # a worker beside this one may have been killed meanwhile
        self.report(study, plan)
        return returns

    def plan(self, arguments: Sequence[str]) -> Plan:
        params, fixed = self.search_space(arguments)
        metric, direction, use_return = self.metric()
        sampler = self.s.get("sampler") or "tpe"
        grid = _space.grid_space(params) if sampler == "grid" else None
        plan = Plan(params, fixed, metric, direction, use_return, sampler, grid, self.pruner_spec(),
                    self.storage_text(), int(self.s["n_trials"]), int(self.s["n_jobs"]))
        problem = self.check_composes(fixed)
        if problem:  # the fixed overrides fail for every trial: stop before the study records anything
            raise SweepError(f"the overrides do not compose: {problem}")
        return plan

    @staticmethod
    def to_run(plan: Plan, results: int, running: int, left: set | None) -> int:
        """Trials still to run toward n_trials, and no more than the grid points left."""
        wanted = plan.n_trials - results - running
        return max(0, wanted if left is None else min(wanted, len(left)))

    def announce(self, study: optuna.Study, plan: Plan) -> bool:
        """Log where the study stands and what this sweep does; False, in one line, when there is nothing to do."""
        results, running, left, _ = self.tally(study, plan.grid)
        where = f"optuna study {study.study_name!r} in {shown(plan.storage)}"
        counts = f"{results} of hydra.sweeper.n_trials={plan.n_trials} trials with a result"
        counts += f" and {running} running elsewhere" if running else ""
        to_run = self.to_run(plan, results, running, left)
        size = _space.grid_size(plan.grid) if plan.grid is not None else 0
        if not to_run:
            if left is not None and not left:
                why = f"every point of its {size}-point grid has a result" + (" or is running" if running else "")
            else:
                why = "raise hydra.sweeper.n_trials to add more"
            log.info(f"{where} already has {counts}: nothing to run ({why})")
            return False
        task = " (the task value)" if plan.use_return else ""
        grid = f"; grid: {len(left)} of {size} points left" if left is not None else ""
        log.info(f"{where}: {counts}; {plan.direction} {plan.metric}{task}; sampler {plan.sampler}, pruner "
                 f"{plan.pruner['name']}{grid}; {to_run} to run, {plan.n_jobs} at a time")
        for p in plan.params.values():
            log.info(f"  {p.name}: {p.distribution}")
        return True

    def run_batch(self, study: optuna.Study, plan: Plan, size: int,
                  tried: list[tuple]) -> Sequence[JobReturn] | None:
        """Ask `size` trials (grid points in `tried` first), launch those whose overrides compose, tell the study
        each one's result. None when no job was launched."""
        distributions = {name: p.distribution for name, p in plan.params.items()}
        trials = []
        with warnings.catch_warnings():  # Optuna says ask() with a heartbeat is for optimize(): this sweep beats
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            for i in range(size):
                if i < len(tried) and plan.grid is not None:  # the grid sampler would not try it again by itself
                    study.enqueue_trial(dict(zip(plan.grid, tried[i])))
                trials.append(study.ask(distributions))
                trials[-1].set_user_attr("owner", owner_record())  # at once: a kill from here on is told apart
        with self.heartbeat([t._trial_id for t in trials]):
            jobs, launched = [], []
            for trial in trials:
                overrides = self.job_overrides(trial, plan.params, plan.fixed, plan.storage, plan.metric,
                                               plan.direction, plan.pruner)
                trial.set_user_attr("overrides", [o for o in overrides if not o.startswith(("++trial.", "hydra."))])
                if self.run_dir(trial) is not None:  # known before the run starts: a running trial shows it too
                    trial.set_user_attr("output_dir", str(self.run_dir(trial)))
                problem = self.check_composes(overrides)
                if problem:
                    self.tell(study, trial, TrialState.FAIL, None, "failed", problem)
                else:
                    jobs.append(overrides)
                    launched.append(trial)
            if not jobs:
                return None
            results = self.launch(study, plan, jobs, launched)
            for i, trial in enumerate(launched):
                ret = results[i] if i < len(results) else None
                if ret is not None and ret.hydra_cfg is not None:  # a custom hydra.sweep.subdir: only Hydra knew
                    trial.set_user_attr("output_dir", str(ret.hydra_cfg.hydra.runtime.output_dir))
                self.tell(study, trial, *self.outcome(ret, self.run_dir(trial), plan.metric, plan.use_return))
        return results

    def launch(self, study: optuna.Study, plan: Plan, jobs: list[list[str]],
               launched: list[optuna.trial.Trial]) -> Sequence[JobReturn]:
        results: Sequence[JobReturn] = []
        try:
            results = self.launcher.launch(jobs, initial_job_idx=self.job_idx)
        except Exception as e:  # the launcher itself failed: what the runs wrote decides, the sweep goes on
            log.error(f"the launcher failed: {type(e).__name__}: {e}")
        except BaseException:  # Ctrl-C: record what finished, fail the rest: no trial stays RUNNING forever
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
            for trial in launched:
                state, value, status, reason = self.outcome(None, self.run_dir(trial), plan.metric, plan.use_return)
                if state == TrialState.FAIL and status == "failed":  # it had not started, or left nothing
                    status, reason = "interrupted", "the sweep was interrupted"
                self.tell(study, trial, state, value, status, reason)
            raise
        finally:
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)  # back from the jobs'
        self.job_idx += len(jobs)
        return results

    # ---- the end --------------------------------------------------------------------------------------------
    def report(self, study: optuna.Study, plan: Plan) -> None:
        from rich.console import Console
        from rich.table import Table

        storage, metric, direction = plan.storage, plan.metric, plan.direction
        trials = study.get_trials(deepcopy=False)
        counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
        results = sum(has_result(t) for t in trials)
        killed = sum(status_of(t) in NO_RESULT for t in trials)
        try:
            best = study.best_trial
        except ValueError:  # no trial completed
            best = None
        info = {
            "study_name": study.study_name, "storage": storage,
            "best_value": best.value if best else None, "best_params": best.params if best else None,
            "n_trials": len(trials), "with_result": results, "target": plan.n_trials,
            "direction": direction, "metric": metric,
            "best_trial": best.number if best else None,
            "best_output_dir": best.user_attrs.get("output_dir") if best else None,
            "states": {k: v for k, v in counts.items() if v},
            "sampler": self.s.get("sampler") or "tpe", "pruner": self.s.get("pruner") or "none",
        }
        (self.sweep_dir / STUDY_FILE).write_text(json.dumps(info, indent=2) + "\n")

        table = Table(title=f"optuna study {study.study_name}", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        table.add_row("storage", shown(storage))
        table.add_row("trials", ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "none")
        table.add_row("with a result", f"{results} of hydra.sweeper.n_trials={plan.n_trials}"
                      + (f" ({killed} interrupted or killed: not counted)" if killed else ""))
        if best is None:
            table.add_row("best", "no trial completed")
        else:
            table.add_row("best trial", str(best.number))
            table.add_row(f"{direction} {metric}", f"{best.value:.6g}")
            for k, v in best.params.items():
                table.add_row(f"  {k}", _space.value_text(v))
            if best.user_attrs.get("output_dir"):
                table.add_row("run", best.user_attrs["output_dir"])
        Console(soft_wrap=True).print(table)
