"""What Hydra itself would build from a command line, checked before Hydra runs it.

Hydra instantiates the callbacks, the launcher and the sweeper (with every `_target_` nested in their settings),
and hands hydra.job_logging / hydra.hydra_logging to logging.config.dictConfig (whose `()` and `class` keys call
what they name) before the task starts, so the task's own check (dnnlab.validate) comes too late for them. This
composes the command line's config once, as Hydra will, and refuses what is not one of the known parts, launcher
settings the launcher would fail on (joblib's n_jobs=0) or take silently (a stack of 0 jobs), and an output folder
that cannot be written (Hydra would fail with a traceback while configuring its log file).
"""
from __future__ import annotations

import functools
import logging
import logging.handlers
import os
from pathlib import Path

from hydra.errors import MissingConfigException
from omegaconf import DictConfig, OmegaConf

from dnnlab import CONF_DIR, components, extras
from dnnlab.errors import DnnlabError, bad_value
from dnnlab.validate import int_min, integer, num, optional, targets, walk

# The launchers' settings (joblib, dnnlab's stacked launcher, submitit's SLURM): key under hydra.launcher, test,
# what is allowed.
LAUNCHER_RULES = {
    "n_jobs": (lambda v: v is None or (integer(v) and v != 0), "null or a non-zero integer (-1: every core)"),
    "max_group": (optional(int_min(1)), "null (every compatible job) or an integer >= 1"),
    "min_group": (int_min(1), "an integer >= 1"),
    "timeout_min": (int_min(1), "an integer >= 1 (minutes)"),
    "cpus_per_task": (optional(int_min(1)), "null or an integer >= 1"),
    "gpus_per_node": (optional(int_min(0)), "null or an integer >= 0"),
    "tasks_per_node": (int_min(1), "an integer >= 1"),
    "nodes": (int_min(1), "an integer >= 1"),
    "mem_gb": (optional(num(0, lo_open=True)), "null or a number > 0"),
    "array_parallelism": (int_min(1), "an integer >= 1"),
}

STREAMS = ("ext://sys.stdout", "ext://sys.stderr")
LOGGING_KEYS = ("job_logging", "hydra_logging")


@functools.cache
def hydra_parts() -> frozenset[str]:
    """Hydra's launchers and sweepers (the installed plugins) and the callbacks Hydra ships."""
    import hydra.experimental.callbacks as shipped
    from hydra.core.plugins import Plugins
    from hydra.experimental.callback import Callback
    from hydra.plugins.launcher import Launcher
    from hydra.plugins.sweeper import Sweeper

    found = [c for kind in (Launcher, Sweeper) for c in Plugins.instance().discover(kind)]
    found += [c for c in vars(shipped).values() if isinstance(c, type) and issubclass(c, Callback)]
    return frozenset(f"{c.__module__}.{c.__name__}" for c in found)


@functools.cache
def logging_parts() -> frozenset[str]:
    """The handler, formatter and filter classes of the logging package, by their exact names."""
    kinds = (logging.Handler, logging.Formatter, logging.Filter)
    return frozenset(f"{module.__name__}.{name}" for module in (logging, logging.handlers)
                     for name, value in vars(module).items() if isinstance(value, type) and issubclass(value, kinds))


def resolved(node):
    """The config as plain values, each interpolation resolved where it can be now (`${foo}` may bring in a whole
    section that Hydra would build); those that only Hydra's job runtime knows stay as their text (strings)."""
    if not OmegaConf.is_config(node):
        return node
    keys = range(len(node)) if OmegaConf.is_list(node) else list(node.keys())
    values = []
    for key in keys:
        try:
            values.append(resolved(node[key]))
        except Exception:  # ${hydra:...}, ${hydra.runtime.output_dir}: strings once Hydra resolves them
            values.append(str(node._get_node(key)._value()))
    return values if OmegaConf.is_list(node) else dict(zip(keys, values))


