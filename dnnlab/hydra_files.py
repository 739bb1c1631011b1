"""Keep a reused run directory's .hydra/ files when the new command is refused.

Hydra writes .hydra/config.yaml, hydra.yaml and overrides.yaml before the task starts, so a command with a bad
value, or with other overrides than the run already in that directory, would overwrite the record of that run
(which `dnnlab report` and resuming read) even though the task itself changes nothing. This callback reads the
files that are there before Hydra writes, and `restore` puts them back when the task refuses the job.
Hydra's own callback API has no hook before the files are written but on_run_start/on_multirun_start, which run
in the launching process: jobs that a launcher runs in other processes (joblib, submitit) are not covered. A
sweep's own multirun.yaml belongs to the latest sweep command and is not kept.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from dnnlab.checkpoint import atomic_write

_SAVED: dict[Path, dict[str, bytes]] = {}


def _remember(run_dir: Path, subdir: str) -> None:
    folder = run_dir / subdir
    if folder.is_dir():
        _SAVED[run_dir.resolve()] = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


class KeepHydraFiles(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.output_subdir is not None:
            _remember(Path(config.hydra.run.dir), config.hydra.output_subdir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if config.hydra.output_subdir is not None and sweep_dir.is_dir():
            for run_dir in sweep_dir.iterdir():
                _remember(run_dir, config.hydra.output_subdir)


def restore(run_dir: Path, subdir: str = ".hydra") -> bool:
    """Put back the files this run directory held before Hydra wrote its own; False if it had none."""
    saved = _SAVED.pop(Path(run_dir).resolve(), None)
    if saved is None:
        return False
    for name, data in saved.items():
        atomic_write(Path(run_dir) / subdir / name, data)
    return True
