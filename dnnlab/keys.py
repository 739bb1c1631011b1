"""The groups, options and keys a command line may name, and the nearest ones for those it misspells.

Hydra adds a key that no config has when its override starts with + (`dnnlab train +trainer.epoch=3` trained for
the default number of epochs), and advises that + to whoever leaves it out. Here a key is known when the command's
primary config or some option of some group has it, at the option's package (`+regularizer.max_norm=1` is known,
from regularizer/max_norm.yaml), or when its section is a component that takes it as an argument
(`+optimizer.amsgrad=true`: torch.optim.Adam's), or when it is one of Hydra's instantiation settings in a component
section (`_args_`, ...: the target checks decide those). The hydra node is Hydra's own (check_hydra checks what Hydra
builds from it), and so are the hydra/ groups. A key that only options of its group that no job takes have is
refused too (`transfer.reuse_layers=2` with transfer=none: Hydra would advise its +, and the run would ignore it).
"""
from __future__ import annotations

import functools
import inspect
from collections import defaultdict

from hydra.core.default_element import ConfigDefault
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.types import ChoiceSweep, Glob, Override, OverrideType
from omegaconf import OmegaConf

from dnnlab import components, conf_dirs
from dnnlab.errors import DnnlabError, nearest
from dnnlab.schema import MOVED, OPEN, SECTIONS, moved

HELP = "(--help lists every group and key)"
# Groups whose options a list picks together (regularizer=[l2,dropout]): a key of an option not picked adds that
# regularizer (+regularizer.max_norm=1.0), where the other groups' options are alternatives.
COMBINED = frozenset({"regularizer"})


class Known:
    """What the configs of one command know, read from Hydra's config repository as needed: a group's options
    when a key names the group, every option of every group when a key is not found there (an option whose package
    is _global_, an experiment's, may set keys of any section)."""

    def __init__(self, repo, config_name: str):
        self.repo, self.tree, self.loaded, self._options = repo, {}, set(), {}
        self.components: dict[str, list] = defaultdict(list)  # section -> (target, its keys) of each option
        self._add_primary(config_name)

    def _add_primary(self, path: str) -> None:
        """The primary config and the plain configs its defaults list takes in (pretrain_app: train)."""
        result = self.repo.load_config(path)
        if result is None:
            return
        for default in result.defaults_list or []:
            if isinstance(default, ConfigDefault) and not default.is_self() and default.path:
                self._add_primary(default.path)
        self._merge(self.tree, plain(result.config), "")

    def groups(self, parent: str = "") -> list[str]:
        found = self.repo.get_group_options(parent, ObjectType.GROUP)
        return [f"{parent}/{g}" if parent else g for g in found if parent or g != "hydra"]

    def options(self, group: str) -> list[str]:
        """The options of `group`, those in the groups under it as sub/option (experiment's ed1/ex8)."""
        found = list(self.repo.get_group_options(group, ObjectType.CONFIG))
        for sub in self.groups(group):
            found += [f"{sub[len(group) + 1:]}/{o}" for o in self.options(sub)]
        return found

    def load(self, group: str) -> None:
        """Every option of `group` (and of the groups under it) into the tree, at its package."""
        if group in self.loaded or not self.repo.group_exists(group):
            return
        self.loaded.add(group)
        for option in self.repo.get_group_options(group, ObjectType.CONFIG):
            package, data = self.option(group, option)
            node = self.tree
            for part in package.split(".") if package else []:
                node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
            self._merge(node, data, package)
        for sub in self.groups(group):
            self.load(sub)

    def option(self, group: str, name: str) -> tuple[str, dict]:
        """The package of the option `group/name` and its settings ("" and {} where it does not load)."""
        if (group, name) not in self._options:
            result = self.repo.load_config(f"{group}/{name}") if self.repo.config_exists(f"{group}/{name}") else None
            data = plain(result.config) if result is not None else {}
            package = package_path(group, (result.header or {}).get("package")) if result is not None else ""
            self._options[group, name] = package, data if isinstance(data, dict) else {}
        return self._options[group, name]

    def holds(self, group: str, name: str, key: str) -> bool:
        """Whether the option `group/name` sets `key` (a full path: transfer.reuse_layers)."""
        package, data = self.option(group, name)
        if package and not key.startswith(package + "."):
            return False
        return holds(data, key[len(package) + 1:] if package else key)

    def _merge(self, into: dict, data, path: str) -> None:
        if not isinstance(data, dict):
            return
        if isinstance(data.get("_target_"), str):
            self.components[path].append((data["_target_"], {str(k) for k in data if not str(k).startswith("_")}))
        for key, value in data.items():
            if key == "hydra" and not path:
                continue
            if isinstance(value, dict):
                if not isinstance(into.get(key), dict):
                    into[key] = {}
                self._merge(into[key], value, f"{path}.{key}" if path else str(key))
            else:
                into.setdefault(key, value)

    def own(self, section: str) -> set[str]:
        """dnnlab's own settings in a component section (init.bias): the keys of an option
        that its component does not take."""
        found: set[str] = set()
        for target, names in self.components[section]:
            takes = settings(target)
            found |= names - takes if takes is not None else set()
        return found

    def unknown(self, key: str, components) -> tuple[str, list[str], set[str]] | None:
        """None when `key` is known; else its first part that is not (`trainer.epoch`), the names that part could
        have been, and the components that do not take it where the section is a component's (`optimizer.nesterov`
        with torch.optim.Adam). `components(section)`: the targets the section will have in
        the command's jobs (None: not known)."""
        node, done = self.tree, []
        for part in key.split("."):
            if not isinstance(node, dict):  # an item of a list value; or below a plain value
                return None if isinstance(node, list) else (".".join(done + [part]), [], set())
            section = ".".join(done)
            targets = components(section) if done and section in self.components else set()
            if targets is None and part not in node:  # cannot tell: Hydra reports what fails to compose
                return None
            if targets:  # a component's settings: those it takes, and dnnlab's own
                takes = arguments(targets)
                allowed = None if takes is None else takes | self.own(section)
                if allowed is not None and part not in allowed and not part.startswith("_"):
                    lacking = {t for t in targets if part not in settings(t) | self.own(section)}
                    return ".".join(done + [part]), sorted(allowed - {part}), lacking
                if part not in node:
                    return None
            elif part not in node:
                names = set(node) | (set(self.groups()) if not done else set())
                return ".".join(done + [part]), sorted(names - {part}), set()
            node, done = node[part], done + [part]
        return None

    def elsewhere(self, key: str, jobs) -> tuple[str, list[str], list[str]] | None:
        """Where `key` is only a setting of options of its group that no job takes (diagnostics.every with
        diagnostics=none): the group, those options and the ones the jobs take. None where some job's config has
        the key, the group's options combine (COMBINED), or the key is a setting of the jobs' components.
        `jobs`: hydra_guard.Jobs."""
        group, _, rest = key.partition(".")
        if not rest or group in COMBINED or not self.repo.group_exists(group):
            return None
        options = list(self.repo.get_group_options(group, ObjectType.CONFIG))
        having = [o for o in options if self.holds(group, o, key)]
        if not having or len(having) == len(options):
            return None
        if group in self.components:  # an argument the component takes, though no option of it sets it
            takes = arguments(jobs.components(group) or set())
            if takes is None or rest.split(".")[0] in takes:
                return None
        picked = jobs.picks(group)
        if picked is not None and set(picked) & set(having):  # the command line's own pick: no composing
            return None
        found = jobs.taken(group, key)
        if found is None or found[1] or found[0] & set(having):
            return None
        return group, having, sorted(found[0])


