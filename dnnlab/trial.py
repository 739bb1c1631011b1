"""A run that is one trial of an Optuna study: report the validation metric every epoch, stop when pruned.

The Optuna sweeper (hydra/sweeper=optuna, hydra_plugins/dnnlab_optuna_sweeper) adds a `trial` node to each job:
    trial.study       the study's name
    trial.storage     a journal file path or a database URL (see open_storage)
    trial.number      the trial's number in the study
    trial.metric      the metric the study optimises (a summary.json key: val_acc, val_loss, test_acc, ...)
    trial.direction   maximize or minimize
    trial.pruner      {name: none|median|hyperband, ...its options} (see make_pruner)
train() calls reporter(cfg.trial) once, then the returned function with every epoch's row; the function raises
Pruned when the study's pruner stops the trial. The sweeper itself tells the study the run's final result.

The sweeper owns the trials it asks: each records its owner (owner_record: host, pid, process start), so that a
later sweep can tell a trial of a killed sweeper (owner_alive False) from one that another worker is running.
"""
from __future__ import annotations

import importlib.util
import math
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

from dnnlab import extras
from dnnlab.errors import DnnlabError, Pruned

EPOCH_METRICS = ("val_acc", "val_loss", "train_acc", "train_loss")  # the columns of every epoch's row
PRUNERS = ("none", "median", "hyperband")


def is_url(storage: str) -> bool:
    return "://" in storage


def database_url(url: str) -> str:
    """postgresql://... means SQLAlchemy's default PostgreSQL driver: psycopg (3) since SQLAlchemy 2.1, psycopg2
    before; use psycopg2 (the postgres extra installs psycopg2-binary) when psycopg is not installed."""
    scheme, _, rest = url.partition("://")
    if scheme == "postgresql" and importlib.util.find_spec("psycopg") is None:
        extras.need("a postgresql:// storage", ("psycopg2",), "postgres")
        return f"postgresql+psycopg2://{rest}"
    return url


def open_storage(storage: str, pooled: bool = True, heartbeat: Mapping[str, Any] | None = None):
    """An Optuna storage from its text: a database URL (sqlite:///study.db, postgresql://user:pw@host/db,
    mysql+pymysql://...) or else a journal file path (Optuna's JournalStorage: an append-only log that several
    processes may share, with a lock file beside it). pooled=False: a database connection per access, none kept
    open (a run reports once an epoch; runs launched in the sweeper's process would otherwise pile up pools).
    heartbeat: RDBStorage's heartbeat_interval, grace_period, heartbeat_stale_trial_callback, for the sweeper
    (which owns the trials); a journal has no heartbeat."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

    if is_url(storage):
        from sqlalchemy.pool import NullPool

        kwargs = {"pool_pre_ping": True} if pooled else {"poolclass": NullPool}
        with warnings.catch_warnings():  # Optuna marks heartbeat_interval experimental, on every open
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(database_url(storage), engine_kwargs=kwargs, **(heartbeat or {}))
    path = os.path.abspath(os.path.expanduser(storage))
    lock = JournalFileOpenLock(path) if os.name == "nt" else None  # None: the default symlink lock (POSIX)
    return JournalStorage(JournalFileBackend(path, lock_obj=lock))


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot, /proc/PID/stat field 22); None if no process has that
    pid (a zombie is gone too) or there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()  # fields 3, 4...: the name before them may hold spaces and ")"
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def machine_identity() -> dict:
    """This process id namespace and this boot: containers that share a host name but not their process ids
    cannot see each other's processes, and a process of an earlier boot is gone."""
    found = {}
    for key, read in (("boot", lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip()),
                      ("pid_namespace", lambda: os.readlink("/proc/self/ns/pid"))):
        try:
            found[key] = read()
        except OSError:
            found[key] = ""
    return found


def owner_record() -> dict:
    """This process as the owner of a trial; its start time tells it from a later process given the same pid."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": process_start(os.getpid()),
            **machine_identity()}


def owner_alive(owner: Mapping[str, Any]) -> bool | None:
    """Whether the process of an owner record still runs; None where this process cannot tell (another host)."""
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0 or os.name == "nt":
        return None  # on Windows os.kill(pid, 0) would terminate the process
    here = machine_identity()
    if owner.get("pid_namespace", here["pid_namespace"]) != here["pid_namespace"]:
        return None  # another container of the same name: its processes are not ours to see
    if owner.get("boot", here["boot"]) != here["boot"]:
        return False  # started before this machine last booted
    if os.path.exists("/proc/self/stat"):
        started = process_start(pid)
        return started is not None and owner.get("started") in (None, started)
    try:
        os.kill(pid, 0)  # signal 0: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    except OSError:
        return None
    return True


def make_pruner(spec: Mapping[str, Any] | None):
    """{name: none} -> NopPruner; {name: median, n_startup_trials, n_warmup_steps, interval_steps} -> MedianPruner;
    {name: hyperband, min_resource, max_resource, reduction_factor} -> HyperbandPruner."""
    import optuna

    options = dict(spec or {})
    name = options.pop("name", "none") or "none"
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(**options)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(**options)
    raise DnnlabError(f"pruner={name!r} is not allowed: {', '.join(PRUNERS)}")


def reported_metric(metric: str, direction: str) -> str:
    """The per-epoch column reported to the pruner: the study's metric if every epoch has it (val_acc...), else
    the validation column of the same direction (test_acc is only known at the end: report val_acc)."""
    if metric in EPOCH_METRICS:
        return metric
    return "val_acc" if direction == "maximize" else "val_loss"


def reporter(trial_cfg: Mapping[str, Any]) -> Callable[[dict], None]:
    """report(row): record row[metric] as the trial's value at step row["epoch"]; raise Pruned if the pruner says so."""
    import optuna

    name, number = trial_cfg["study"], int(trial_cfg["number"])
    pruner_spec = trial_cfg.get("pruner") or {}
    pruner_name = pruner_spec.get("name", "none")
    try:
        storage = open_storage(str(trial_cfg["storage"]), pooled=False)
        trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(name), number)
        study = optuna.load_study(study_name=name, storage=storage, pruner=make_pruner(pruner_spec),
                                  sampler=optuna.samplers.RandomSampler())
        trial = optuna.trial.Trial(study, trial_id)  # the running trial, asked by the sweeper
    except (KeyError, ValueError, OSError, ImportError, optuna.exceptions.OptunaError) as e:
        raise DnnlabError(f"cannot open trial {number} of the optuna study {name!r}: {type(e).__name__}: {e}") from e
    key = reported_metric(str(trial_cfg["metric"]), str(trial_cfg.get("direction") or "minimize"))

    def report(row: dict) -> None:
        value, epoch = row[key], int(row["epoch"])
        if value is None or not math.isfinite(value):
            return  # nothing to compare; a diverging run ends by itself and the sweeper marks it failed
        trial.report(float(value), epoch)
        if pruner_name != "none" and trial.should_prune():
            raise Pruned(f"the {pruner_name} pruner stopped trial {number} at epoch {epoch} ({key} {value:.4f})")

    return report
