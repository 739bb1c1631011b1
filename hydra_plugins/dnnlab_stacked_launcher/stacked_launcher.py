"""A Hydra launcher that trains compatible jobs together (dnnlab.stacked) and every other job one at a time.

For a stack, each job's setup mirrors what Hydra's `run_job` does for one job: its run directory under
hydra.sweep.dir, the .hydra/ files (config.yaml, hydra.yaml, overrides.yaml), its log file, the callbacks'
on_job_start/on_job_end and a JobReturn; only the training happens once for the whole stack. Jobs that cannot be
stacked (and sweeps of other apps) go through `run_job` unchanged, exactly as with the basic launcher.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import logging
import math
import os
from pathlib import Path
from typing import List, Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import (
    JobReturn,
    JobRuntime,
    JobStatus,
    _save_config,
    configure_log,
    env_override,
    filter_overrides,
    run_job,
    setup_globals,
)
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)


class _JobFilter(logging.Filter):
    """Lets through the records of one job of the stack (extra={"job": k}) and the records of no job in particular."""

    def __init__(self, position: int):
        super().__init__()
        self.position = position

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "job", self.position) == self.position


class _KeepValidated:
    """Hydra's config loader, keeping a copy of each job config that the sweeper composes to check a batch
    (Sweeper.validate_batch_is_legal) for launch() to take instead of composing the job again: the same master config
    and overrides compose to the same config, and each compose costs about 0.15 s (Hydra reads every YAML file
    again), 1.2 s for a stack of 8 jobs. Every other attribute is the loader's own."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.kept: dict[tuple[str, ...], tuple[DictConfig, DictConfig]] = {}

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: List[str]) -> DictConfig:
        config = self.loader.load_sweep_config(master_config, sweep_overrides)
        self.kept[tuple(sweep_overrides)] = (master_config, copy.deepcopy(config))
        return config

    def take(self, master_config: DictConfig, overrides: List[str]) -> DictConfig:
        """The job's config: the copy kept from the sweeper's check, else composed now."""
        master, config = self.kept.pop(tuple(overrides), (None, None))
        return config if master is master_config else self.loader.load_sweep_config(master_config, overrides)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)


