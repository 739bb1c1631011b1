"""Atomic file writes, and checkpoints that load without unpickling arbitrary objects."""
from __future__ import annotations

import io
import os
import pickle
import re
import stat
import zipfile
from pathlib import Path

import torch

from dnnlab.errors import DnnlabError, bad_value

FORMAT = "dnnlab-checkpoint/1"
RUN_HELP = "a run directory (the weights it ended with: checkpoints/final.pt, else best.pt, else last.pt) or a .pt file"
# what atomic_write (and mark_final) name their temporary files: .NAME.tmpPID beside NAME
TEMPORARY = re.compile(r"^\..+\.tmp(\d+)$")


def not_a_file(path: Path) -> str | None:
    """Why `path` is not a regular file that can be read ("does not exist", "is a directory", "is a dangling
    symlink (to ...)", "is a fifo"...), or None when it is one. Only stat()s: never opens, so a fifo cannot hang."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            return f"is a dangling symlink (to {os.readlink(path)})"
        return "does not exist"
    except OSError as e:  # no permission on a folder above it, a symlink loop, a name too long
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a fifo (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return "is " + next((kind for test, kind in kinds if test(mode)), "not a regular file") + ", not a file"


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


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files (.NAME.tmpPID) that a killed writer left in `folder`: those of processes no
    longer running, and this process's own (a new run writes nothing before this; an earlier process may have had
    the same id). Those of another live process are kept (it may be writing them now). Returns what was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:  # no such folder yet: nothing to clean
        return removed
    for entry in entries:
        found = TEMPORARY.match(entry.name)
        if not found or not entry.is_file() or entry.is_symlink():
            continue
        pid = int(found.group(1))
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue  # alive (or another user's, PermissionError below): leave it
            except ProcessLookupError:
                pass
            except (PermissionError, OverflowError, OSError):
                continue
        try:
            entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


def keep_newest_periodic(folder: Path, keep: int | None) -> list[Path]:
    """Delete all but the `keep` newest periodic checkpoints (epoch_N.pt) in `folder`; keep=None keeps all.
    Returns what was deleted."""
    if keep is None:
        return []
    periodic = sorted((p for p in Path(folder).glob("epoch_*.pt") if p.stem[6:].isdigit()),
                      key=lambda p: int(p.stem[6:]))
    old = periodic[:-keep]
    for path in old:
        path.unlink(missing_ok=True)
    return old


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
    why = not_a_file(found)
    if why == "does not exist":
        raise bad_value(key, str(path), "an existing run directory or checkpoint file (this one does not exist)")
    if why:
        raise bad_value(key, str(path), f"a run directory or a checkpoint file (this one {why})")
    return found


def stored_entries(f, size: int) -> bool:
    """Whether every entry of the zip archive `f` is stored uncompressed, within the file's size (as torch.save
    writes them); leaves `f` at its start."""
    try:
        with zipfile.ZipFile(f) as archive:
            entries = archive.infolist()
        return all(e.compress_type == zipfile.ZIP_STORED for e in entries) and sum(e.file_size for e in entries) <= size
    except (zipfile.BadZipFile, OSError, ValueError):
        return True  # unreadable as a zip: torch's reader says what is wrong
    finally:
        f.seek(0)


def load(path: Path, map_location="cpu") -> dict:
    """Load a dnnlab checkpoint with weights_only=True: tensors and plain containers only, never code. Anything
    else (a missing, special, empty, text, truncated or foreign file, another program's zip or torch file) is a
    DnnlabError of one line that names the file."""
    path = Path(path)
    why = not_a_file(path)
    if why:
        raise DnnlabError(f"checkpoint {path} {why}")
    try:  # O_NONBLOCK: should it have become a fifo since, opening it does not wait for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise DnnlabError(f"checkpoint {path} cannot be read ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DnnlabError(f"checkpoint {path} is not a regular file")
        size = os.fstat(fd).st_size
        if size == 0:
            raise DnnlabError(f"{path}: not a readable checkpoint (an empty file)")
        try:  # torch.save writes a zip archive; its directory is at the end, so this reads a few KiB of any file
            is_zip = zipfile.is_zipfile(f)
            f.seek(0)
        except OSError as e:
            raise DnnlabError(f"{path}: cannot be read ({e.strerror or e})") from None
        if not is_zip:
            raise DnnlabError(f"{path}: not a readable checkpoint (not a torch.save archive: a text, foreign, "
                              f"truncated or corrupt file of {size} bytes)")
        if not stored_entries(f, size):  # a compressed entry may inflate a small file into any amount of memory
            raise DnnlabError(f"{path}: not a dnnlab checkpoint (compressed entries, which torch.save never writes)")
        try:
            state = torch.load(f, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"(?:unsupported )?GLOBAL (\S+)", str(e), re.IGNORECASE)
            if found:  # a pickle that would import (and could run) code
                raise DnnlabError(f"{path}: refused to load, it asks to import {found.group(1)}; only tensors and "
                                  "plain data are accepted (dnnlab checkpoints)") from None
            raise DnnlabError(f"{path}: not a readable checkpoint (a corrupt or foreign file)") from None
        except Exception as e:  # torch's reader and unpickler fail in many ways (RuntimeError, IndexError, ...)
            first = next((line for line in str(e).splitlines() if line.strip()), "").split("  (Could this")[0]
            raise DnnlabError(f"{path}: not a readable checkpoint (a zip archive that torch cannot read as its own: "
                              f"{type(e).__name__}{': ' + first[:100] if first else ''})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        what = f"a {type(state).__name__}" if not isinstance(state, dict) else "a dict"
        raise DnnlabError(f"{path}: not a dnnlab checkpoint ({what} without the '{FORMAT}' marker)")
    if not isinstance(state.get("model"), dict) or not isinstance(state.get("config"), str):
        raise DnnlabError(f"{path}: a damaged dnnlab checkpoint (no model weights or saved config in it)")
    return state
