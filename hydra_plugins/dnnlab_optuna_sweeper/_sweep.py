"""The sweep: ask the study for a batch of trials, launch them as Hydra jobs, tell the study each job's result.

Each job gets the trial's parameter overrides, the fixed overrides, and a `trial` node (dnnlab/trial.py) through
which the run reports its validation metric every epoch to the same storage, so that the pruner can stop it.
Its result comes from <job dir>/summary.json: status completed -> COMPLETE with the metric's value; pruned ->
PRUNED; failed, diverged, a missing or non-finite value, a missing file or an exception -> FAIL. A failed trial
never stops the sweep. Everything is stored as it happens: rerunning the command with the same storage and
study name continues the study with n_trials more trials.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import optuna
from hydra.core.utils import JobReturn, configure_log
from hydra.errors import CompactHydraException
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from dnnlab.trial import PRUNERS, is_url, make_pruner, open_storage

from . import _space

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random", "grid")
DIRECTIONS = ("maximize", "minimize")
JOURNAL = "optuna.journal"
STUDY_FILE = "optuna_study.json"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


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

    # ---- settings -------------------------------------------------------------------------------------------
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
        name = self.s.get("pruner") or "none"
        if name not in PRUNERS:
            raise SweepError(f"hydra.sweeper.pruner={name!r} is not allowed: {', '.join(PRUNERS)}")
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
        try:
            study = optuna.create_study(study_name=name, storage=open_storage(storage), direction=direction,
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
        trial.set_user_attr("status", status)
        if reason:
            trial.set_user_attr("reason", str(reason))
        try:
            study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        except RuntimeError as e:
            # the grid sampler calls study.stop() once its grid is done, which only works inside optimize();
            # the trial's result is stored before that
            if "stop" not in str(e):
                raise
        params = " ".join(f"{k}={_space.value_text(v)}" for k, v in trial.params.items())
        params = f" [{params}]" if params else ""
        if state == TrialState.COMPLETE:
            best = study.best_trial
            log.info(f"trial {trial.number}: {value:.6g}{params}; best: trial {best.number}, {best.value:.6g}")
        elif state == TrialState.PRUNED:
            log.info(f"trial {trial.number} pruned: {reason}{params}")
        else:
            log.warning(f"trial {trial.number} failed ({status}): {reason}{params}")

    # ---- the loop -------------------------------------------------------------------------------------------
    def run(self, arguments: Sequence[str]) -> list[Sequence[JobReturn]]:
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        params, fixed = self.search_space(arguments)
        metric, direction, use_return = self.metric()
        sampler = self.s.get("sampler") or "tpe"
        grid = _space.grid_space(params) if sampler == "grid" else None
        pruner = self.pruner_spec()
        storage = self.storage_text()
        n_jobs, n_trials = int(self.s.get("n_jobs") or 1), int(self.s.get("n_trials"))
        if n_jobs < 1:
            raise SweepError(f"hydra.sweeper.n_jobs={n_jobs} is not allowed: an integer >= 1")
        problem = self.check_composes(fixed)
        if problem:  # the fixed overrides fail for every trial: stop before the study records anything
            raise SweepError(f"the overrides do not compose: {problem}")

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweeper logs one line per trial
        study = self.open_study(storage, metric, direction, grid, pruner)
        existing = len(study.trials)
        log.info(f"optuna study {study.study_name!r} in {shown(storage)}: {existing} trials so far; "
                 f"{direction} {metric}{' (the task value)' if use_return else ''}; sampler {sampler}, pruner "
                 f"{pruner['name']}; {n_trials} more {'trial' if n_trials == 1 else 'trials'}, {n_jobs} at a time")
        for p in params.values():
            log.info(f"  {p.name}: {p.distribution}")
        if grid is not None:
            done = {tuple(t.params.get(k) for k in grid) for t in study.get_trials(deepcopy=False, states=FINISHED)}
            left = len(_space.grid_points(grid) - done)
            if left < n_trials:
                log.info(f"grid: {left} of {_space.grid_size(grid)} points left to try")
                n_trials = left
        self.job_idx = existing  # job numbers continue a resumed study's

        distributions = {name: p.distribution for name, p in params.items()}
        returns: list[Sequence[JobReturn]] = []
        while n_trials > 0:
            batch = min(n_jobs, n_trials)
            n_trials -= batch
            trials = [study.ask(distributions) for _ in range(batch)]
            jobs, launched = [], []
            for trial in trials:
                overrides = self.job_overrides(trial, params, fixed, storage, metric, direction, pruner)
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
                continue
            results: Sequence[JobReturn] = []
            try:
                results = self.launcher.launch(jobs, initial_job_idx=self.job_idx)
            except Exception as e:  # the launcher itself failed: what the runs wrote decides, the sweep goes on
                log.error(f"the launcher failed: {type(e).__name__}: {e}")
            except BaseException:  # Ctrl-C: record what finished, fail the rest: no trial stays RUNNING forever
                configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
                for trial in launched:
                    state, value, status, reason = self.outcome(None, self.run_dir(trial), metric, use_return)
                    if state == TrialState.FAIL and status == "failed":  # it had not started, or left nothing
                        status, reason = "interrupted", "the sweep was interrupted"
                    self.tell(study, trial, state, value, status, reason)
                raise
            finally:
                configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)  # back from the jobs'
            self.job_idx += len(jobs)
            returns.append(results)
            for i, trial in enumerate(launched):
                ret = results[i] if i < len(results) else None
                if ret is not None and ret.hydra_cfg is not None:  # a custom hydra.sweep.subdir: only Hydra knew
                    trial.set_user_attr("output_dir", str(ret.hydra_cfg.hydra.runtime.output_dir))
                self.tell(study, trial, *self.outcome(ret, self.run_dir(trial), metric, use_return))
        self.report(study, storage, metric, direction)
        return returns

    # ---- the end --------------------------------------------------------------------------------------------
    def report(self, study: optuna.Study, storage: str, metric: str, direction: str) -> None:
        from rich.console import Console
        from rich.table import Table

        trials = study.get_trials(deepcopy=False)
        counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
        try:
            best = study.best_trial
        except ValueError:  # no trial completed
            best = None
        info = {
            "study_name": study.study_name, "storage": storage,
            "best_value": best.value if best else None, "best_params": best.params if best else None,
            "n_trials": len(trials), "direction": direction, "metric": metric,
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
