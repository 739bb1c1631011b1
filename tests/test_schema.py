"""Every key of every config option has its type and allowed values declared in dnnlab.schema, and the options of
the sections with a schema node give every value of it."""
from __future__ import annotations

import dataclasses
import pickle
import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dnnlab import CONF_DIR, schema
from dnnlab.allowed import conforms, node
from dnnlab.conf_dirs import conf_dir

FOLDERS = [CONF_DIR, Path(conf_dir("pretrain"))]
OPTIONS = sorted(p for folder in FOLDERS for p in folder.rglob("*.yaml")
                 if p.parent != folder and p.relative_to(folder).parts[0] != "hydra")


def package(path: Path) -> str:
    """Where the option's keys go: its `# @package` header, else its group's path."""
    folder = next(f for f in FOLDERS if f in path.parents)
    header = re.search(r"^# @package (\S+)", path.read_text(), re.M)
    group = path.parent.relative_to(folder).as_posix().replace("/", ".")
    found = (header.group(1) if header else "_group_").replace("_group_", group)
    return "" if found == "_global_" else found.removeprefix("_global_.")


def leaves(data, prefix: str):
    """(key, value) of every setting in the option: nested sections walked, lists are values."""
    for key, value in (data or {}).items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if path == "hydra" or path.startswith("hydra."):
            continue
        if isinstance(value, dict):
            yield from leaves(value, path)
        else:
            yield path, value


def settings(path: Path):
    data = yaml.safe_load(path.read_text()) or {}
    data.pop("defaults", None)  # the option's defaults list (Hydra's), not its settings
    return leaves(data, package(path))


def test_the_options_are_found():
    assert len(OPTIONS) > 100 and sum(1 for p in OPTIONS for _ in settings(p)) > 400


@pytest.mark.parametrize("path", OPTIONS, ids=[p.relative_to(p.parents[1]).as_posix() for p in OPTIONS])
def test_every_key_of_every_option_is_declared_and_its_value_allowed(path):
    """The test that fails when a key of an option has no type and allowed values in dnnlab/schema.py."""
    known = schema.declarations()
    for key, value in settings(path):
        assert key in set(known), f"{path}: {key} has no type and allowed values in dnnlab/schema.py"
        hint, allowed = known[key]
        if isinstance(value, str) and ("${" in value or value == "???"):
            continue  # an interpolation, or a value the command line must give
        assert conforms(hint, value) and allowed(value), f"{path}: {key}={value!r} is not allowed: {allowed.text}"


def test_a_key_is_declared_once_in_its_section():
    """A key that several of a section's classes have is one field, inherited: not two declarations to keep equal."""
    for name, classes in schema.SECTIONS.items():
        seen = {}
        for cls in classes:
            for field in dataclasses.fields(cls):
                assert seen.setdefault(field.name, field) is field, f"{name}.{field.name} is declared twice"


@pytest.mark.parametrize("group,option", [(g, o) for g, classes in schema.SECTIONS.items() if g not in schema.OPEN
                                          for o in sorted(p.stem for f in FOLDERS for p in (f / g).glob("*.yaml"))])
def test_an_option_extends_its_schema_node_and_gives_every_value(group, option):
    command = "pretrain_app" if group == "pretrain" else "train"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(command, overrides=[f"{group}={option}"])
    section = cfg[group]
    kind = OmegaConf.get_type(section)
    assert kind.__qualname__.endswith(".Node") and kind in {node(c) for c in schema.SECTIONS[group]}
    missing = [k for k in section if OmegaConf.is_missing(section, k)]
    assert missing == (["source"] if (group, option) == ("transfer", "reuse") else [])
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # a launcher's workers get it pickled