def holds(data, path: str) -> bool:
    """Whether the nested dicts `data` have the dotted `path`."""
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def arguments(targets: set[str]) -> set[str] | None:
    """The settings that every one of these components takes; None: any (one that takes **kwargs, or one that is
    not allowed, which the target checks refuse)."""
    found = [settings(t) for t in targets]
    if any(f is None for f in found):
        return None
    return set.intersection(*map(set, found)) if found else set()


def plain(config):
    return OmegaConf.to_container(config, resolve=False) if OmegaConf.is_config(config) else config


def package_path(group: str, header: str | None) -> str:
    """Where an option of `group` goes: its `# @package` header, else the group's own path (Hydra's default)."""
    package = (header or "_group_").replace("_group_", group.replace("/", "."))
    return "" if package == "_global_" else package.removeprefix("_global_.")


@functools.cache
def settings(target: str) -> frozenset[str] | None:
    """The keyword arguments with defaults of the component `target` names (those a config sets; the others, such
    as an optimizer's params, the code gives); None where that cannot be told."""
    if not components.allowed(target):
        return None
    try:
        parameters = inspect.signature(components.lookup(target, "_target_")).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(p.name for p in parameters
                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty)


def option_names(value, options: list[str] = ()) -> list[str]:
    """The options (or targets) an override picks: `a`, `[a,b]` (several), `a,b` or `choice(a,b)` (a sweep), or
    those of `options` (the group's) that `glob(...)` matches."""
    if isinstance(value, Glob):
        return value.filter(list(options))
    values = value.list if isinstance(value, ChoiceSweep) else [value]
    flat = [v for item in values for v in (item if isinstance(item, list) else [item])]
    return [v for v in flat if isinstance(v, str)]