def check_hydra(hydra_cfg: DictConfig, multirun: bool = False) -> None:
    """Refuse a part of the hydra node that Hydra would build and that is not known, a bad launcher setting, and
    an output folder that cannot be written."""
    data = resolved(hydra_cfg)
    for key, target in targets(data, "hydra"):
        if not (components.allowed(target) or target in hydra_parts()):
            raise bad_value(key, target, "a Hydra launcher, sweeper or callback that is installed, or a dnnlab "
                                         "component; allow others with $DNNLAB_ALLOWED_TARGETS=name,...")
    for name in LOGGING_KEYS:
        _check_logging(data.get(name), f"hydra.{name}")
    launcher = data.get("launcher") if isinstance(data.get("launcher"), dict) else {}
    for name, (ok, allowed) in LAUNCHER_RULES.items():
        if name in launcher and not ok(launcher[name]):
            raise bad_value(f"hydra.launcher.{name}", launcher[name], allowed)
    check_output_dir(hydra_cfg, "sweep.dir" if multirun else "run.dir")


def check_output_dir(hydra_cfg: DictConfig, key: str) -> None:
    """The run (or sweep) folder exists as a folder dnnlab may write into, or can be created."""
    try:
        folder = OmegaConf.select(hydra_cfg, key)
    except Exception:  # an interpolation only Hydra's job runtime knows: Hydra will resolve and report it
        return
    if not isinstance(folder, str) or not folder:
        return
    why = unwritable(Path(folder))
    if why:
        raise bad_value(f"hydra.{key}", folder, f"a folder dnnlab can write to ({why})")


def unwritable(folder: Path) -> str | None:
    """Why `folder` cannot be written or created (its nearest existing part is a file or read-only), or None.
    os.access sees a read-only file system and /proc even as root; nothing is created to find out."""
    existing = folder.absolute()
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is read-only here"
    return None


def _check_logging(section, key: str) -> None:
    for child, name, value in walk(section, key):
        if name in ("()", "class") and not (isinstance(value, str) and value in logging_parts()):
            raise bad_value(child, value, "a class of the logging package, e.g. logging.StreamHandler")
        if isinstance(value, str) and value.startswith("ext://") and value not in STREAMS:
            raise bad_value(child, value, " or ".join(STREAMS))


def check_command_line(config_name: str, argv: list[str]) -> list[str]:
    """Compose argv's config as Hydra will (run or multirun) and check its hydra node; nothing to do for the
    commands that only print (--help, --cfg, --info, --shell-completion). Returns argv with Hydra's flags before
    the overrides: Hydra's own parser refuses `a=1 -m b=2`, with its usage text."""
    args, ordered = parse(argv)
    if args.experimental_rerun is not None:
        raise DnnlabError("--experimental-rerun loads a pickle file, which can run any code: not allowed; run the "
                          "command again with its overrides (RUN/.hydra/overrides.yaml)")
    if args.help or args.hydra_help or args.shell_completion or args.info or args.cfg:
        return ordered
    cfg, multirun = compose(args.config_name or config_name, args)
    extras.check(cfg.hydra)
    check_hydra(cfg.hydra, multirun)
    return ordered


def parse(argv: list[str]):
    """Hydra's command line, flags and overrides in any order; a bad flag is one line."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def error(message: str):
        raise DnnlabError(f"{message} (--help lists the flags)")

    parser.error = error
    args = parser.parse_intermixed_args(argv)
    flags = list(argv)
    for override in args.overrides:
        flags.remove(override)
    return args, flags + args.overrides


def compose(config_name: str, args) -> tuple[DictConfig, bool]:
    """The config Hydra will run, and whether it is a multirun."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    config_path = os.path.abspath(args.config_path) if args.config_path else str(CONF_DIR)
    search_path = create_config_search_path(f"file://{config_path}")
    if args.config_dir is not None:
        search_path.prepend(provider="command-line", path=f"file://{os.path.abspath(args.config_dir)}")
    hydra = Hydra.create_main_hydra2(task_name="dnnlab", config_search_path=search_path)
    try:
        multirun = args.multirun or hydra.get_mode(config_name=config_name, overrides=args.overrides) \
            == RunMode.MULTIRUN
        mode = RunMode.MULTIRUN if multirun else RunMode.RUN
        return hydra.compose_config(config_name, args.overrides, mode), multirun
    except MissingConfigException as e:  # an optional launcher or sweeper that is not installed
        extras.check_missing_config(str(e))
        raise
    finally:
        GlobalHydra.instance().clear()
