"""Reusing pretrained layers (exercise 9) on tiny synthetic data."""
from __future__ import annotations

import csv

import pytest
import torch

from dnnlab import checkpoint
from dnnlab.errors import DnnlabError
from dnnlab.train import train

HIDDEN = [f"hidden{i}" for i in range(1, 6)]


@pytest.fixture(scope="module")
def source(tmp_path_factory, data_root):
    """A 0-4 network trained once for the whole module (its run directory)."""
    from hydra import compose, initialize_config_dir

    from dnnlab import CONF_DIR

    run_dir = tmp_path_factory.mktemp("source")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"data.root={data_root}", "data.val_size=100", "trainer.progress=false",
                                          "trainer.epochs=3", "data.classes=[0,1,2,3,4]"])
    train(cfg, run_dir)
    return run_dir


def target(make_cfg, source, *overrides):
    return make_cfg("transfer=reuse", f"transfer.source={source}", "data.classes=[5,6,7,8,9]",
                    "data.n_per_class=20", "trainer.epochs=3", *overrides)


def blocks(state: dict, name: str) -> dict:
    return {k: v for k, v in state.items() if k.startswith(name + ".")}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_reused_layers_equal_the_source_and_do_not_change(make_cfg, source, tmp_path):
    src_file = source / "checkpoints" / "final.pt"  # the weights the source ended with and was tested with
    src_bytes = src_file.read_bytes()
    summary = train(target(make_cfg, source), tmp_path)
    src = checkpoint.load(src_file)["model"]
    for name in ("last.pt", "best.pt"):
        mine = checkpoint.load(tmp_path / "checkpoints" / name)["model"]
        for block in HIDDEN:
            assert same(blocks(mine, block), blocks(src, block)), block
        assert mine["output.weight"].shape == (5, 100)  # a new output layer of the new width
    assert src_file.read_bytes() == src_bytes  # the source checkpoint is only read
    assert summary["transfer"]["checkpoint"] == str(src_file) and summary["transfer"]["reused"] == HIDDEN
    assert summary["transfer"]["freeze"] is True and summary["transfer"]["source_epoch"] >= 1


def test_reuse_k_layers_copies_only_those(make_cfg, source, tmp_path):
    train(target(make_cfg, source, "transfer.reuse_layers=2", "transfer.freeze=false"), tmp_path / "t")
    fresh = make_cfg("data.classes=[5,6,7,8,9]")
    from dnnlab.model import build_mlp

    torch.manual_seed(fresh.trainer.seed)
    init = build_mlp(fresh, 5).state_dict()  # what the untouched layers start from with this seed
    src = checkpoint.load(source / "checkpoints" / "best.pt")["model"]
    first = checkpoint.load(tmp_path / "t" / "checkpoints" / "last.pt")["model"]
    for block in HIDDEN[:2]:  # trained (not frozen), so they moved away from the source
        assert not same(blocks(first, block), blocks(src, block))
    assert not same(blocks(init, "hidden3"), blocks(src, "hidden3"))


def test_reused_layers_start_from_the_source_when_not_frozen(make_cfg, source, tmp_path):
    cfg = target(make_cfg, source, "transfer.reuse_layers=2", "transfer.freeze=false", "optimizer.lr=1e-12",
                 "optimizer=sgd")
    train(cfg, tmp_path)
    mine = checkpoint.load(tmp_path / "checkpoints" / "last.pt")["model"]
    src = checkpoint.load(source / "checkpoints" / "best.pt")["model"]
    for block in HIDDEN[:2]:  # a vanishing learning rate leaves the copies where they started
        assert all(torch.allclose(mine[k], src[k], atol=1e-9) for k in blocks(src, block))
    for block in HIDDEN[2:]:
        assert not same(blocks(mine, block), blocks(src, block))


def test_cached_and_uncached_training_agree(make_cfg, source, tmp_path):
    plain = train(target(make_cfg, source), tmp_path / "plain")
    cached = train(target(make_cfg, source, "transfer.cache=true"), tmp_path / "cached")
    rows = [list(csv.DictReader(open(tmp_path / d / "metrics.csv"))) for d in ("plain", "cached")]
    for a, b in zip(*rows):
        for key in ("train_loss", "val_loss", "val_acc"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-6)
    assert plain["test_acc"] == cached["test_acc"]
    assert cached["transfer"]["cache_seconds"] > 0


