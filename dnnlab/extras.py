"""The parts of dnnlab that need an optional package, and the one line that names the extra installing it."""
from __future__ import annotations

import importlib
import re

from dnnlab.errors import DnnlabError

SUBMITIT = (("hydra_plugins.hydra_submitit_launcher", "submitit"), "slurm")
# Hydra option (group/name): (the modules it imports, dnnlab's extra that installs them)
OPTIONS = {
    "hydra/sweeper/optuna": (("optuna",), "optuna"),
    "hydra/launcher/joblib": (("hydra_plugins.hydra_joblib_launcher", "joblib"), "joblib"),
    **{f"hydra/launcher/{name}": SUBMITIT for name in ("slurm", "submitit_slurm", "submitit_local")},
}
# dnnlab export --format: (the modules it imports, dnnlab's extra that installs them)
EXPORT_FORMATS = {"safetensors": (("safetensors",), "export"),
                  "onnx": (("onnx", "onnxscript", "onnxruntime"), "export")}


def missing(modules: tuple[str, ...]) -> str | None:
    """The first of `modules` that cannot be imported, else None."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            return module
    return None


def needs(extra: str, module: str) -> str:
    """What dnnlab says, after the part that needs it, when an optional package is not installed."""
    return f"needs dnnlab's optional packages '{extra}' ({module} is not installed): pip install 'dnnlab[{extra}]'"


def need(what: str, modules: tuple[str, ...], extra: str) -> None:
    """Refuse `what` in one line when a module it needs is not installed."""
    module = missing(modules)
    if module:
        raise DnnlabError(f"{what} {needs(extra, module)}")


def check(hydra) -> None:
    """The composed config's hydra node: each optional launcher or sweeper it names is installed, and so is the
    database driver of the sweeper's storage."""
    for group in ("hydra/sweeper", "hydra/launcher"):
        option = f"{group}/{hydra.runtime.choices.get(group)}"
        if option in OPTIONS:
            need(f"{group}={hydra.runtime.choices.get(group)}", *OPTIONS[option])
    storage = hydra.sweeper.get("storage")
    if isinstance(storage, str):
        from dnnlab.trial import database_url

        database_url(storage)


def check_missing_config(message: str) -> None:
    """Hydra could not find a config: when it is an optional launcher or sweeper, say which extra installs it."""
    for option, (modules, extra) in OPTIONS.items():
        if re.search(rf"'{re.escape(option)}'", message):
            group, name = option.rsplit("/", 1)
            need(f"{group}={name}", modules, extra)
