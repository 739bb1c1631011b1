"""The sweeper's configuration, registered with Hydra as hydra/sweeper=optuna.

    dnnlab train -m hydra/sweeper=optuna hydra.sweeper.n_trials=20 \
        'optimizer.lr=tag(log, interval(1e-4, 1e-1))' 'optimizer=choice(adam,nadam,sgd)'

Search spaces use Hydra's override grammar, on the command line (as above) or in YAML under
hydra.sweeper.params (see conf/experiment/search_lr.yaml):
    interval(a, b)               a float, uniform in [a, b]
    tag(log, interval(a, b))     a float, log-uniform
    int(interval(a, b))          an integer in [a, b] (tag(log, ...) for log-uniform)
    range(start, stop, step)     start, start + step, ... < stop (integers, or floats with a float step)
    choice(a, b, c) or a,b,c     one of the values (config group options too: optimizer=choice(adam,nadam))
Anything else is a fixed override passed to every trial; on the command line a fixed value replaces a
search space of the same key declared in YAML.

The sampler, the pruner and the numbers below are checked before the study is opened (_settings.RULES): a bad one
is one line naming it, and nothing is written to the storage.
"""
# No `from __future__ import annotations` here: Hydra runs this module before it is in sys.modules, and
# dataclasses cannot resolve string annotations then.
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class TPEConf:
    n_startup_trials: int = 10   # random trials before TPE starts modelling the good and the bad trials
    multivariate: bool = False   # model the parameters jointly (Optuna marks it experimental)


@dataclass
class MedianConf:
    n_startup_trials: int = 5    # no pruning until this many trials have finished
    n_warmup_steps: int = 2      # nor before this epoch of a trial (epochs count from 1)
    interval_steps: int = 1      # check every this many epochs


@dataclass
class HyperbandConf:
    min_resource: int = 1        # epochs every trial gets before the first cut
    max_resource: Any = "auto"   # epochs of a full trial; auto: trainer.epochs of the sweep's config
    reduction_factor: int = 3    # each rung keeps 1/reduction_factor of the trials (keras-tuner's `factor`)


@dataclass
class DnnlabOptunaSweeperConf:
    _target_: str = "hydra_plugins.dnnlab_optuna_sweeper.optuna_sweeper.DnnlabOptunaSweeper"
    sampler: str = "tpe"                 # tpe, random or grid (grid: every combination of choice/range params)
    seed: Optional[int] = None           # the sampler's seed (a resumed study continues from seed + its trials)
    tpe: TPEConf = field(default_factory=TPEConf)
    direction: Optional[str] = None      # maximize or minimize; null: maximize *acc metrics, minimize *loss
    metric: Optional[str] = None         # a summary.json key (val_acc, val_loss, test_acc, ...); null: the task's
                                         # return value, the early-stopping monitor at the best epoch
    study_name: str = "dnnlab"
    storage: Optional[str] = None        # null: the journal file optuna.journal in the sweep directory;
                                         # else a journal file path or a database URL (sqlite:///f.db,
                                         # postgresql://user:password@host/db, mysql+pymysql://...)
    n_trials: int = 20                   # the study's target: trials with a result (complete, pruned, or failed
                                         # by the run). A rerun tops the study up to it (makes up interrupted and
                                         # killed trials) and runs nothing once it is met: raise it to add more
    n_jobs: int = 1                      # trials launched together through the launcher (parallel with
                                         # hydra/launcher=joblib)
    heartbeat_interval: int = 60         # database storage: seconds between the sweeper's heartbeats for its
                                         # running trials
    grace_period: int = 180              # database storage: a running trial with no heartbeat for this many
                                         # seconds (its sweeper died, on any host) is failed as killed by the next
                                         # sweep of the study; more than heartbeat_interval
    pruner: str = "none"                 # none, median or hyperband; trials report per-epoch values
    median: MedianConf = field(default_factory=MedianConf)
    hyperband: HyperbandConf = field(default_factory=HyperbandConf)
    params: Dict[str, Any] = field(default_factory=dict)  # the search space: {key: override grammar}, e.g.
                                             # {optimizer.lr: "tag(log, interval(1e-4, 1e-1))"}


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=DnnlabOptunaSweeperConf,
                             provider="dnnlab")
