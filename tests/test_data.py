"""The IDX loader: where it looks, what it rejects, how it cuts, subsamples and standardizes the splits."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from omegaconf import OmegaConf

from dnnlab import CONF_DIR, data
from dnnlab.data import cache_dir, candidate_folders, load, locate, read_split
from dnnlab.errors import DnnlabError
from tests.conftest import N_TEST_PER_CLASS, N_TRAIN_PER_CLASS, idx_bytes, needs_real, real_folder, write_dataset

CPU = torch.device("cpu")
STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class Offline(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No test sees the real cache, $DNNLAB_DATA, a system copy or the network."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DNNLAB_DATA", raising=False)
    monkeypatch.setattr(data, "SYSTEM_COPIES", {"mnist": [], "fashion_mnist": [tmp_path / "no-system-copy"]})

    def offline(*args, **kwargs):
        # torchvision's own message: the file first, urlopen's reason last
        raise Offline("Error downloading train-images-idx3-ubyte.gz:\nTried http://mirror.invalid/, got:\n"
                      "<urlopen error [Errno -2] Name or service not known>\n")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)


def data_cfg(root, **overrides):
    cfg = OmegaConf.load(CONF_DIR / "data" / "fashion_mnist.yaml")
    return OmegaConf.merge(cfg, {"root": str(root), "val_size": 100, **overrides})


def write_arrays(folder: Path, train, test, gz: bool = False) -> Path:
    """The four IDX files of the given (images, labels) pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, (x, y) in (("train", train), ("t10k", test)):
        for kind, array in (("images-idx3", x), ("labels-idx1", y)):
            raw = idx_bytes(np.asarray(array, dtype=np.uint8))
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)
    return folder


