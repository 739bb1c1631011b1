"""What a config's `_target_` may name, and how a config section becomes the callable it names.

The names are exact: those of the shipped configs, every torch.nn module, torch.optim optimizer and torch.nn.init
initializer, plus whatever $DNNLAB_ALLOWED_TARGETS names (comma-separated; one ending in "." allows everything
under it). Not prefixes: an importer follows attributes through modules, so "dnnlab." would let in
dnnlab.train.os.system. A section is looked up in this table, never imported from its text, so a config from a
file someone shared (a checkpoint's) cannot name anything else.
"""
from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

from dnnlab import CONF_DIR
from dnnlab.errors import bad_value
from dnnlab.schema import COMPONENT as ALLOWED
SETTINGS = ("_target_", "_partial_")  # the only Hydra keys a component section may have


@functools.cache
def table() -> dict[str, Callable]:
    """Every allowed name and the object it names."""
    from hydra.utils import get_object

    found = {f"torch.nn.{n}": v for n, v in vars(torch.nn).items()
             if isinstance(v, type) and issubclass(v, torch.nn.Module)}
    found |= {f"torch.optim.{n}": v for n, v in vars(torch.optim).items()
              if isinstance(v, type) and issubclass(v, torch.optim.Optimizer)}
    found |= {f"torch.nn.init.{n}": getattr(torch.nn.init, n) for n in dir(torch.nn.init)
              if n.endswith("_") and not n.startswith("_")}
    for path in CONF_DIR.rglob("*.yaml"):  # dnnlab's own files: the importer may resolve their names
        for name in re.findall(r"^\s*_target_:\s*([\w.]+)", path.read_text(), re.M):
            if name not in found:
                found[name] = get_object(name)
    return found


def _extra() -> list[str]:
    return [p for p in os.environ.get("DNNLAB_ALLOWED_TARGETS", "").split(",") if p]


def user_allowed(name: str) -> bool:
    """Named by $DNNLAB_ALLOWED_TARGETS (the user's own components, opted in on this machine). A name that only a
    prefix allows must be defined under that prefix: the importer follows attributes, and mypkg.x.subprocess.run
    is subprocess.run."""
    if name in _extra():
        return True
    prefixes = [p for p in _extra() if p.endswith(".") and name.startswith(p)]
    if not prefixes:
        return False
    from hydra.utils import get_object

    try:
        module = getattr(get_object(name), "__module__", None) or ""
    except Exception:  # not importable: nothing to allow
        return False
    return any(f"{module}.".startswith(p) for p in prefixes)


def allowed(name) -> bool:
    return isinstance(name, str) and (name in table() or user_allowed(name))


def lookup(name, key: str) -> Callable:
    """The object an allowed name stands for; `key` names the setting in the error."""
    if not allowed(name):
        raise bad_value(key, name, ALLOWED)
    if name in table():
        return table()[name]
    from hydra.utils import get_object

    return get_object(name)


def settings(section: Mapping, key: str) -> dict[str, Any]:
    """A section's arguments as plain values. Hydra keys other than _target_ and _partial_, and nested sections
    (which an instantiate call would build as components), are refused."""
    out = {}
    for name, value in section.items():
        if str(name).startswith("_") and name not in SETTINGS:
            raise bad_value(f"{key}.{name}", _plain(value), "not a setting of a dnnlab component")
        value = _plain(value)
        if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value)):
            raise bad_value(f"{key}.{name}", value, "a number, text, true/false, null or a list of them")
        if name not in SETTINGS:
            out[str(name)] = value
    return out


def make(section: Mapping, key: str, **fixed) -> Callable:
    """The callable a section names, with its settings bound (`fixed` overrides them): a partial for
    `_partial_: true` sections, the object it returns otherwise."""
    target = lookup(section.get("_target_"), f"{key}._target_")
    bound = functools.partial(target, **{**settings(section, key), **fixed})
    return bound if section.get("_partial_") else bound()


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
