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

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import optuna
from hydra.core.utils import JobReturn, configure_log
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from dnnlab.trial import owner_record

from . import _settings, _space, _study
from ._settings import Plan, SweepError, shown
from ._trials import NO_RESULT, has_result, outcome, status_of, tell

log = logging.getLogger(__name__)

STUDY_FILE = "optuna_study.json"


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
        self.storage: Any = None  # the Optuna storage, once _study.open_study opened it

    # ---- the jobs -------------------------------------------------------------------------------------------
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

    # ---- the loop -------------------------------------------------------------------------------------------
    def run(self, arguments: Sequence[str]) -> list[Sequence[JobReturn]]:
        _settings.check_settings(self.s)
        plan = self.plan(arguments)  # every setting refused here leaves no sweep folder
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweeper logs one line per trial
        study, self.storage = _study.open_study(self.s, plan.storage, plan.metric, plan.direction, plan.grid,
                                                plan.pruner)
        self.job_idx = len(study.trials)  # job numbers continue a resumed study's
        _study.reap(study, self.storage)
        returns: list[Sequence[JobReturn]] = []
        if self.announce(study, plan):
            before = -1
            while True:  # recounted before each batch: workers sharing the study finish trials meanwhile
                results, running, left, tried = _study.tally(study, plan.grid)
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
                _study.reap(study, self.storage)  # a worker beside this one may have been killed meanwhile
        self.report(study, plan)
        return returns

    def plan(self, arguments: Sequence[str]) -> Plan:
        plan = _settings.make_plan(self.s, self.config, self.sweep_dir, arguments)
        problem = self.check_composes(plan.fixed)
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
        results, running, left, _ = _study.tally(study, plan.grid)
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
        with _study.heartbeat(self.storage, [t._trial_id for t in trials]):
            jobs, launched = [], []
            for trial in trials:
                overrides = self.job_overrides(trial, plan.params, plan.fixed, plan.storage, plan.metric,
                                               plan.direction, plan.pruner)
                trial.set_user_attr("overrides", [o for o in overrides if not o.startswith(("++trial.", "hydra."))])
                if self.run_dir(trial) is not None:  # known before the run starts: a running trial shows it too
                    trial.set_user_attr("output_dir", str(self.run_dir(trial)))
                problem = self.check_composes(overrides)
                if problem:
                    tell(study, trial, TrialState.FAIL, None, "failed", problem)
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
                tell(study, trial, *outcome(ret, self.run_dir(trial), plan.metric, plan.use_return))
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
                state, value, status, reason = outcome(None, self.run_dir(trial), plan.metric, plan.use_return)
                if state == TrialState.FAIL and status == "failed":  # it had not started, or left nothing
                    status, reason = "interrupted", "the sweep was interrupted"
                tell(study, trial, state, value, status, reason)
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
