"""Shared fixtures: tiny, learnable IDX datasets written to disk and read through the real loader."""
from __future__ import annotations

import functools
import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from dnnlab import CONF_DIR, conf_dirs  # noqa: F401  conf_dirs: what composing needs

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # this project's workspace and CI
REAL = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}
N_TRAIN_PER_CLASS, N_TEST_PER_CLASS = 60, 12
# How long a test waits for a child process or a state before calling it hung: never a limit on speed, so a busy
# machine (the suite on 2 cores beside other work) only makes a test slower, not fail.
HANG_S = 3600


def pytest_sessionstart(session) -> None:
    """CI (.ci/run) sets DNNLAB_REQUIRE_NATIVE=1: there the native C++ step must build, or the run fails at once,
    instead of its tests skipping with the reason as they do on a machine without a compiler."""
    if os.environ.get("DNNLAB_REQUIRE_NATIVE") and not hasattr(session.config, "workerinput"):
        from dnnlab.fast import native

        reason = native.available()
        if reason:
            raise pytest.UsageError(f"DNNLAB_REQUIRE_NATIVE is set but the native step is unavailable: {reason}")


# The files whose tests take longest (a quick benchmark, the real-data reproductions): first, so that pytest-xdist,
# which hands tests out in collection order, does not leave one worker on them while the other has nothing left.
LONGEST_FIRST = ("test_bench.py", "test_real_data.py", "test_reproduce.py")


def pytest_collection_modifyitems(items) -> None:
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # stable: the rest keep their order


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format: magic (0, 0, 0x08 = ubyte, ndim), big-endian dims, data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each class lights a different 7x7 block (plus noise), so a small MLP can learn it in a few steps."""
    images = rng.integers(0, 60, size=(len(labels), 28, 28))
    for i, c in enumerate(labels):
        row, col = divmod(int(c), 4)
        images[i, row * 7:(row + 1) * 7, col * 7:(col + 1) * 7] += 180
    return images.clip(0, 255).astype(np.uint8)


def write_dataset(folder: Path, seed: int = 0, gz_train: bool = True, gz_test: bool = False) -> Path:
    """Write the four IDX files of a tiny 10-class dataset into `folder` (train gzipped, test raw by default)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, per_class, gz in (("train", N_TRAIN_PER_CLASS, gz_train), ("t10k", N_TEST_PER_CLASS, gz_test)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
        for kind, array in (("images-idx3", make_images(labels, rng)), ("labels-idx1", labels)):
            name = f"{split}-{kind}-ubyte"
            data = idx_bytes(array)
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A data root in torchvision's layout with tiny MNIST and Fashion-MNIST."""
    root = tmp_path_factory.mktemp("data")
    write_dataset(root / "MNIST" / "raw", seed=1)
    write_dataset(root / "FashionMNIST" / "raw", seed=2)
    return root


@pytest.fixture
def make_cfg(data_root, monkeypatch):
    """Compose the real config with overrides, on the tiny data, quiet and short."""
    monkeypatch.delenv("DNNLAB_DATA", raising=False)

    def make(*overrides: str, short: bool = True):
        """short: two epochs (leave it off to keep a preset's own epochs)."""
        base = [f"data.root={data_root}", "data.val_size=100", "trainer.progress=false"]
        base += ["trainer.epochs=2"] if short else []
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("train", overrides=base + list(overrides))

    return make


# --- the real datasets, where the user already has them (never downloaded by a test) ---

def real_data_home() -> str | None:
    """What $DNNLAB_DATA is for the real-data tests: ../shared/data where it exists, else the user's own."""
    return str(SHARED_DATA) if SHARED_DATA.is_dir() else os.environ.get("DNNLAB_DATA")


@functools.cache
def real_folder(name: str) -> Path | None:
    """The folder a run finds the full dataset `name` in ($DNNLAB_DATA as above, dnnlab's cache, a system copy such
    as Debian's dataset-fashion-mnist), or None when it is not on this machine."""
    from dnnlab.data import locate, split_files
    from dnnlab.errors import DnnlabError

    saved = os.environ.get("DNNLAB_DATA")
    os.environ.pop("DNNLAB_DATA", None)
    if real_data_home():
        os.environ["DNNLAB_DATA"] = real_data_home()
    try:
        folder = locate(name, None, download=False)
        images = split_files(folder, "train")[0]
        with (gzip.open if images.suffix == ".gz" else open)(images, "rb") as f:
            full = struct.unpack(">I", f.read(8)[4:])[0] == 60000  # not a tiny copy made by a test
    except (DnnlabError, OSError, struct.error):
        full = False
    finally:
        os.environ.pop("DNNLAB_DATA", None)
        if saved is not None:
            os.environ["DNNLAB_DATA"] = saved
    return folder if full else None


def needs_real(*names: str):
    """Skip unless the real datasets `names` are on this machine, saying where they were looked for."""
    missing = [REAL[n] for n in names if real_folder(n) is None]
    system = " or /usr/share/datasets/fashion-mnist" if "Fashion-MNIST" in missing else ""
    return pytest.mark.skipif(bool(missing), reason=f"the real {' and '.join(missing)} files are not in DNNLAB_DATA, "
                                                    f"../shared/data{',' if system else ' or'} dnnlab's cache{system}")


@pytest.fixture
def real_data(monkeypatch):
    """Runs find the real datasets as real_folder did."""
    if real_data_home():
        monkeypatch.setenv("DNNLAB_DATA", real_data_home())
