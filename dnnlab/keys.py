"""The groups, options and keys a command line may name, and the nearest ones for those it misspells.

Hydra adds a key that no config has when its override starts with + (`dnnlab train +trainer.epoch=3` trained for
the default number of epochs), and advises that + to whoever leaves it out. Here a key is known when the command's
primary config or some option of some group has it, at the option's package (`+regularizer.max_norm=1` is known,
from regularizer/max_norm.yaml), or when its section is a component that takes it as an argument
(`+optimizer.amsgrad=true`: torch.optim.Adam's), or when it is one of Hydra's instantiation settings in a component
section (`_args_`, ...: the target checks decide those). The hydra node is Hydra's own (check_hydra checks what Hydra
builds from it), and so are the hydra/ groups.
"""
from __future__ import annotations

import difflib
import functools
import inspect
from collections import defaultdict

from hydra.core.default_element import ConfigDefault
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.types import ChoiceSweep, Override, OverrideType
from omegaconf import OmegaConf

from dnnlab import components, conf_dirs
from dnnlab.errors import DnnlabError

HELP = "(--help lists every group and key)"


class Known:
    """What the configs of one command know, read from Hydra's config repository as needed: a group's options
    when a key names the group, every option of every group when a key is not found there (an option whose package
    is _global_, an experiment's, may set keys of any section)."""

    def __init__(self, repo, config_name: str):
        self.repo, self.tree, self.loaded = repo, {}, set()
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
            result = self.repo.load_config(f"{group}/{option}")
            package = package_path(group, (result.header or {}).get("package"))
            node = self.tree
            for part in package.split(".") if package else []:
                node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
            self._merge(node, plain(result.config), package)
        for sub in self.groups(group):
            self.load(sub)

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
        """dnnlab's own settings in a component section (optimizer.clip_norm, init.bias): the keys of an option
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


def option_names(value) -> list[str]:
    """The options (or targets) an override picks: `a`, `[a,b]` (several), `a,b` or `choice(a,b)` (a sweep)."""
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
                near = difflib.get_close_matches(name, options, n=1)
                hint = f": did you mean {group}={near[0]}?" if near else "."
                listed = sorted({opt if "/" not in opt else opt.split("/")[0] + "/..." for opt in options})
                raise DnnlabError(f"Could not find '{group}/{name}'{hint} Available options in '{group}': "
                                  f"{', '.join(listed)}")


def check_keys(known: Known, overrides: list[Override], kinds: tuple[OverrideType, ...], components) -> None:
    """Every key the overrides of these kinds name is known: an unknown one is refused with the nearest name.
    `components(section)`: the targets a component section will have in the command's jobs."""
    for o in overrides:
        if o.type not in kinds or is_hydras(o) or known.repo.group_exists(o.key_or_group):
            continue
        key = o.key_or_group
        known.load(key.split(".")[0])
        missing = known.unknown(key, components)
        if missing:
            for group in known.groups():  # an option with a _global_ package may set any key
                known.load(group)
            missing = known.unknown(key, components)
        if missing:
            raise refusal(key, *missing)


def picks(known: Known, overrides: list[Override], section: str) -> set[str]:
    """The components the command line names for `section`: `section._target_=...`, and the options a sweep or a
    group override picks (a multirun's composed config has none of its sweeps)."""
    found: set[str] = set()
    for o in overrides:
        if o.key_or_group == f"{section}._target_" and not o.is_delete():
            found |= set(option_names(o.value()))
        elif o.key_or_group == section and known.repo.group_exists(section):
            for name in option_names(o.value()):
                result = known.repo.load_config(f"{section}/{name}")
                target = plain(result.config).get("_target_") if result else None
                found |= {target} if isinstance(target, str) else set()
    return found


def refusal(key: str, wrong: str, names: list[str], targets: set[str]) -> DnnlabError:
    """One line naming the key, with the nearest known name (`trainer.epoch`: trainer.epochs)."""
    parent, _, part = wrong.rpartition(".")
    owner = conf_dirs.owner(part) if not parent else None
    near = difflib.get_close_matches(part, names, n=1)
    hint = f": did you mean {(parent + '.' if parent else '') + near[0] + key[len(wrong):]}?" if near else ""
    if targets:
        return DnnlabError(f"'{key}' is not a setting of {' or '.join(sorted(targets))}{hint} (settings here: "
                           f"{', '.join(names)})")
    what = "key" if "." in key else "group or key"
    if owner:
        return DnnlabError(f"unknown {what} '{key}': a group of `dnnlab {owner}`, not of this command {HELP}")
    return DnnlabError(f"unknown {what} '{key}'{hint} {HELP}")
