"""The launcher's configuration, registered with Hydra as hydra/launcher=stacked.

    dnnlab train -m hydra/launcher=stacked optimizer.lr=1e-4,3e-4,1e-3,3e-3 trainer.seed=1,2
    dnnlab train -m hydra/launcher=stacked hydra.launcher.max_group=16 ...
"""

from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore


@dataclass
class StackedLauncherConf:
    _target_: str = "hydra_plugins.dnnlab_stacked_launcher.stacked_launcher.StackedLauncher"
    max_group: Optional[int] = None  # at most this many jobs in one stack (null: every compatible job of the sweep)
    min_group: int = 2               # a smaller set of compatible jobs runs one at a time, through the normal trainer
    # on the CPU with more than one core: "processes" hands the sweep to Hydra's joblib launcher (faster there),
    # "stack" stacks it as on CUDA
    cpu: str = "processes"


ConfigStore.instance().store(group="hydra/launcher", name="stacked", node=StackedLauncherConf, provider="dnnlab")
