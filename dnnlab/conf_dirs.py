"""The folders of the groups that only one command takes, for its config to name: `${dnnlab.conf_dir:pretrain}`.

conf_pretrain/ sits beside conf/ (in a source checkout, and inside the package in the wheel, as conf/ does), so
that `dnnlab train --help` and tab completion, which list every group under conf/, do not offer the pretrain group
that only `dnnlab pretrain` takes: pretrain_app.yaml adds the folder to its hydra.searchpath, and lists its groups
in its help with `${dnnlab.groups:pretrain}`. Every module that composes an app's config imports this one, which
registers the resolvers and puts the sections' schema nodes (dnnlab.schema), which the YAML options extend, into
Hydra's ConfigStore; it imports no torch (tab completion).
"""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from dnnlab import CONF_DIR, schema  # noqa: F401  its import puts the schema nodes into ConfigStore


def conf_dir(command: str) -> str:
    """The folder of the groups that only `dnnlab COMMAND` takes."""
    return str(CONF_DIR.parent / f"conf_{command}")


def groups(command: str) -> str:
    """The help's lines for the groups that only `dnnlab COMMAND` takes, as Hydra writes the others' (Hydra's help
    lists only the groups of the config path, not of hydra.searchpath): `group: option, ...`, one a line."""
    folder = Path(conf_dir(command))
    found = sorted(g for g in folder.iterdir() if g.is_dir()) if folder.is_dir() else []
    return "".join(f"{g.name}: {', '.join(sorted(p.stem for p in g.glob('*.yaml')))}\n" for g in found)


def owner(group: str) -> str | None:
    """The command whose own folder holds `group` (`pretrain` for the pretrain group), else None."""
    for folder in sorted(CONF_DIR.parent.glob("conf_*")):
        if group and (folder / group).is_dir():
            return folder.name.removeprefix("conf_")
    return None


def search_path(args):
    """Hydra's config search path for a command line's --config-path and --config-dir (argparse's namespace of
    Hydra's flags): dnnlab's conf/ without them. Here, not in hydra_guard, for tab completion, which imports no
    torch."""
    from hydra._internal.utils import create_config_search_path

    config_path = os.path.abspath(args.config_path) if args.config_path else str(CONF_DIR)
    found = create_config_search_path(f"file://{config_path}")
    if args.config_dir is not None:
        found.prepend(provider="command-line", path=f"file://{os.path.abspath(args.config_dir)}")
    return found


for _name, _resolver in (("dnnlab.conf_dir", conf_dir), ("dnnlab.groups", groups)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)
