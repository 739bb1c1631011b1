"""Training on the real datasets, where this machine has them: ../shared/data (this project's workspace and CI),
$DNNLAB_DATA, dnnlab's cache or Debian's dataset-fashion-mnist (slow: a few seconds each; CI runs them too)."""
import pytest
from hydra import compose, initialize_config_dir

from dnnlab import CONF_DIR
from dnnlab.train import train
from tests.conftest import needs_real

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("real_data")]


def real_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=["trainer.progress=false", *overrides])


@needs_real("fashion_mnist")
def test_default_network_learns_fashion_mnist(tmp_path):
    summary = train(real_cfg("trainer.epochs=2"), tmp_path)
    assert summary["n_train"] == 55000 and summary["n_val"] == 5000 and summary["n_test"] == 10000
    assert summary["val_acc"] > 0.83 and summary["test_acc"] > 0.82  # the book's exercise reaches ~0.85 by epoch 2


@needs_real("mnist")
def test_mnist_digits_0_to_4(tmp_path):
    summary = train(real_cfg("data=mnist", "data.classes=[0,1,2,3,4]", "trainer.epochs=3"), tmp_path)
    assert summary["n_test"] == 5139  # every test image of digits 0-4
    assert summary["test_acc"] > 0.97  # the book's plain network: 97.3 %


@needs_real("fashion_mnist")
def test_batchnorm_and_1cycle_on_real_data(tmp_path):
    summary = train(real_cfg("norm=batchnorm", "optimizer=nadam", "schedule=1cycle", "schedule.max_lr=0.005",
                             "trainer.epochs=2", "trainer.batch_size=128"), tmp_path)
    assert summary["status"] == "completed" and summary["test_acc"] > 0.84


@needs_real("mnist")
def test_exercise_9_transfer_on_real_mnist(tmp_path):
    source = train(real_cfg("experiment=mnist_0_4", "trainer.epochs=3"), tmp_path / "src")
    assert source["test_acc"] > 0.97
    common = ["experiment=transfer_5_9", f"transfer.source={tmp_path / 'src'}", "trainer.epochs=30"]
    frozen = train(real_cfg(*common, "transfer.cache=true"), tmp_path / "frozen")
    assert frozen["n_train"] == 500 and frozen["n_test"] == 4861  # every test image of digits 5-9
    assert frozen["test_acc"] > 0.70  # the book's notebook: 64 % (61 % cached)
    tuned = train(real_cfg(*common, "transfer.unfreeze_top=all"), tmp_path / "tuned")
    assert tuned["test_acc"] > frozen["test_acc"]


def diagnose_real(tmp_path, *overrides):
    from dnnlab.diagnose import diagnose
    from dnnlab.runs import compose_config

    cfg = compose_config(["trainer.progress=false", "diagnose.steps=0", *overrides],
                         "diagnose_app")
    return diagnose(cfg, tmp_path / "_".join(o.replace("/", "") for o in overrides)[:80])["profile"]


@needs_real("fashion_mnist")
def test_the_chapter_stories_show_on_real_data(tmp_path):
    """dnnlab diagnose on Fashion-MNIST: vanishing gradients, self-normalisation, dying ReLUs (docs/performance.md,
    What `dnnlab diagnose` measured)."""
    # sigmoid with normal(0, 1): the gradients shrink toward the lower layers; ELU with He init keeps them level
    sigmoid = diagnose_real(tmp_path, "activation=sigmoid", "init=normal")["init"]
    elu = diagnose_real(tmp_path, "activation=elu", "init=he_normal")["init"]
    assert sigmoid[0]["grad_rms"] < sigmoid[-1]["grad_rms"] / 3 and min(r["saturated"] for r in sigmoid) > 0.5
    assert max(r["grad_rms"] for r in elu) < 3 * min(r["grad_rms"] for r in elu)
    assert elu[0]["grad_rms"] > 10 * sigmoid[0]["grad_rms"]
    # 100 layers: SELU + LeCun on standardised inputs keeps mean ~0 and std ~1 throughout; ReLU + He drifts
    deep = ["model.n_hidden=100", "data.standardize=per_pixel"]
    selu = diagnose_real(tmp_path, *deep, "activation=selu", "init=lecun_normal")["init"]
    relu = diagnose_real(tmp_path, *deep, "activation=relu", "init=he_normal")["init"]
    assert len(selu) == 100 and all(0.8 < r["act_std"] < 1.2 and abs(r["act_mean"]) < 0.2 for r in selu)
    assert relu[-1]["act_std"] < 0.5 * relu[0]["act_std"]
    # a large learning rate kills ReLU units; leaky ReLU's never die
    hot = ["diagnose.steps=300", "optimizer.lr=0.1"]
    dead_relu = diagnose_real(tmp_path, *hot, "activation=relu")["after"]
    leaky = diagnose_real(tmp_path, *hot, "activation=leaky_relu")["after"]
    assert max(r["dead"] for r in dead_relu) > 0.5 and max(r["dead"] for r in leaky) == 0


# One row of each kind: the first and the last 5,000 images validating, digits and classes picked, images per
# class and the first n, a transfer source of the same seed, a 100-layer network, a per-epoch schedule, the
# training set and MC dropout evaluated. (Every preset's config is checked in tests/test_reproduce.py.)
KINDS = ["ed1/ex9_four_layers", "ed1/ex10_scratch", "ed2/selu_100_layers", "ed2/task_b_scratch:test",
         "ed2/exponential_by_epoch", "ed2/alpha_dropout:train", "ed3/dropout:mc"]  # in the report's order


@needs_real("mnist", "fashion_mnist")
def test_reproduction_rows_of_each_kind_run_on_the_real_data(tmp_path):
    """`dnnlab reproduce` on the real datasets, one seed, one epoch of two batches: the presets train (exercise 9
    on its own seed's source run) and each row is measured."""
    import csv

    from dnnlab.reproduce import main

    main(["--only", *KINDS, "--seeds", "1", "--out", str(tmp_path),
          "-o", "trainer.epochs=1", "-o", "trainer.limit_batches=2"])
    rows = {r["id"]: r for r in csv.DictReader(open(tmp_path / "REPRODUCTION.csv"))}
    assert list(rows) == KINDS
    for done in rows.values():
        assert done["seeds"] == "1" and done["verdict"] == "one seed: not compared", done
        assert 0 < float(done["mean"]) <= 1 and done["setting"], done
    assert (tmp_path / "reproduction.png").read_bytes()[:4] == b"\x89PNG"