class StackedLauncher(Launcher):
    def __init__(self, max_group: Optional[int] = None, min_group: int = 2, cpu: str = "processes") -> None:
        super().__init__()
        self.max_group, self.min_group, self.cpu = max_group, min_group, cpu
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        if not isinstance(hydra_context.config_loader, _KeepValidated):  # the sweeper's context too: it validates
            hydra_context.config_loader = _KeepValidated(hydra_context.config_loader)

    @property
    def loader(self) -> _KeepValidated:
        assert self.hydra_context is not None and isinstance(self.hydra_context.config_loader, _KeepValidated)
        return self.hydra_context.config_loader

    # ----------------------------------------------------------------------------------------------------- launch
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)

        configs = []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            sweep_config = self.loader.take(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            configs.append(sweep_config)

        cores = self._cores_for_processes(configs)
        handed = cores and self._hand_to_joblib(job_overrides, initial_job_idx, min(cores, len(configs)))
        if handed:
            return handed
        groups = self._plan(configs)
        stacks = [g for g in groups if len(g) > 1]
        log.info(f"Launching {len(configs)} jobs locally: {sum(map(len, stacks))} in {len(stacks)} stack(s), "
                 f"{len(groups) - len(stacks)} one at a time")
        runs: List[Optional[JobReturn]] = [None] * len(configs)
        for group in groups:
            for i in group:
                lst = " ".join(filter_overrides(job_overrides[i]))
                tag = f" (stack of {len(group)})" if len(group) > 1 else ""
                log.info(f"\t#{initial_job_idx + i} : {lst}{tag}")
            if len(group) == 1:
                i = group[0]
                runs[i] = run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                                  config=configs[i], job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
            else:
                for i, ret in zip(group, self._run_stack([configs[i] for i in group])):
                    runs[i] = ret
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return runs  # type: ignore[return-value]

    # ----------------------------------------------------------------------------------------- on the CPU
    def _cores_for_processes(self, configs: list[DictConfig]) -> int:
        """The cores to hand the sweep to Hydra's joblib launcher with (0: stack it). On the CPU, with more than one
        core, process parallelism trains a sweep faster than a stack (docs/performance.md), and each job exactly
        as alone; cpu=stack keeps the stack there too."""
        if self.cpu != "processes" or len(configs) < 2 or any(c.hydra.job.name != "train" for c in configs):
            return 0
        import torch

        devices = {str(OmegaConf.select(c, "trainer.device")) for c in configs}
        if devices != {"cpu"} and not (devices <= {"cpu", "auto"} and not torch.cuda.is_available()):
            return 0
        cores = len(os.sched_getaffinity(0))
        if cores > 1 and importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is None:
            log.info("cpu=processes needs Hydra's joblib launcher (pip install 'dnnlab[joblib]'): stacking instead")
            return 0
        return cores if cores > 1 else 0

    def _hand_to_joblib(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int,
                        n_jobs: int) -> Sequence[JobReturn] | None:
        """The sweep as `hydra/launcher=joblib hydra.launcher.n_jobs=N` runs it: every job composed with that
        launcher (so each takes its share of the cores, and .hydra/hydra.yaml says what ran). None where a job does
        not compose so (a config that sets the stacked launcher's own keys): then it is stacked."""
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        from hydra_plugins.hydra_joblib_launcher.config import JobLibLauncherConf
        from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher

        assert self.config is not None and self.hydra_context is not None
        config = copy.deepcopy(self.config)
        with read_write(config), open_dict(config):
            kept = [o for o in config.hydra.overrides.hydra
                    if not o.lstrip("+~").startswith(("hydra/launcher=", "hydra.launcher."))]
            config.hydra.overrides.hydra = kept + ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}"]
        try:  # as each worker will compose its job
            self.loader.loader.load_sweep_config(config, list(job_overrides[0]))
        except (HydraException, OmegaConfBaseException) as e:
            log.info(f"hydra/launcher=stacked: the jobs do not compose with the joblib launcher ({e}): stacking")
            return None
        log.info(f"hydra/launcher=stacked on the CPU: handing the {len(job_overrides)} jobs to hydra/launcher=joblib "
                 f"(n_jobs={n_jobs}): on a CPU which of the two is faster depends on the machine, and joblib trains each "
                 "job as alone (hydra.launcher.cpu=stack to stack)")
        settings = dataclasses.asdict(JobLibLauncherConf(n_jobs=n_jobs))
        del settings["_target_"]
        launcher = JoblibLauncher(**settings)
        # the loader itself, not the wrapper that keeps the sweeper's configs: it travels to the worker processes
        context = HydraContext(config_loader=self.loader.loader, callbacks=self.hydra_context.callbacks)
        launcher.setup(hydra_context=context, task_function=self.task_function, config=config)
        return launcher.launch(job_overrides, initial_job_idx)

    def _plan(self, configs: list[DictConfig]) -> list[list[int]]:
        """Stacks of compatible jobs and single jobs, in job order. Only `dnnlab train` jobs are stacked."""
        import json

        task_cfgs, alone = [], set()
        for i, config in enumerate(configs):
            hydra = config.hydra
            run_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir"))) / str(
                OmegaConf.select(config, "hydra.sweep.subdir"))
            if hydra.job.name != "train" or hydra.job.chdir or (run_dir / "checkpoints" / "last.pt").exists():
                alone.add(i)  # another app, jobs that each need their own working directory, or a run to resume
            task = copy.deepcopy(config)
            with read_write(task), open_dict(task):
                del task["hydra"]
            task_cfgs.append(task)
        try:
            from dnnlab.stacked import plan
        except ImportError:
            return [[i] for i in range(len(configs))]
        env = [json.dumps(OmegaConf.to_container(c.hydra.job.env_set, resolve=True), sort_keys=True) for c in configs]
        out = []
        for group in plan(task_cfgs, self.max_group, self.min_group):
            members = [i for i in group if i not in alone]
            out += [[i] for i in group if i in alone]
            by_env: dict[str, list[int]] = {}
            for i in members:
                by_env.setdefault(env[i], []).append(i)
            for chunk in by_env.values():
                out += [chunk] if len(chunk) >= max(self.min_group, 2) else [[i] for i in chunk]
        return sorted(out, key=lambda g: g[0])

    # ------------------------------------------------------------------------------------------------ one stack
    def _prepare(self, config: DictConfig) -> tuple[JobReturn, DictConfig, Path]:
        """What run_job does before calling the task: the run directory, the Hydra config, the .hydra files."""
        HydraConfig.instance().set_config(config)
        output_dir = os.path.join(str(OmegaConf.select(config, "hydra.sweep.dir")),
                                  str(OmegaConf.select(config, "hydra.sweep.subdir")))
        with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
            config.hydra.runtime.output_dir = os.path.abspath(output_dir)
        HydraConfig.instance().set_config(config)
        ret = JobReturn()
        task_cfg = copy.deepcopy(config)
        with read_write(task_cfg), open_dict(task_cfg):
            del task_cfg["hydra"]
        ret.cfg = task_cfg
        ret.hydra_cfg = copy.deepcopy(HydraConfig.instance().cfg)
        ret.overrides = OmegaConf.to_container(config.hydra.overrides.task)
        ret.working_dir = os.getcwd()
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        if config.hydra.output_subdir is not None:
            hydra_output = Path(config.hydra.runtime.output_dir) / Path(config.hydra.output_subdir)
            _save_config(task_cfg, "config.yaml", hydra_output)
            _save_config(ret.hydra_cfg, "hydra.yaml", hydra_output)
            _save_config(config.hydra.overrides.task, "overrides.yaml", hydra_output)
        return ret, task_cfg, Path(config.hydra.runtime.output_dir)

    def _log_files(self, configs: list[DictConfig], run_dirs: list[Path]) -> list[logging.Handler]:
        """The console as a job's logging config sets it up, and each job's own log file (train.log): the
        records of its job and those of the whole stack (such as where the data came from)."""
        job_logging = copy.deepcopy(configs[0].hydra.job_logging)
        fmt = OmegaConf.select(job_logging, "formatters.simple.format") or \
            "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
        with read_write(job_logging), open_dict(job_logging):
            if OmegaConf.select(job_logging, "handlers.file") is not None:  # one file per job instead, below
                del job_logging.handlers["file"]
                if OmegaConf.select(job_logging, "root.handlers") is not None:
                    job_logging.root.handlers = [h for h in job_logging.root.handlers if h != "file"]
        configure_log(job_logging, configs[0].hydra.verbose)
        handlers = []
        target = logging.getLogger("dnnlab")
        for k, (config, run_dir) in enumerate(zip(configs, run_dirs)):
            handler = logging.FileHandler(run_dir / f"{config.hydra.job.name}.log")
            handler.setFormatter(logging.Formatter(fmt))
            handler.addFilter(_JobFilter(k))
            target.addHandler(handler)
            handlers.append(handler)
        if target.getEffectiveLevel() > logging.INFO:
            target.setLevel(logging.INFO)
        return handlers

    def _run_stack(self, configs: list[DictConfig]) -> list[JobReturn]:
        from dnnlab.errors import DnnlabError
        from dnnlab.record import write_json
        from dnnlab.stacked import train_group
        from dnnlab.train import objective
        from dnnlab.ui import error

        assert self.hydra_context is not None
        callbacks = self.hydra_context.callbacks
        orig_hydra_cfg = HydraConfig.instance().cfg
        prepared = [self._prepare(config) for config in configs]
        rets, task_cfgs, run_dirs = (list(x) for x in zip(*prepared))
        for ret in rets:
            ret.task_name = JobRuntime.instance().get("name")
        handlers = self._log_files(configs, run_dirs)
        dnnlab_log = logging.getLogger("dnnlab")
        loggers = [logging.LoggerAdapter(dnnlab_log, {"job": k}) for k in range(len(configs))]
        try:
            HydraConfig.instance().set_config(configs[0])
            for config in configs:
                callbacks.on_job_start(config=config, task_function=self.task_function)
            with env_override(configs[0].hydra.job.env_set):
                try:
                    summaries = train_group(task_cfgs, run_dirs, loggers)
                except DnnlabError as e:  # as run_task does in a sweep: record every job as failed, go on
                    error(str(e))
                    for run_dir in run_dirs:
                        write_json(run_dir / "summary.json", {"status": "failed", "reason": str(e)})
                    summaries = [None] * len(configs)
                except Exception as e:  # noqa: BLE001 - as run_job: the sweeper re-raises it
                    summaries = [e] * len(configs)
            for ret, summary in zip(rets, summaries):
                if isinstance(summary, Exception):
                    ret.return_value, ret.status = summary, JobStatus.FAILED
                    continue
                if summary is not None and summary["status"] == "diverged":
                    error(f"diverged at {summary['reason']}; try a lower optimizer.lr, trainer.clip_norm=1.0 or "
                          "another init")
                ret.return_value = math.nan if summary is None else objective(summary)
                ret.status = JobStatus.COMPLETED
            for handler in handlers:
                handler.flush()
            for config, ret in zip(configs, rets):
                callbacks.on_job_end(config=config, job_return=ret)
            return rets
        finally:
            for handler in handlers:
                dnnlab_log.removeHandler(handler)
                handler.close()
            HydraConfig.instance().cfg = orig_hydra_cfg
