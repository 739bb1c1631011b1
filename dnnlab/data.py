"""MNIST / Fashion-MNIST: find the IDX files, read and validate them, and cut the splits as device tensors."""
from __future__ import annotations

import gzip
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dnnlab.checkpoint import not_a_file
from dnnlab.errors import DnnlabError, bad_value

# torchvision's folder name for each dataset, and places where operating systems install a copy.
FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
SYSTEM_COPIES = {"mnist": [], "fashion_mnist": [Path("/usr/share/datasets/fashion-mnist")]}
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049  # 0x00000803: ubyte, 3 dims; 0x00000801: ubyte, 1 dim
log = logging.getLogger("dnnlab")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dnnlab"


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _complete(folder: Path) -> bool:
    return all(_find_file(folder, stem) for pair in FILES.values() for stem in pair)


def _bad_entries(folder: Path) -> list[str]:
    """What stands where one of the four files should be but cannot be read as one (a directory, a dangling
    symlink, a fifo...), where neither that name nor its .gz twin is a regular file: "PATH is a directory"."""
    bad = []
    for stem in (stem for pair in FILES.values() for stem in pair):
        if _find_file(folder, stem):
            continue
        for name in (stem, stem + ".gz"):
            why = not_a_file(folder / name)
            if why and why != "does not exist":
                bad.append(f"{folder / name} {why}")
    return bad


def candidate_folders(name: str, root: str | None) -> list[Path]:
    """Where to look, in order: data.root, $DNNLAB_DATA, the user cache, system copies."""
    roots = [Path(r).expanduser() for r in (root, os.environ.get("DNNLAB_DATA")) if r]
    roots.append(cache_dir())
    folders = []
    for r in roots:  # torchvision's layout ROOT/MNIST/raw, or the four files right in ROOT
        folders += [r / FOLDERS[name] / "raw", r]
    return folders + SYSTEM_COPIES[name]


def download_failure(e: Exception) -> str:
    """Why torchvision's download failed, in a few words: its message names the file on the first line and the
    reason (urlopen's error) on the last, e.g. "Name or service not known" when there is no network."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reason = lines[-1].strip("<>") if lines else type(e).__name__
    return reason[:120]


def locate(name: str, root: str | None = None, download: bool = True) -> Path:
    """The folder holding the four IDX files of `name`, downloading them with torchvision if nowhere else."""
    if name not in FOLDERS:
        raise bad_value("data.name", name, f"one of {sorted(FOLDERS)}")
    tried = candidate_folders(name, root)
    bad = []
    for folder in tried:
        if _complete(folder):
            for problem in bad:  # an earlier place is broken: say so, it may be the copy that was meant
                log.warning("%s: skipped; %s found in %s", problem, name, folder)
            return folder
        bad += _bad_entries(folder)
    if bad:  # something stands where a data file should: a download would not fix it, and hides it
        raise DnnlabError(f"{name}: {'; '.join(bad)}; replace it with the IDX file (or remove it)")
    if download:
        target = cache_dir()
        log.warning("%s: no local copy; downloading it with torchvision into %s", name, target)
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)  # torchvision's urlopen has none: a network that drops packets would hang
        try:
            import torchvision.datasets as tvd

            cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
            cls(str(target), train=True, download=True)
            cls(str(target), train=False, download=True)
        except Exception as e:  # no network, a mirror down, a checksum mismatch: all end in the same advice
            tried.append(Path(f"torchvision download into {target} ({download_failure(e)})"))
        else:
            return target / FOLDERS[name] / "raw"
        finally:
            socket.setdefaulttimeout(previous)
    hint = "set data.root or $DNNLAB_DATA to a folder with the four IDX files"
    if name == "fashion_mnist":
        hint += " (on Debian/Ubuntu: apt-get install dataset-fashion-mnist)"
    raise DnnlabError(f"{name} not found; tried: {', '.join(map(str, tried))}; {hint}")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one IDX file (optionally gzipped), checking magic number, dimensions and size."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # truncated gzip streams raise EOFError, corrupt ones BadGzipFile (OSError)
        raise DnnlabError(f"{path}: cannot read ({e}); the file is truncated or corrupt, fetch it again") from None
    if not raw:  # an empty .gz file reads as an empty stream, without an error
        what = "decompresses to nothing" if path.stat().st_size else "an empty file (0 bytes)"
        raise DnnlabError(f"{path}: {what}; not an IDX file, fetch it again")
    if len(raw) < 8 or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise DnnlabError(f"{path}: bad magic number {found} (expected {magic}); not an IDX file of this kind")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    header = 4 + 4 * ndim
    if len(raw) != header + int(np.prod(dims)):
        raise DnnlabError(f"{path}: {len(raw) - header} data bytes for dimensions {dims}; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def split_files(folder: Path, split: str) -> tuple[Path, Path]:
    """The images and labels files of `split` in `folder` (each `stem` or `stem.gz`), or a DnnlabError naming the
    one that is missing or is not a file."""
    found = []
    for stem in FILES[split]:
        path = _find_file(folder, stem)
        if path is None:
            whys = {name: not_a_file(folder / name) for name in (stem, stem + ".gz")}
            name, why = next(((n, w) for n, w in whys.items() if w != "does not exist"), (stem, "does not exist"))
            raise DnnlabError(f"{folder / name} {why}" + (" (nor does its .gz)" if why == "does not exist" else ""))
        found.append(path)
    return found[0], found[1]


def read_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    img_path, lbl_path = split_files(folder, split)
    images, labels = read_idx(img_path, IMAGE_MAGIC), read_idx(lbl_path, LABEL_MAGIC)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DnnlabError(f"{img_path}: images of shape {images.shape[1:]}, expected 28x28")
    if len(images) != len(labels):
        raise DnnlabError(f"{img_path.name} has {len(images)} images but {lbl_path.name} {len(labels)} labels "
                          f"(in {folder})")
    if labels.size and labels.max() > 9:
        raise DnnlabError(f"{lbl_path}: label {labels.max()} outside 0-9")
    if not len(images):
        raise DnnlabError(f"{img_path}: 0 images (a valid but empty IDX file); fetch the {split} files again")
    return images, labels


@dataclass
class Splits:
    """Every split as one tensor on the training device: x float32 (n, 784), y int64 (n,)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[int]
    source: str

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def _per_class(y: np.ndarray, n: int, rng: np.random.Generator | None, key: str) -> np.ndarray:
    """Indices of n examples of every class present, in their original order: drawn without replacement, or the
    first n of each class where rng is None."""
    picks = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if n > len(idx):
            raise bad_value(key, n, f"at most {len(idx)} (the examples of class {c} in this split)")
        picks.append(idx[:n] if rng is None else rng.choice(idx, size=n, replace=False))
    return np.sort(np.concatenate(picks))