def snapshot(folder: Path) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def pixels(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.reshape(len(x), -1).copy()).float() / 255


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A torchvision-layout root with a tiny Fashion-MNIST: 600 train (60 a class), 120 test (12 a class)."""
    write_dataset(tmp_path / "root" / "FashionMNIST" / "raw", seed=5)
    return tmp_path / "root"


# --- reading ---

def test_gz_and_raw_files_read_the_same(tmp_path):
    a = write_dataset(tmp_path / "a", seed=3, gz_train=True, gz_test=True)
    b = write_dataset(tmp_path / "b", seed=3, gz_train=False, gz_test=False)
    assert {p.suffix for p in a.iterdir()} == {".gz"} and {p.suffix for p in b.iterdir()} == {""}
    for split in ("train", "test"):
        (xa, ya), (xb, yb) = read_split(a, split), read_split(b, split)
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    x, y = read_split(a, "train")
    assert x.shape == (10 * N_TRAIN_PER_CLASS, 28, 28) and x.dtype == np.uint8
    assert np.array_equal(np.bincount(y), [N_TRAIN_PER_CLASS] * 10)


def test_read_returns_exactly_what_was_written(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (7, 28, 28)), np.array([3, 1, 4, 1, 5, 9, 2])
    test = rng.integers(0, 256, (2, 28, 28)), np.array([6, 5])
    folder = write_arrays(tmp_path / "d", train, test, gz=True)
    x, y = read_split(folder, "train")
    assert np.array_equal(x, train[0]) and y.tolist() == [3, 1, 4, 1, 5, 9, 2]
    assert read_split(folder, "test")[1].tolist() == [6, 5]


# --- where the files are found ---

def test_candidate_folders_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("DNNLAB_DATA", str(tmp_path / "env"))
    cache = tmp_path / "xdg" / "dnnlab"
    assert cache_dir() == cache
    assert candidate_folders("fashion_mnist", str(tmp_path / "root")) == [
        tmp_path / "root" / "FashionMNIST" / "raw", tmp_path / "root",
        tmp_path / "env" / "FashionMNIST" / "raw", tmp_path / "env",
        cache / "FashionMNIST" / "raw", cache,
        tmp_path / "no-system-copy"]
    assert candidate_folders("mnist", None)[:2] == [tmp_path / "env" / "MNIST" / "raw", tmp_path / "env"]


def test_cache_dir_defaults_to_home_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "dnnlab"


def test_locate_order_root_env_cache_system(tmp_path, monkeypatch):
    root = write_dataset(tmp_path / "root" / "FashionMNIST" / "raw")  # torchvision layout
    env = write_dataset(tmp_path / "env")  # the four files right in the folder
    cache = write_dataset(tmp_path / "xdg" / "dnnlab" / "FashionMNIST" / "raw")
    system = write_dataset(tmp_path / "system")  # as Debian's /usr/share/datasets/fashion-mnist
    monkeypatch.setitem(data.SYSTEM_COPIES, "fashion_mnist", [system])
    monkeypatch.setenv("DNNLAB_DATA", str(env))
    assert locate("fashion_mnist", str(tmp_path / "root")) == root
    assert locate("fashion_mnist", None) == env
    monkeypatch.delenv("DNNLAB_DATA")
    assert locate("fashion_mnist", None) == cache
    shutil.rmtree(tmp_path / "xdg")
    assert locate("fashion_mnist", None) == system
    with pytest.raises(DnnlabError):  # system copies are per dataset
        locate("mnist", None)


def test_locate_flat_root_and_torchvision_env(tmp_path, monkeypatch):
    flat = write_dataset(tmp_path / "flat")
    env = write_dataset(tmp_path / "env" / "MNIST" / "raw")
    monkeypatch.setenv("DNNLAB_DATA", str(tmp_path / "env"))
    assert locate("mnist", str(flat)) == flat
    assert locate("mnist", None) == env
    monkeypatch.setenv("HOME", str(tmp_path))
    assert locate("mnist", "~/flat") == flat  # data.root may use ~


def test_incomplete_folders_are_skipped(tmp_path, monkeypatch):
    root = write_dataset(tmp_path / "root")
    (root / "t10k-labels-idx1-ubyte").unlink()  # three of four files
    env = write_dataset(tmp_path / "env")
    monkeypatch.setenv("DNNLAB_DATA", str(env))
    assert locate("fashion_mnist", str(root)) == env


def test_download_goes_into_the_cache(tmp_path, monkeypatch):
    calls = []

    def fake(root, train, download):
        calls.append((root, train, download))
        write_dataset(Path(root) / "FashionMNIST" / "raw")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake)
    found = locate("fashion_mnist", str(tmp_path / "empty"))
    assert found == tmp_path / "xdg" / "dnnlab" / "FashionMNIST" / "raw"
    assert calls == [(str(tmp_path / "xdg" / "dnnlab"), True, True), (str(tmp_path / "xdg" / "dnnlab"), False, True)]
    assert read_split(found, "test")[0].shape == (10 * N_TEST_PER_CLASS, 28, 28)


def test_not_found_is_one_line_listing_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("DNNLAB_DATA", str(tmp_path / "env"))
    with pytest.raises(DnnlabError) as info:
        locate("fashion_mnist", str(tmp_path / "root"))
    message = str(info.value)
    assert "\n" not in message
    for folder in candidate_folders("fashion_mnist", str(tmp_path / "root")):
        assert str(folder) in message
    assert "torchvision download" in message and "(urlopen error [Errno -2] Name or service not known)" in message
    assert "Tried" not in message
    assert "apt-get install dataset-fashion-mnist" in message
    with pytest.raises(DnnlabError) as info:
        locate("mnist", None)
    assert "\n" not in str(info.value) and str(tmp_path / "env" / "MNIST" / "raw") in str(info.value)


def test_not_found_survives_an_exception_without_message(monkeypatch):
    def fails(*args, **kwargs):
        raise TimeoutError()

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fails)
    with pytest.raises(DnnlabError, match="TimeoutError"):
        locate("fashion_mnist", None)


def test_unknown_dataset_name():
    with pytest.raises(DnnlabError, match="data.name"):
        locate("cifar10", None)


# --- validation: bad files are named, never modified ---

def damage(folder: Path, stem: str, how: str) -> Path:
    """Break one file of `folder`; returns the path the error must name."""
    path = next(folder / (stem + ext) for ext in ("", ".gz") if (folder / (stem + ext)).is_file())
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if how == "truncate":  # cut the stored bytes (the gzip stream itself for .gz)
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
        return path
    if how == "magic":
        raw = bytes([0, 0, 8, 2]) + raw[4:]
    elif how == "label":
        raw = raw[:8] + bytes([12]) + raw[9:]
    elif how == "count":
        raw = raw[:4] + (int.from_bytes(raw[4:8], "big") - 1).to_bytes(4, "big") + raw[8:-1]
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


@pytest.mark.parametrize("stem,how,gz", [
    ("train-images-idx3-ubyte", "truncate", True),
    ("train-labels-idx1-ubyte", "truncate", True),
    ("t10k-images-idx3-ubyte", "truncate", False),
    ("t10k-labels-idx1-ubyte", "truncate", False),
    ("train-images-idx3-ubyte", "magic", True),
    ("t10k-labels-idx1-ubyte", "magic", False),
    ("t10k-labels-idx1-ubyte", "label", False),
])
def test_bad_files_raise_naming_the_file(tmp_path, stem, how, gz):
    folder = write_dataset(tmp_path / "d", gz_train=gz, gz_test=gz)
    path = damage(folder, stem, how)
    before = snapshot(folder)
    split = "train" if stem.startswith("train") else "test"
    with pytest.raises(DnnlabError) as info:
        read_split(folder, split)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert snapshot(folder) == before


def test_bad_label_in_a_gz_file_names_that_file(tmp_path):
    folder = write_dataset(tmp_path / "d", gz_train=True)
    path = damage(folder, "train-labels-idx1-ubyte", "label")
    with pytest.raises(DnnlabError, match="label 12") as info:
        read_split(folder, "train")
    assert str(path) in str(info.value)


def test_corrupt_gzip_is_named(tmp_path):
    folder = write_dataset(tmp_path / "d", gz_train=True)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(b"this is not gzip data at all")
    with pytest.raises(DnnlabError, match="train-labels-idx1-ubyte.gz: cannot read"):
        read_split(folder, "train")


def test_image_label_count_mismatch(tmp_path):
    folder = write_dataset(tmp_path / "d", gz_test=False)
    damage(folder, "t10k-labels-idx1-ubyte", "count")  # a valid IDX file with one label fewer
    with pytest.raises(DnnlabError) as info:
        read_split(folder, "test")
    n = 10 * N_TEST_PER_CLASS
    assert str(folder) in str(info.value)
    assert f"t10k-images-idx3-ubyte has {n} images but t10k-labels-idx1-ubyte {n - 1} labels" in str(info.value)


def test_errors_reach_load_and_files_stay_untouched(tiny):
    folder = tiny / "FashionMNIST" / "raw"
    before = snapshot(folder)
    load(data_cfg(tiny, standardize="per_pixel", n_per_class=5), CPU)  # reading never writes
    assert snapshot(folder) == before
    path = damage(folder, "t10k-images-idx3-ubyte", "truncate")
    with pytest.raises(DnnlabError, match=str(path)):
        load(data_cfg(tiny), CPU)


# --- load: splits, classes, subsampling, standardization ---

def test_val_split_is_the_last_val_size_training_images(tiny):
    x, y = read_split(tiny / "FashionMNIST" / "raw", "train")
    s = load(data_cfg(tiny, val_size=150), CPU)
    assert torch.equal(s.x_val, pixels(x[-150:])) and s.y_val.tolist() == y[-150:].tolist()
    assert torch.equal(s.x_train, pixels(x[:-150])) and s.y_train.tolist() == y[:-150].tolist()
    assert s.classes == list(range(10)) and s.n_classes == 10
    assert s.source == str(tiny / "FashionMNIST" / "raw")


def test_val_from_first_holds_out_the_first_val_size_training_images(tiny):
    """The 1st and 2nd editions' split: X_train_full[:5000] validates, the rest trains, in file order."""
    x, y = read_split(tiny / "FashionMNIST" / "raw", "train")
    s = load(data_cfg(tiny, val_size=150, val_from="first"), CPU)
    assert torch.equal(s.x_val, pixels(x[:150])) and s.y_val.tolist() == y[:150].tolist()
    assert torch.equal(s.x_train, pixels(x[150:])) and s.y_train.tolist() == y[150:].tolist()
    last = load(data_cfg(tiny, val_size=150, val_from="last"), CPU)
    assert not torch.equal(last.x_val, s.x_val)


