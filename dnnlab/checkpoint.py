"""Atomic file writes, and checkpoints that load without unpickling arbitrary objects."""
from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path

import torch

from dnnlab.errors import DnnlabError, bad_value

FORMAT = "dnnlab-checkpoint/1"
RUN_HELP = "a run directory (the weights it ended with: checkpoints/final.pt, else best.pt, else last.pt) or a .pt file"


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: a crash leaves the old version readable."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DnnlabError(f"cannot write {path}: {e.strerror or e}; earlier files are intact") from None
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    atomic_write(path, buffer.getvalue())


def mark_final(checkpoints: Path, name: str) -> None:
    """checkpoints/final.pt: the weights a finished run ended with and was tested with (best.pt where early
    stopping restored them, else last.pt), as a hard link (a copy where the file system has none)."""
    source, final = checkpoints / name, checkpoints / "final.pt"
    tmp = final.with_name(f".final.pt.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
        os.replace(tmp, final)
    except OSError:
        tmp.unlink(missing_ok=True)
        atomic_write(final, source.read_bytes())


def find(path: str | Path, key: str = "run") -> Path:
    """A checkpoint file, or a run directory's checkpoint: final.pt (the weights it ended with), else best.pt, else
    last.pt (a run still under way); `key` names the setting."""
    found = Path(path).expanduser()
    if found.is_dir():
        for name in ("final.pt", "best.pt", "last.pt"):
            if (found / "checkpoints" / name).is_file():
                return found / "checkpoints" / name
        raise bad_value(key, str(path), "a run directory with checkpoints/final.pt, best.pt or last.pt, or a .pt "
                                        "checkpoint")
    if not found.is_file():
        raise bad_value(key, str(path), "an existing run directory or checkpoint file (this one does not exist)")
    return found


def load(path: Path, map_location="cpu") -> dict:
    """Load a dnnlab checkpoint with weights_only=True: tensors and plain containers only, never code."""
    path = Path(path)
    if not path.is_file():
        raise DnnlabError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:unsupported )?GLOBAL (\S+)", str(e), re.IGNORECASE)
        if found:  # a pickle that would import (and could run) code
            raise DnnlabError(f"{path}: refused to load, it asks to import {found.group(1)}; only tensors and plain "
                              "data are accepted (dnnlab checkpoints)") from None
        raise DnnlabError(f"{path}: not a readable checkpoint (a corrupt or foreign file)") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise DnnlabError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DnnlabError(f"{path}: not a dnnlab checkpoint (no '{FORMAT}' marker)")
    return state
