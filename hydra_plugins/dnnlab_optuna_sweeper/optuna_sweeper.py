"""The Sweeper class Hydra instantiates for hydra/sweeper=optuna; the work is done in _sweep.py."""

from typing import Any, List, Optional

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class DnnlabOptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = settings  # the fields of config.DnnlabOptunaSweeperConf
        self.hydra_context: Optional[HydraContext] = None
        self.config: Optional[DictConfig] = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        from ._sweep import OptunaSweep

        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        return OptunaSweep(self.settings, self.config, self.hydra_context, self.launcher).run(arguments)