def test_n_train_keeps_the_first_n_training_images_of_the_chosen_classes(tiny):
    """The notebooks' task B: X_train_B[:200], the first images of its classes in the files' order."""
    x, y = read_split(tiny / "FashionMNIST" / "raw", "train")
    s = load(data_cfg(tiny, classes=[5, 6], n_train=7), CPU)
    first = np.flatnonzero(np.isin(y[:500], [5, 6]))[:7]
    assert torch.equal(s.x_train, pixels(x[first])) and s.y_train.tolist() == [int(c == 6) for c in y[first]]
    whole = load(data_cfg(tiny, classes=[5, 6]), CPU)
    assert torch.equal(s.x_val, whole.x_val) and torch.equal(s.x_test, whole.x_test)  # only training is cut


def test_tensor_types_and_shapes(tiny):
    s = load(data_cfg(tiny), CPU)
    for x, y, n in ((s.x_train, s.y_train, 500), (s.x_val, s.y_val, 100), (s.x_test, s.y_test, 120)):
        assert x.dtype == torch.float32 and x.shape == (n, 784) and x.device == CPU
        assert y.dtype == torch.int64 and y.shape == (n,) and y.device == CPU
        assert 0 <= x.min() and x.max() <= 1


def test_tensors_go_to_the_requested_device(tiny):
    meta = torch.device("meta")  # a device other than the CPU that needs no hardware
    s = load(data_cfg(tiny), meta)
    assert {t.device for t in (s.x_train, s.y_train, s.x_val, s.y_val, s.x_test, s.y_test)} == {meta}
    assert s.x_train.dtype == torch.float32 and s.y_test.dtype == torch.int64


