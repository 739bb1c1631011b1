"""What Hydra itself would build from a command line, checked before Hydra runs it.

Hydra instantiates the callbacks, the launcher and the sweeper (with every `_target_` nested in their settings),
and hands hydra.job_logging / hydra.hydra_logging to logging.config.dictConfig (whose `()` and `class` keys call
what they name) before the task starts, so the task's own check (dnnlab.validate) comes too late for them. This
composes the command line's config once, as Hydra will, and refuses what is not one of the known parts, launcher
settings the launcher would fail on (joblib's n_jobs=0) or take silently (a stack of 0 jobs), and an output folder
that cannot be written (Hydra would fail with a traceback while configuring its log file). Before that, the
command line's groups, options and keys are checked against what the command's configs know (dnnlab.keys): Hydra
would add a misspelt key given with +, and advise that + for one given without.
"""
from __future__ import annotations

import functools
import logging
import logging.handlers
import os
from pathlib import Path

from hydra.core.object_type import ObjectType
from hydra.core.override_parser.types import Glob
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, OmegaConf

from dnnlab import components, extras, keys
from dnnlab.errors import DnnlabError, bad_value
from dnnlab.conf_dirs import search_path
from dnnlab.validate import int_min, integer, num, optional, targets, walk

# The launchers' settings (joblib, dnnlab's stacked launcher, submitit's SLURM): key under hydra.launcher, test,
# what is allowed.
LAUNCHER_RULES = {
    "n_jobs": (lambda v: v is None or (integer(v) and v != 0), "null or a non-zero integer (-1: every core)"),
    "max_group": (optional(int_min(1)), "null (every compatible job) or an integer >= 1"),
    "min_group": (int_min(1), "an integer >= 1"),
    "cpu": (lambda v: v in ("processes", "stack"), "processes (Hydra's joblib launcher on a CPU with 2+ cores) or stack"),
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
    """Check argv's groups, options and keys against the command's configs, compose its config as Hydra will (run
    or multirun) and check its hydra node; only the names for the commands that print (--help, --cfg, --info),
    nothing for --shell-completion. Returns argv with Hydra's flags before the overrides: Hydra's own parser
    refuses `a=1 -m b=2`, with its usage text."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType as Kind
    from hydra.errors import ConfigCompositionException

    args, ordered = parse(argv)
    if args.experimental_rerun is not None:
        raise DnnlabError("--experimental-rerun loads a pickle file, which can run any code: not allowed; run the "
                          "command again with its overrides (RUN/.hydra/overrides.yaml)")
    if args.run + args.multirun + bool(args.cfg) + bool(args.info) + args.shell_completion > 1:  # Hydra: a traceback
        raise DnnlabError("only one of --run, --multirun, --cfg, --info and --shell-completion at a time")
    if args.shell_completion:
        return ordered
    name = args.config_name or config_name
    overrides = OverridesParser.create().parse_overrides(args.overrides)
    known = known_names(name, args)
    keys.check_groups(known, overrides)
    if args.help or args.hydra_help or args.info or args.cfg:
        keys.check_keys(known, overrides, tuple(Kind), Jobs(name, args, overrides, known))
        return ordered
    try:
        cfg, multirun = compose(name, args)
    except ConfigCompositionException:  # an unknown key gets its nearest name, not Hydra's advice to add it with +
        keys.check_keys(known, overrides, (Kind.CHANGE, Kind.DEL), Jobs(name, args, overrides, known))
        raise
    extras.check(cfg.hydra)
    check_hydra(cfg.hydra, multirun)
    # after check_hydra, which tells `+x={_target_:...} +hydra.callbacks.y=${x}` what it is; and a sweep's keys,
    # which a multirun's composed config leaves out (Hydra would find an unknown one in every job)
    late = [o for o in overrides if o.type in (Kind.ADD, Kind.FORCE_ADD) or o.is_sweep_override()]
    keys.check_keys(known, late, tuple(Kind), Jobs(name, args, overrides, known))
    return ordered


class Jobs:
    """The command's jobs as the key checks see them: the components a section has and the options a group takes
    in them. The command line's picks where it names them (a multirun's composed config leaves its sweeps out, and
    the default it has instead is no job's); else the configs that its groups, components and hydra settings alone
    compose (not its keys, which the checks judge): a run's one config, or one per option of each swept group or
    component, hydra.sweeper.params' too, with the other sweeps at their defaults (not every combination)."""

    def __init__(self, config_name: str, args, overrides: list, known: keys.Known):
        self.config_name, self.args, self.overrides, self.known = config_name, args, overrides, known
        self.kept = [o for o in overrides if self._shapes(o)]

    def _shapes(self, override) -> bool:
        """Whether the override decides what the config is made of: a group, a component, hydra's settings."""
        key = override.key_or_group
        return keys.is_hydras(override) or self.known.repo.group_exists(key) or key.endswith("._target_")

    def picks(self, key: str) -> list[str] | None:
        return keys.picks(self.known, self.overrides, key)

    def components(self, section: str) -> set[str] | None:
        """The targets `section` has in the jobs; None where that cannot be told (Hydra tells why)."""
        names = self.picks(f"{section}._target_")
        if names is None and self.known.repo.group_exists(section):
            options = self.picks(section)
            found = [self.known.option(section, o)[1].get("_target_") for o in options or []]
            names = None if options is None else [t for t in found if isinstance(t, str)]
        if names is not None:
            return set(names)
        configs = self.configs
        if configs is None:
            return None
        found = [OmegaConf.select(c, f"{section}._target_", default=None) for c in configs]
        return {t for t in found if isinstance(t, str)}

    def taken(self, group: str, key: str) -> tuple[set[str], bool] | None:
        """The options `group` takes in the jobs, and whether some job's config (as composed from the groups) has
        `key`: an experiment may set it; None where the configs do not compose."""
        picked, configs = self.picks(group), self.configs
        if configs is None:
            return None
        jobs = [c for c in configs if picked is None or c.hydra.runtime.choices.get(group) in picked]
        options = set(picked) if picked is not None else {c.hydra.runtime.choices.get(group) for c in jobs}
        return options - {None}, any(keys.holds(keys.plain(c), key) for c in jobs)

    @functools.cached_property
    def configs(self) -> list[DictConfig] | None:
        """The configs of the jobs without their keys' overrides (see the class); None where the command line's
        groups do not compose (the same failure as the whole command line's, which Hydra reports)."""
        base = self._compose([o.input_line for o in self.kept])
        if base is None or not base[1]:
            return None if base is None else [base[0]]
        last = {o.key_or_group: o for o in self._params(base[0]) + self.kept}  # the sweeper's order: later wins
        sweeps = [o for o in last.values() if o.is_sweep_override() and not keys.is_hydras(o)]
        found = []
        for sweep in sweeps:
            others = [o.input_line for o in self.kept if o.key_or_group != sweep.key_or_group]
            for value in self._values(sweep):
                composed = self._compose(others + [f"{sweep.get_key_element()}={value}"])
                found += [composed[0]] if composed else []  # a job that does not compose fails on its own
        return found if sweeps else [base[0]]

    def _params(self, cfg: DictConfig) -> list:
        """The sweeps hydra.sweeper.params of the config (an experiment's) gives, of groups and components."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None)
        params = keys.plain(params) if OmegaConf.is_dict(params) else {}
        try:
            parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()
                                                              if not isinstance(v, (dict, list))])
        except Exception:  # the sweeper reports what it cannot parse
            return []
        return [o for o in parsed if self._shapes(o)]

    def _values(self, sweep) -> list[str]:
        """The values of a sweep, as override text (glob(...) over the group's options); none for an interval."""
        if isinstance(sweep.value(), Glob):
            options = list(self.known.repo.get_group_options(sweep.key_or_group, ObjectType.CONFIG))
            return sweep.value().filter(options)
        return list(sweep.sweep_string_iterator()) if sweep.is_discrete_sweep() else []

    def _compose(self, overrides: list[str]) -> tuple[DictConfig, bool] | None:
        import argparse

        try:
            return compose(self.config_name, argparse.Namespace(**{**vars(self.args), "overrides": overrides}))
        except Exception:
            return None


def known_names(config_name: str, args) -> keys.Known:
    """What the command's configs know, in the config repository Hydra will compose from."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    loader = ConfigLoaderImpl(config_search_path=search_path(args))
    # the repository with the primary config's hydra.searchpath added (pretrain_app's conf_pretrain/)
    _, repo = loader._parse_overrides_and_create_caching_repo(config_name, args.overrides)
    return keys.Known(repo, config_name)


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
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    hydra = Hydra.create_main_hydra2(task_name="dnnlab", config_search_path=search_path(args))
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
