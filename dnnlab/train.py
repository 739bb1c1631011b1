"""`dnnlab train`: the Hydra application. A run's training is dnnlab.trainer's; this module is what Hydra calls,
and how a job's outcome becomes an exit status or a sweep's recorded failure."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from dnnlab import CONF_DIR, conf_dirs, hydra_files  # noqa: F401  conf_dirs: what composing needs
from dnnlab.errors import DnnlabError
from dnnlab.record import write_json
from dnnlab.trainer import train
from dnnlab.ui import error


def parallel_jobs() -> int:
    """How many jobs the Hydra launcher runs at once (n_jobs of the joblib launcher; 1 otherwise)."""
    n = HydraConfig.get().launcher.get("n_jobs")
    return 1 if n is None else (os.cpu_count() or 1) if n < 0 else n


def objective(summary: dict) -> float:
    """The value a Hydra sweeper optimises: the monitored metric at the best epoch (NaN if the run failed)."""
    value = summary.get(summary.get("monitor") or "val_acc")
    return math.nan if value is None or summary["status"] != "completed" else value


def run_task(job, cfg: DictConfig) -> float:
    """Run `job(cfg, run_dir, parallel_jobs)` as a Hydra task: bad input is one line and exit 2 (a recorded failure
    in a sweep, which goes on)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        summary = job(cfg, run_dir, parallel_jobs())
    except DnnlabError as e:
        error(str(e))
        hydra_files.restore(run_dir, HydraConfig.get().output_subdir or ".hydra")
        if not multirun:
            hydra_files.discard_new(run_dir, HydraConfig.get().output_subdir or ".hydra")  # no empty run folder
        else:  # record the failed job (unless the directory holds an earlier run's) and go on
            if not (run_dir / "summary.json").exists():
                write_json(run_dir / "summary.json", {"status": "failed", "reason": str(e)})
            return math.nan
        sys.exit(2)
    if summary["status"] == "interrupted":
        error(f"interrupted ({summary['reason']}); last.pt holds the position: run the same command again to resume")
        sys.exit(130)
    if summary["status"] == "diverged":
        error(f"diverged at {summary['reason']}; try a lower optimizer.lr, trainer.clip_norm=1.0 or another init")
        if not multirun:
            sys.exit(3)
    return objective(summary)


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    return run_task(train, cfg)