def load(cfg, device: torch.device) -> Splits:
    """Read, split (the first or last val_size training images, or one of `folds` folds, for validation), filter
    classes, subsample, standardize."""
    folder = locate(cfg.name, cfg.root)
    x_full, y_full = read_split(folder, "train")
    x_test, y_test = read_split(folder, "test")
    files = {split: split_files(folder, split) for split in ("train", "test")}  # (images, labels) paths
    if cfg.folds:  # cross-validation: fold i of a seeded shuffle of the training images validates
        if len(x_full) < cfg.folds:
            raise DnnlabError(f"{files['train'][0]}: {len(x_full)} images, fewer than data.folds={cfg.folds} folds "
                              "need (one image a fold at least)")
        folds = np.array_split(np.random.default_rng(cfg.seed).permutation(len(x_full)), cfg.folds)
        val_idx = np.sort(folds[cfg.fold])
        train_idx = np.sort(np.concatenate([f for i, f in enumerate(folds) if i != cfg.fold]))
    else:
        if not 1 <= cfg.val_size < len(x_full):  # the files may be the culprit (a tiny or damaged copy)
            raise bad_value("data.val_size", cfg.val_size, f"an integer from 1 to {len(x_full) - 1} "
                            f"({files['train'][0]}: {len(x_full)} images, fewer than the validation split needs)"
                            if cfg.val_size >= len(x_full) else f"an integer from 1 to {len(x_full) - 1}")
        # the 1st and 2nd editions validate on the first 5,000 images, the 3rd on the last (older configs: last)
        val_first = cfg.get("val_from") == "first"
        cut = cfg.val_size if val_first else len(x_full) - cfg.val_size
        head, tail = np.arange(cut), np.arange(cut, len(x_full))
        val_idx, train_idx = (head, tail) if val_first else (tail, head)
    parts = {"train": (x_full[train_idx], y_full[train_idx]), "val": (x_full[val_idx], y_full[val_idx]),
             "test": (x_test, y_test)}

    classes = list(cfg.classes) if cfg.classes is not None else list(range(10))
    relabel = np.full(10, -1, dtype=np.int64)
    relabel[classes] = np.arange(len(classes))
    rng = None if cfg.get("draw") == "first" else np.random.default_rng(cfg.seed)
    for split, (x, y) in parts.items():
        keep = np.flatnonzero(relabel[y] >= 0)
        n = {"train": cfg.n_per_class, "val": cfg.val_per_class}.get(split)
        if n is not None:
            keep = keep[_per_class(y[keep], n, rng, f"data.{'n' if split == 'train' else 'val'}_per_class")]
        if split == "train" and cfg.get("n_train") is not None:
            keep = keep[:cfg.n_train]
        if len(keep) == 0:
            labels_file = files["test" if split == "test" else "train"][1]
            held = sorted(np.unique(y).tolist())
            raise bad_value("data.classes", classes, f"classes with examples in the {split} split ({len(y)} "
                                                     f"images from {labels_file}, of classes {held})")
        parts[split] = (x[keep], relabel[y[keep]])

    def tensor(x):  # pixels to [0, 1] floats on the device in one go
        return torch.as_tensor(x.reshape(len(x), -1)).to(device=device, dtype=torch.float32).div_(255.0)

    xs = {s: tensor(x) for s, (x, _) in parts.items()}
    if cfg.standardize != "none":  # statistics from the training split only, so nothing leaks from val/test
        dims = None if cfg.standardize == "global" else 0
        mean = xs["train"].mean() if dims is None else xs["train"].mean(0)
        std = xs["train"].std() if dims is None else xs["train"].std(0)
        std = torch.where(std < 1e-6, torch.ones_like(std), std)  # pixels constant in training (MNIST's borders) stay put
        xs = {s: (x - mean) / std for s, x in xs.items()}
    ys = {s: torch.as_tensor(y).to(device) for s, (_, y) in parts.items()}
    return Splits(xs["train"], ys["train"], xs["val"], ys["val"], xs["test"], ys["test"], classes, str(folder))