def is_hydras(override: Override) -> bool:
    key = override.key_or_group
    return key == "hydra" or key.startswith(("hydra.", "hydra/")) or override.package is not None


def check_groups(known: Known, overrides: list[Override]) -> None:
    """Every option a group override picks exists: a misspelt one gets the nearest option. Not a sweep's: a job
    that does not compose fails on its own, recorded, and the sweep goes on."""
    for o in overrides:
        if is_hydras(o) or o.is_sweep_override() or not known.repo.group_exists(o.key_or_group):
            continue
        group = o.key_or_group
        for name in option_names(o.value()):
            if not known.repo.config_exists(f"{group}/{name}"):
                options = known.options(group)
                near = nearest(name, options)
                hint = f": did you mean {group}={near}?" if near else "."
                listed = sorted({opt if "/" not in opt else opt.split("/")[0] + "/..." for opt in options})
                raise DnnlabError(f"Could not find '{group}/{name}'{hint} Available options in '{group}': "
                                  f"{', '.join(listed)}")


def check_keys(known: Known, overrides: list[Override], kinds: tuple[OverrideType, ...], jobs) -> None:
    """Every key the overrides of these kinds name is known, and set by an option some job takes: an unknown one
    is refused with the nearest name, one of an option no job takes with that option. `jobs`: the components and
    options of the command's jobs (hydra_guard.Jobs)."""
    for o in overrides:
        if o.type not in kinds or is_hydras(o) or known.repo.group_exists(o.key_or_group):
            continue
        key = o.key_or_group
        if key in MOVED:  # a command line from before the move: where the key is now, not the nearest name
            raise DnnlabError(f"{moved(key)}: {o.input_line.lstrip('+').replace(key, MOVED[key], 1)}")
        known.load(key.split(".")[0])
        missing = known.unknown(key, jobs.components)
        if missing:
            for group in known.groups():  # an option with a _global_ package may set any key
                known.load(group)
            missing = known.unknown(key, jobs.components)
        if missing:
            raise refusal(key, *missing)
        section = key.split(".")[0]
        if o.is_delete() and section not in OPEN and section in SECTIONS:  # Hydra's schema nodes refuse it
            raise DnnlabError(f"{o.input_line} is not allowed: the keys of {section} are fixed (dnnlab/schema.py); "
                              f"set {key} to a value instead")
        unchosen = known.elsewhere(key, jobs)
        if unchosen:
            raise not_chosen(o.input_line.lstrip("+~"), *unchosen)


def picks(known: Known, overrides: list[Override], key: str) -> list[str] | None:
    """The options (or targets) the last override of `key` (a group, or a section's _target_) picks, in all the
    jobs of a sweep (`a,b`, `glob(*)`); None where no override sets it (or the last deletes it). The last one,
    as Hydra's sweeper and Hydra's composition take it."""
    last = [o for o in overrides if o.key_or_group == key and not is_hydras(o)][-1:]
    if not last or last[0].is_delete():
        return None
    options = known.repo.get_group_options(key, ObjectType.CONFIG) if known.repo.group_exists(key) else []
    return option_names(last[0].value(), options)


def not_chosen(override: str, group: str, having: list[str], taken: list[str]) -> DnnlabError:
    """One line: the options that have the key, the ones this command line takes, the option to add."""
    options = " or ".join(f"{group}={o}" for o in having)
    if len(taken) > 1:  # a sweep
        has = f"its jobs have {' or '.join(f'{group}={t}' for t in taken)}"
    else:
        has = f"this run has {group}={taken[0]}" if taken else f"this run has no {group}"
    return DnnlabError(f"{override} is a setting of {options} ({has}): add {options}")


def refusal(key: str, wrong: str, names: list[str], targets: set[str]) -> DnnlabError:
    """One line naming the key, with the nearest known name (`trainer.epoch`: trainer.epochs)."""
    parent, _, part = wrong.rpartition(".")
    owner = conf_dirs.owner(part) if not parent else None
    near = nearest(part, names)
    hint = f": did you mean {(parent + '.' if parent else '') + near + key[len(wrong):]}?" if near else ""
    if targets:
        return DnnlabError(f"'{key}' is not a setting of {' or '.join(sorted(targets))}{hint} (settings here: "
                           f"{', '.join(names)})")
    what = "key" if "." in key else "group or key"
    if owner:
        return DnnlabError(f"unknown {what} '{key}': a group of `dnnlab {owner}`, not of this command {HELP}")
    return DnnlabError(f"unknown {what} '{key}'{hint} {HELP}")
