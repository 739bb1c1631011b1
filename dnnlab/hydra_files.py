"""Keep a reused run directory's .hydra/ files when the new command is refused, and remove the folder of a new
one: a refused command leaves the disk as it found it.

Hydra writes .hydra/config.yaml, hydra.yaml and overrides.yaml before the task starts, so a command with a bad
value, or with other overrides than the run already in that directory, would overwrite the record of that run
(which `dnnlab report` and resuming read) even though the task itself changes nothing. This callback reads the
files that are there before Hydra writes, and `restore` puts them back when the task refuses the job.
Hydra's own callback API has no hook before the files are written but on_run_start/on_multirun_start, which run
in the launching process: jobs that a launcher runs in other processes (joblib, submitit) are not covered. A
sweep's own multirun.yaml belongs to the latest sweep command and is not kept.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from dnnlab.checkpoint import atomic_write

_SAVED: dict[Path, dict[str, bytes]] = {}
_LOG_SIZES: dict[Path, dict[str, int]] = {}  # run directory -> its log files' sizes before Hydra appended
_CREATED: dict[Path, Path] = {}  # run directory -> the topmost folder that Hydra creates for it in this command


def _absolute(folder) -> Path:
    return Path(os.path.abspath(folder))


def _first_missing(folder: Path) -> Path | None:
    """The topmost folder on the way to `folder` that does not exist yet (None if `folder` exists)."""
    top = None
    while not os.path.lexists(folder) and folder != folder.parent:
        top, folder = folder, folder.parent
    return top


def _remember(run_dir: Path, subdir: str) -> None:
    folder = run_dir / subdir
    if folder.is_dir():
        _SAVED[_absolute(run_dir)] = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        _LOG_SIZES[_absolute(run_dir)] = {p.name: p.stat().st_size for p in run_dir.glob("*.log") if p.is_file()}


class KeepHydraFiles(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = _absolute(config.hydra.run.dir)
        top = _first_missing(run_dir)
        if top is not None:
            _CREATED[run_dir] = top
        if config.hydra.output_subdir is not None:
            _remember(Path(config.hydra.run.dir), config.hydra.output_subdir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if config.hydra.output_subdir is not None and sweep_dir.is_dir():
            for run_dir in sweep_dir.iterdir():
                _remember(run_dir, config.hydra.output_subdir)


def restore(run_dir: Path, subdir: str = ".hydra") -> bool:
    """Put back the files this run directory held before Hydra wrote its own, and cut its log back to where it
    ended (the refused command's lines go); False if it had none."""
    saved = _SAVED.pop(_absolute(run_dir), None)
    if saved is None:
        return False
    for name, data in saved.items():
        atomic_write(Path(run_dir) / subdir / name, data)
    for name, size in _LOG_SIZES.pop(_absolute(run_dir), {}).items():
        log = Path(run_dir) / name
        if log.is_file() and log.stat().st_size > size:
            os.truncate(log, size)
    return True


def discard_new(run_dir: Path, subdir: str = ".hydra") -> bool:
    """Remove the run directory this command created, when it holds only what Hydra wrote (the config files and
    the log), and the dated folders above it that the command created too, while they are empty; False if it
    existed before or holds anything else (a run's results are never removed)."""
    run_dir = _absolute(run_dir)
    top = _CREATED.pop(run_dir, None)
    if top is None or not run_dir.is_dir() or \
            not all(p.name == subdir or p.suffix == ".log" for p in run_dir.iterdir()):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    folder = run_dir.parent
    while folder != top.parent:  # the dated folders above it, bottom-up, while empty (another run may be there)
        try:
            folder.rmdir()
        except OSError:
            break
        folder = folder.parent
    return True


def started(run_dir: Path) -> None:
    """The task has checked everything and starts writing: from here an error is a failed run, whose folder, log
    and .hydra/ files stay as they are."""
    for saved in (_SAVED, _LOG_SIZES, _CREATED):
        saved.pop(_absolute(run_dir), None)