def test_classes_subset_is_relabelled_in_the_given_order(tiny):
    folder = tiny / "FashionMNIST" / "raw"
    x, y = read_split(folder, "train")
    xt, yt = read_split(folder, "test")
    s = load(data_cfg(tiny, classes=[7, 3, 5]), CPU)
    new = {7: 0, 3: 1, 5: 2}
    keep = np.isin(y[:500], [7, 3, 5])
    assert torch.equal(s.x_train, pixels(x[:500][keep]))
    assert s.y_train.tolist() == [new[c] for c in y[:500][keep]]
    keep_t = np.isin(yt, [7, 3, 5])
    assert len(s.x_test) == 3 * N_TEST_PER_CLASS  # every test image of the chosen classes
    assert torch.equal(s.x_test, pixels(xt[keep_t])) and s.y_test.tolist() == [new[c] for c in yt[keep_t]]
    assert set(s.y_val.tolist()) <= {0, 1, 2} and s.classes == [7, 3, 5] and s.n_classes == 3


def row_index(x: np.ndarray) -> dict[bytes, int]:
    return {row.tobytes(): i for i, row in enumerate(x.reshape(len(x), -1))}


def picked(s_x: torch.Tensor, index: dict[bytes, int]) -> list[int]:
    rows = (s_x * 255).round().to(torch.uint8).numpy()
    return [index[r.tobytes()] for r in rows]


def test_n_per_class_draws_exactly_n_reproducibly(tiny):
    x, y = read_split(tiny / "FashionMNIST" / "raw", "train")
    index = row_index(x)
    a = load(data_cfg(tiny, n_per_class=5), CPU)
    assert torch.bincount(a.y_train).tolist() == [5] * 10
    idx = picked(a.x_train, index)
    assert idx == sorted(idx) and max(idx) < 500  # original order, and never from the validation part
    assert a.y_train.tolist() == y[idx].tolist()
    assert len(a.x_val) == 100 and len(a.x_test) == 120  # val_per_class unset: the others are whole
    b = load(data_cfg(tiny, n_per_class=5), CPU)
    assert torch.equal(a.x_train, b.x_train)
    c = load(data_cfg(tiny, n_per_class=5, seed=7), CPU)
    assert not torch.equal(a.x_train, c.x_train) and torch.bincount(c.y_train).tolist() == [5] * 10


def test_draw_first_takes_the_first_n_of_each_class_in_file_order(tiny):
    """The 1st edition's sample_n_instances_per_class: the first n images of every class, whatever the seed."""
    x, y = read_split(tiny / "FashionMNIST" / "raw", "train")
    s = load(data_cfg(tiny, n_per_class=3, val_per_class=2, draw="first", seed=5), CPU)
    first = np.sort(np.concatenate([np.flatnonzero(y[:500] == c)[:3] for c in range(10)]))
    assert torch.equal(s.x_train, pixels(x[first])) and s.y_train.tolist() == y[first].tolist()
    val = 500 + np.sort(np.concatenate([np.flatnonzero(y[500:] == c)[:2] for c in range(10)]))
    assert torch.equal(s.x_val, pixels(x[val]))
    assert torch.equal(s.x_train, load(data_cfg(tiny, n_per_class=3, draw="first", seed=6), CPU).x_train)


