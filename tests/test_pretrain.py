"""Unsupervised (autoencoder) and auxiliary-task (same digit) pretraining, and reusing what they learned."""
from __future__ import annotations

import csv
import json
import os

import pytest
import torch
from hydra import compose, initialize_config_dir

from dnnlab import CONF_DIR, checkpoint
from dnnlab.pretrain import PairSampler, pretrain
from dnnlab.train import train
from tests import forked


@pytest.fixture
def pre_cfg(data_root):
    def make(*overrides):
        base = [f"data.root={data_root}", "data.val_size=100", "trainer.progress=false", "pretrain.epochs=2"]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("pretrain_app", overrides=base + list(overrides))
    return make


def hidden(state: dict, i: int) -> dict:
    return {k: v for k, v in state.items() if k.startswith(f"hidden{i}.")}


def test_pairs_are_half_same_half_different():
    y = torch.arange(10).repeat_interleave(7)[torch.randperm(70, generator=torch.Generator().manual_seed(0))]
    a, b, same = PairSampler(y, 10, torch.Generator().manual_seed(1)).sample(1000)
    assert same.sum() == 500
    assert torch.equal(y[a] == y[b], same.bool())  # the target says exactly whether the digits agree
    assert len(torch.unique(y[b][~same.bool()])) == 10  # every class shows up as a partner


def test_greedy_autoencoder_trains_one_layer_at_a_time(pre_cfg, tmp_path, monkeypatch):
    import dnnlab.pretrain as pre
    import dnnlab.prepare
    from dnnlab.model import build_mlp

    models, snapshots = [], []

    def keep(*args):  # the model pretrain() builds, to look at it between stages
        models.append(build_mlp(*args))
        return models[-1]

    monkeypatch.setattr(dnnlab.prepare, "build_mlp", keep)
    monkeypatch.setattr(pre.log, "info", lambda *a: snapshots.append(
        {k: v.clone() for k, v in models[0].state_dict().items()}))  # called once at the end of each stage
    summary = pretrain(pre_cfg("pretrain.greedy=true", "model.n_hidden=2"), tmp_path)
    assert summary["epochs"] == 4 and len(snapshots) == 2
    final = checkpoint.load(tmp_path / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(snapshots[0][k], final[k]) for k in hidden(final, 1))  # hidden1 fixed in stage 2
    assert not torch.equal(snapshots[0]["hidden2.0.weight"], final["hidden2.0.weight"])  # hidden2 trained then


def test_stacked_autoencoder_reconstructs_better_than_at_the_start(pre_cfg, tmp_path):
    pretrain(pre_cfg("pretrain.greedy=false", "pretrain.epochs=6", "pretrain.noise=0"), tmp_path)
    losses = [float(r["val_loss"]) for r in csv.DictReader(open(tmp_path / "metrics.csv"))]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0]


def test_same_digit_learns_the_auxiliary_task(pre_cfg, tmp_path):
    summary = pretrain(pre_cfg("pretrain=same_digit", "pretrain.epochs=8"), tmp_path)
    assert summary["val_acc"] > 0.8  # on fixed validation pairs, half of them of the same digit


def test_pretrained_layers_are_reused_with_few_labels(pre_cfg, make_cfg, tmp_path):
    pretrain(pre_cfg("pretrain=same_digit"), tmp_path / "pre")
    summary = train(make_cfg("transfer=reuse", f"transfer.source={tmp_path / 'pre'}", "data.n_per_class=5",
                             "transfer.freeze=true"), tmp_path / "fine")
    src = checkpoint.load(tmp_path / "pre" / "checkpoints" / "last.pt")["model"]
    mine = checkpoint.load(tmp_path / "fine" / "checkpoints" / "last.pt")["model"]
    for i in range(1, 6):
        assert all(torch.equal(src[k], mine[k]) for k in hidden(src, i))
    assert summary["transfer"]["reused"] == [f"hidden{i}" for i in range(1, 6)] and summary["n_train"] == 50


def test_dnnlab_pretrain_command(data_root, tmp_path):
    env = {**os.environ, "DNNLAB_DATA": str(data_root)}
    done = forked.dnnlab("pretrain", "pretrain=same_digit", "pretrain.epochs=1", "data.val_size=100",
                         "trainer.progress=false", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["pretrain"]["kind"] == "same_digit"
    bad = forked.dnnlab("pretrain", "pretrain.epochs=0", f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "pretrain.epochs=0" in bad.stderr and "Traceback" not in bad.stderr
