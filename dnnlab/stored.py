"""Configs read from files that dnnlab did not write in this run: a checkpoint's saved config (eval, prune,
latency, transfer sources, resuming a reused run directory) and the .hydra/ files of run folders (report,
reproduce). They are data, never code:

- bounded size, and parsed as plain YAML without aliases (a few nested aliases expand to billions of nodes);
- no interpolations: dnnlab saves resolved configs, so `${...}` in one was put there by someone else;
- checked with the command line's rules (dnnlab.validate), and built only through dnnlab's component table
  (dnnlab.components), which looks names up and never imports them from the text;
- written by an earlier dnnlab, perhaps: a key that has moved since (dnnlab.schema.MOVED) is moved on load, so
  that old runs resume, evaluate and transfer as before.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from dnnlab.errors import DnnlabError
from dnnlab.schema import MOVED
from dnnlab.validate import walk

MAX_BYTES = 1 << 20  # a resolved dnnlab config is about 5 kB


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases (anchors alone are harmless)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"a YAML alias (*name) at line {mark.line + 1}, which dnnlab never writes")
        return super().compose_node(parent, index)


def plain(text: str, source: str):
    """The YAML text as plain Python values; one line naming `source` if it is too big, aliased or not YAML."""
    if len(text) > MAX_BYTES:
        raise DnnlabError(f"{source}: its config is {len(text)} characters, more than a dnnlab config can be "
                          f"({MAX_BYTES}); refused")
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as e:
        raise DnnlabError(f"{source}: its config is not readable YAML ({_first_line(e)})") from None
    except RecursionError:
        raise DnnlabError(f"{source}: its config is nested too deeply to be a dnnlab config") from None


def read(path: Path, source: str | None = None):
    """plain() of a regular file (a fifo would block the reader), reading no more than MAX_BYTES + 1 bytes of it."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DnnlabError(f"{source or path}: not a regular file")
        return plain(f.read(MAX_BYTES + 1).decode("utf-8", errors="replace"), source or str(path))


def overrides(run_dir: Path) -> list[str] | None:
    """The overrides a run was started with (RUN/.hydra/overrides.yaml), or None where Hydra wrote none; a file
    that is not a list of strings is an error (ValueError)."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    items = read(path)
    if items is None:
        return []
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ValueError("not a list of overrides")
    return [upgraded_override(i) for i in items]


def parse_override(text: str) -> tuple[str, str]:
    """'optimizer.lr=0.01' -> ('optimizer.lr', '0.01'); '+key=v' and '++key=v' -> key; '~key' -> (key, 'deleted')."""
    key, _, value = text.partition("=")
    if key.startswith("~"):
        return key[1:], "deleted"
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return key.lstrip("+").strip(), value


def override_values(run_dir: Path) -> dict[str, str] | None:
    """{key: its text} of the overrides a run was started with (see overrides), or None where Hydra wrote none."""
    items = overrides(run_dir)
    return None if items is None else dict(parse_override(i) for i in items)


def read_mapping(path: Path):
    """read() of a file that must hold a mapping or a list (a .hydra file); anything else is an error, so that no
    string is parsed again by OmegaConf (which would expand its aliases)."""
    data = read(path)
    if not isinstance(data, (dict, list)):
        raise DnnlabError(f"{path}: not a mapping or a list of settings")
    return inert(upgraded(data))


def upgraded(data):
    """A config written before a key moved (optimizer.clip_norm, now trainer.clip_norm) with the key at its new
    place; anything else as it is."""
    if not isinstance(data, dict):
        return data
    for old, new in MOVED.items():
        (section, name), (to_section, to_name) = old.split("."), new.split(".")
        source, target = data.get(section), data.get(to_section)
        if isinstance(source, dict) and name in source and isinstance(target, dict):
            target.setdefault(to_name, source.pop(name))
    return data


def upgraded_override(item: str) -> str:
    """An override written before a key moved, naming the key's new place (`optimizer.clip_norm=1` ->
    `trainer.clip_norm=1`)."""
    for old, new in MOVED.items():
        item = re.sub(rf"^([+~]*){re.escape(old)}(?=$|=)", rf"\g<1>{new}", item)
    return item


def inert(node):
    """The data with every resolver call (`${oc.env:SECRET}`, `${now:...}`) escaped to stay text: a file from
    someone else may reference other keys of itself (`${optimizer.lr}`), never this machine's environment."""
    if isinstance(node, dict):
        return {key: inert(value) for key, value in node.items()}
    if isinstance(node, list):
        return [inert(value) for value in node]
    if isinstance(node, str) and re.search(r"\$\{[^}]*:", node):
        return node.replace("${", "\\${")
    return node


def config(text: str, source: str) -> DictConfig:
    """A saved config as an OmegaConf config that resolves nothing; refused if it is not a mapping or holds an
    interpolation."""
    data = plain(text, source)
    if not isinstance(data, dict):
        raise DnnlabError(f"{source}: its saved config is not a mapping of settings; not a dnnlab config")
    try:
        for key, _, value in walk(data):
            if isinstance(value, str) and "${" in value:
                raise DnnlabError(f"{source}: its saved config has an interpolation at {key} ({value[:60]!r}); "
                                  "dnnlab saves resolved configs, so it was not written by dnnlab")
        return OmegaConf.create(upgraded(data))
    except (RecursionError, ValueError, TypeError, AssertionError, KeyError) as e:
        raise DnnlabError(f"{source}: its saved config is not a dnnlab config ({_first_line(e)})") from None


def checkpoint_config(state: dict, source: str) -> DictConfig:
    """The saved config of a loaded checkpoint, once its weights are known to be a mapping of names to tensors."""
    weights = state.get("model")
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in weights.items()):
        raise DnnlabError(f"{source}: a checkpoint without a network's weights (names and tensors)")
    if not isinstance(state.get("config"), str):
        raise DnnlabError(f"{source}: a checkpoint without a saved config")
    classes = state.get("classes")
    if classes is not None and not (isinstance(classes, list) and len(classes) >= 2 and len(set(classes)) == len(classes)
                                    and all(type(c) is int and 0 <= c <= 9 for c in classes)):
        raise DnnlabError(f"{source}: its classes {str(classes)[:60]} are not at least 2 distinct digits 0-9")
    return config(state["config"], source)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:100]