def test_val_per_class_draws_exactly_n_from_the_validation_part(tiny):
    x, _ = read_split(tiny / "FashionMNIST" / "raw", "train")
    index = row_index(x)
    a = load(data_cfg(tiny, val_size=300, val_per_class=3, classes=[0, 4, 9]), CPU)
    assert torch.bincount(a.y_val).tolist() == [3] * 3
    assert min(picked(a.x_val, index)) >= 300
    assert torch.equal(a.x_val, load(data_cfg(tiny, val_size=300, val_per_class=3, classes=[0, 4, 9]), CPU).x_val)
    b = load(data_cfg(tiny, val_size=300, val_per_class=3, classes=[0, 4, 9], seed=1), CPU)
    assert not torch.equal(a.x_val, b.x_val)


def test_n_per_class_larger_than_a_class_is_refused(tiny):
    with pytest.raises(DnnlabError, match="data.n_per_class"):
        load(data_cfg(tiny, n_per_class=1000), CPU)


@pytest.fixture
def bright_val(tmp_path) -> Path:
    """Training images in 0-100, the validation part all 255: statistics that included it would be far off."""
    rng = np.random.default_rng(4)
    x = rng.integers(0, 101, (200, 28, 28))
    x[150:] = 255
    test = rng.integers(0, 256, (30, 28, 28)), np.arange(30) % 10
    write_arrays(tmp_path / "bv", (x, np.arange(200) % 10), test)
    return tmp_path / "bv"


def test_standardize_global_uses_training_statistics_only(bright_val):
    folder = bright_val
    x, _ = read_split(folder, "train")
    xt, _ = read_split(folder, "test")
    s = load(data_cfg(folder, val_size=50, standardize="global"), CPU)
    train = x[:150].astype(np.float64) / 255
    mean, std = train.mean(), train.std(ddof=1)
    assert abs(s.x_train.mean().item()) < 1e-5 and s.x_train.std().item() == pytest.approx(1, abs=1e-5)
    for got, raw in ((s.x_val, x[150:]), (s.x_test, xt)):
        want = (raw.reshape(len(raw), -1) / 255 - mean) / std
        torch.testing.assert_close(got, torch.from_numpy(want).float(), rtol=1e-5, atol=1e-4)


def test_standardize_per_pixel_uses_training_statistics_only(bright_val):
    folder = bright_val
    x, _ = read_split(folder, "train")
    xt, _ = read_split(folder, "test")
    s = load(data_cfg(folder, val_size=50, standardize="per_pixel"), CPU)
    train = x[:150].reshape(150, -1).astype(np.float64) / 255
    mean, std = train.mean(0), train.std(0, ddof=1)
    assert s.x_train.mean(0).abs().max().item() < 1e-5
    torch.testing.assert_close(s.x_train.std(0), torch.ones(784), rtol=0, atol=1e-5)
    for got, raw in ((s.x_val, x[150:]), (s.x_test, xt)):
        want = (raw.reshape(len(raw), -1) / 255 - mean) / std
        torch.testing.assert_close(got, torch.from_numpy(want).float(), rtol=1e-5, atol=1e-4)


def test_per_pixel_pixel_constant_in_training_stays_finite_scale(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (200, 28, 28))
    x[:, 0, 0] = 0  # always 0 in training (MNIST's border pixels)
    xt = rng.integers(0, 256, (20, 28, 28))
    xt[:, 0, 0] = 255
    folder = write_arrays(tmp_path / "c", (x, np.arange(200) % 10), (xt, np.arange(20) % 10))
    s = load(data_cfg(folder, val_size=50, standardize="per_pixel"), CPU)
    assert s.x_test.abs().max().item() < 10


# --- the real datasets ---