def test_unfreezing_changes_exactly_the_top_layers(make_cfg, source, tmp_path):
    summary = train(target(make_cfg, source, "transfer.unfreeze_top=2", "trainer.early_stopping.monitor=null"),
                    tmp_path)
    assert [p["phase"] for p in summary["phases"]] == ["train", "unfreeze 2"]
    assert summary["phases"][0]["unfrozen"] == ["hidden4", "hidden5"]
    assert summary["phases"][1]["lr"] == pytest.approx(1e-4)  # Adam's 1e-3 times the default factor 0.1
    assert summary["epochs"] == 6
    src = checkpoint.load(source / "checkpoints" / "best.pt")["model"]
    end_of_phase_1 = checkpoint.load(tmp_path / "checkpoints" / "last.pt")["model"]
    for block in HIDDEN[:3]:
        assert same(blocks(end_of_phase_1, block), blocks(src, block)), block
    for block in HIDDEN[3:]:
        assert not same(blocks(end_of_phase_1, block), blocks(src, block)), block
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-3] * 3 + [1e-4] * 3)


def test_unfreeze_all(make_cfg, source, tmp_path):
    summary = train(target(make_cfg, source, "transfer.unfreeze_top=all", "transfer.reuse_layers=4"), tmp_path)
    assert summary["phases"][0]["unfrozen"] == HIDDEN[:4]


def test_source_of_another_architecture_is_refused(make_cfg, source, tmp_path):
    with pytest.raises(DnnlabError, match=r"hidden1\.0\.weight.*\(100, 784\).*\(50, 784\)"):
        train(target(make_cfg, source, "model.n_neurons=50"), tmp_path)
    with pytest.raises(DnnlabError, match=r"activation\._target_.*ELU.*ReLU"):
        train(target(make_cfg, source, "activation=relu"), tmp_path)
    with pytest.raises(DnnlabError, match=r"transfer\.reuse_layers"):
        train(target(make_cfg, source, "model.n_hidden=6", "transfer.reuse_layers=6"), tmp_path)
    assert not (tmp_path / "metrics.csv").exists()


@pytest.mark.parametrize("overrides,key", [
    (["transfer.unfreeze_top=6"], "transfer.unfreeze_top"),
    (["transfer.reuse_layers=7"], "transfer.reuse_layers"),
    (["transfer.freeze=false", "transfer.cache=true"], "transfer.cache"),
    (["transfer.unfreeze_lr_factor=0"], "transfer.unfreeze_lr_factor"),
])
def test_bad_transfer_settings(make_cfg, source, tmp_path, overrides, key):
    with pytest.raises(DnnlabError, match=key.replace(".", r"\.")):
        train(target(make_cfg, source, *overrides), tmp_path)


def test_source_is_required_and_must_exist(make_cfg, tmp_path):
    with pytest.raises(DnnlabError, match="transfer.source is required"):
        train(make_cfg("experiment=transfer_5_9"), tmp_path)
    with pytest.raises(DnnlabError, match="transfer.source"):
        train(make_cfg("transfer=reuse", f"transfer.source={tmp_path / 'nothing'}"), tmp_path)
    (tmp_path / "fake.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DnnlabError, match="not a readable checkpoint"):
        train(make_cfg("transfer=reuse", f"transfer.source={tmp_path / 'fake.pt'}"), tmp_path)


def test_frozen_epochs_sets_the_first_phase(make_cfg, source, tmp_path):
    summary = train(target(make_cfg, source, "transfer.unfreeze_top=all", "transfer.frozen_epochs=1",
                           "trainer.early_stopping.monitor=null"), tmp_path)
    assert [p["epochs"] for p in summary["phases"]] == [1, 3]  # the book: 4 frozen epochs, then 16 more


def test_reuse_works_across_a_different_output_width(make_cfg, source, tmp_path):
    """The 5-class source under a 10-class and a 2-class head: the hidden layers carry over, the output is new."""
    src = checkpoint.load(source / "checkpoints" / "best.pt")["model"]
    for classes, width in (("null", 10), ("[3,8]", 2)):
        run_dir = tmp_path / str(width)
        summary = train(make_cfg("transfer=reuse", f"transfer.source={source}", f"data.classes={classes}",
                                 "trainer.epochs=2"), run_dir)
        mine = checkpoint.load(run_dir / "checkpoints" / "last.pt")["model"]
        assert summary["status"] == "completed" and summary["transfer"]["reused"] == HIDDEN
        assert mine["output.weight"].shape == (width, 100) and src["output.weight"].shape == (5, 100)
        for block in HIDDEN:
            assert same(blocks(mine, block), blocks(src, block)), block


def test_source_is_checked_before_the_data_are_read(make_cfg, tmp_path):
    """Without MNIST on disk, a missing source is still what is told: paths are values, checked first."""
    (tmp_path / "no_data").mkdir()
    cfg = make_cfg("experiment=transfer_5_9", f"transfer.source={tmp_path / 'missing'}",
                   f"data.root={tmp_path / 'no_data'}")
    with pytest.raises(DnnlabError, match=r"transfer\.source=.*does not exist"):
        train(cfg, tmp_path / "run")
