"""Types and allowed values declared on dataclass fields, and read back from them (the declarations are in
dnnlab.schema; dnnlab.validate checks a config with them).

A field's annotation is its type; its metadata, `allows(...)`, what it allows beyond that, in the words of the
one-line refusal `key=value is not allowed: <text>`. A bool is no number, an int is also a float, a number is
finite, and a list may be OmegaConf's.

Hydra's structured configs check the types themselves, at composition and in OmegaConf's words (`Value 'two' of
type 'str' could not be converted to Integer`, over several lines and before dnnlab sees the config), and convert
what they can (`'5'` to 5, `0` to `0.0`, `1` to true). So the node that Hydra's ConfigStore holds for a section
(`node`) has its fields and their order, closed to other keys, but typed Any: the YAML options give the values, and
the declared types and ranges are checked here, for composed configs and for saved ones (a checkpoint's) alike.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Union

from omegaconf import MISSING, OmegaConf


def number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_list(v) -> bool:
    return isinstance(v, list) or OmegaConf.is_list(v)


@dataclass(frozen=True)
class Allowed:
    """What a key allows beyond its type: bounds on its numbers (on each item of a list), a list's length, a test
    of its own (of a value that is not null); `text` says it."""
    text: str
    ge: float = -math.inf
    gt: float = -math.inf
    le: float = math.inf
    lt: float = math.inf
    min_len: int = 0
    max_len: float = math.inf
    test: Callable[[Any], bool] | None = None

    def __call__(self, value) -> bool:
        items = list(value) if is_list(value) else [value]
        return ((not is_list(value) or self.min_len <= len(items) <= self.max_len)
                and all(self.ge <= v <= self.le and self.gt < v < self.lt for v in items if number(v))
                and (value is None or self.test is None or self.test(value)))


def allows(text: str, **limits) -> Any:
    """A field of the type its annotation says, allowing what `text` says (`limits`: see Allowed); its value is
    the YAML option's."""
    return field(default=MISSING, metadata={"allowed": Allowed(text, **limits)})


def section(cls: type) -> Any:
    """A field holding a nested section, the dataclass `cls`."""
    return field(default_factory=cls)


SIMPLE = {bool: lambda v: isinstance(v, bool), int: integer, float: number, str: lambda v: isinstance(v, str),
          type(None): lambda v: v is None, Any: lambda v: True}


def conforms(hint, value) -> bool:
    """Whether `value` is of the type `hint` (an annotation: a simple type, a Literal, a list or a union of them)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(conforms(a, value) for a in args)
    if origin is Literal:  # by type too: true is not 1
        return any(type(value) is type(a) and value == a for a in args)
    if origin is list:
        return is_list(value) and all(conforms(args[0], v) for v in value)
    return SIMPLE[hint](value)


def declared(cls: type, prefix: str) -> dict[str, tuple[Any, Allowed]]:
    """path: (type, what it allows) of every field of the dataclass `cls` at `prefix`, of nested sections too."""
    hints, found = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            found |= declared(hints[f.name], path)
        else:
            found[path] = hints[f.name], f.metadata["allowed"]
    return found


def node(cls: type) -> type:
    """The dataclass that Hydra's ConfigStore holds for `cls` (see the module's doc): its fields in their order,
    typed Any, MISSING (the YAML gives the values), a nested section as its own node. It is `cls.Node`, which a
    config holding it pickles by (a launcher's worker processes)."""
    if "Node" not in vars(cls):
        hints = typing.get_type_hints(cls)
        fields = [(f.name, Any, field(default_factory=node(hints[f.name])) if dataclasses.is_dataclass(hints[f.name])
                   else field(default=MISSING)) for f in dataclasses.fields(cls)]
        made = dataclasses.make_dataclass(cls.__name__, fields)
        made.__module__, made.__qualname__ = cls.__module__, f"{cls.__qualname__}.Node"
        cls.Node = made
    return cls.Node