@pytest.mark.slow
@needs_real("mnist", "fashion_mnist")
def test_real_datasets_match_the_published_facts():
    def mean_std(x: np.ndarray) -> tuple[float, float]:  # exact, from the histogram of the 256 pixel values
        counts, v = np.bincount(x.ravel(), minlength=256), np.arange(256) / 255
        mean = (counts * v).sum() / counts.sum()
        return mean, np.sqrt((counts * (v - mean) ** 2).sum() / counts.sum())

    mnist = real_folder("mnist")
    x, y = read_split(mnist, "train")
    xt, yt = read_split(mnist, "test")
    assert x.shape == (60000, 28, 28) and xt.shape == (10000, 28, 28)
    assert y[:5].tolist() == [5, 0, 4, 1, 9] and yt[:5].tolist() == [7, 2, 1, 0, 4]
    assert np.bincount(y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert mean_std(x) == pytest.approx((0.1307, 0.3081), abs=5e-4)
    assert locate("mnist", str(mnist)) == mnist

    fashion = real_folder("fashion_mnist")
    x, y = read_split(fashion, "train")
    _, yt = read_split(fashion, "test")
    assert np.bincount(y).tolist() == [6000] * 10 and np.bincount(yt).tolist() == [1000] * 10
    assert mean_std(x) == pytest.approx((0.2860, 0.3530), abs=5e-4)


def test_k_fold_cross_validation_splits(make_cfg):
    from dnnlab.data import load

    k, seen = 5, []
    for fold in range(k):
        data = load(make_cfg("data.folds=5", f"data.fold={fold}").data, torch.device("cpu"))
        assert len(data.x_train) + len(data.x_val) == 10 * N_TRAIN_PER_CLASS
        assert len(data.x_val) == 10 * N_TRAIN_PER_CLASS // k
        seen.append({tuple(row.tolist()) for row in data.x_val[:, :64]})  # pixel rows identify images here
        assert not seen[-1] & {tuple(row.tolist()) for row in data.x_train[:, :64]}  # held out, not trained on
    assert len(set().union(*seen)) == 10 * N_TRAIN_PER_CLASS  # the folds cover every training image once
    again = load(make_cfg("data.folds=5", "data.fold=2").data, torch.device("cpu"))
    assert {tuple(r.tolist()) for r in again.x_val[:, :64]} == seen[2]  # the same seed gives the same folds


def test_fold_must_be_below_folds(make_cfg, tmp_path):
    from dnnlab.train import train

    with pytest.raises(DnnlabError, match=r"data\.fold=5 is not allowed: an integer from 0 to 4"):
        train(make_cfg("data.folds=5", "data.fold=5"), tmp_path)


# --- files that are there but are not what they should be: named, never downloaded over ---

@pytest.mark.parametrize("stem,make,expected", [
    ("t10k-images-idx3-ubyte", "empty", "an empty file (0 bytes)"),
    ("t10k-labels-idx1-ubyte", "empty_gz", "decompresses to nothing"),
    ("train-images-idx3-ubyte", "directory", "is a directory, not a file"),
    ("train-labels-idx1-ubyte", "dangling", "is a dangling symlink"),
])
def test_a_broken_data_file_is_named_and_nothing_is_downloaded(tiny, stem, make, expected):
    folder = tiny / "FashionMNIST" / "raw"
    for old in folder.glob(stem + "*"):
        old.unlink()
    path = folder / (stem + (".gz" if make == "empty_gz" else ""))
    if make == "empty":
        path.write_bytes(b"")
    elif make == "empty_gz":
        path.write_bytes(gzip.compress(b""))
    elif make == "directory":
        path.mkdir()
    else:
        path.symlink_to(folder / "moved-away")
    with pytest.raises(DnnlabError) as info:  # not Offline: no download was tried
        load(data_cfg(tiny), CPU)
    message = str(info.value)
    assert str(path) in message and expected in message and "\n" not in message
    assert not (cache_dir()).exists()  # nothing was written into the user cache


def test_a_training_file_of_three_images_is_named(tiny):
    folder = tiny / "FashionMNIST" / "raw"
    for old in folder.glob("train-*"):
        old.unlink()
    x, _ = read_split(folder, "test")
    write_arrays(folder, (x[:3], np.array([0, 1, 2])), (x, read_split(folder, "test")[1]))
    with pytest.raises(DnnlabError, match=r"train-images-idx3-ubyte: 3 images, fewer than the validation split"):
        load(data_cfg(tiny), CPU)
    # with one image to validate, two are left to train: of classes 0 and 1, not the ones asked for
    with pytest.raises(DnnlabError, match=r"train split \(2 images from .*train-labels-idx1-ubyte, of classes \[0, 1\]"):
        load(data_cfg(tiny, val_size=1, classes=[5, 6]), CPU)


def test_an_empty_test_file_is_named(tiny):
    folder = tiny / "FashionMNIST" / "raw"
    (x, y), (tx, _) = read_split(folder, "train"), read_split(folder, "test")
    write_arrays(folder, (x, y), (tx[:0], np.array([], dtype=np.uint8)))
    with pytest.raises(DnnlabError, match=r"t10k-images-idx3-ubyte: 0 images \(a valid but empty IDX file\)"):
        load(data_cfg(tiny), CPU)
