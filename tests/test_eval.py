"""`dnnlab eval` (accuracy, confusion matrix, per-class accuracy, MC dropout), `dnnlab prune` (sparsity, magnitude
pruning) and `dnnlab latency` on runs trained on the tiny fixture data."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from dnnlab import CONF_DIR, checkpoint
from dnnlab.evaluation import dropout_layers, evaluate_run, main as eval_main, mc_predict
from dnnlab.latency import main as latency_main, measure
from dnnlab.sparsity import main as prune_main, prune, prune_run, sparsity
from dnnlab.train import train
from dnnlab.trained import load_trained, logits_of
from tests.test_diagnostics import assert_png

SMALL = ("model.n_hidden=2", "model.n_neurons=32")


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """trained(*overrides) -> run directory; each configuration is trained once per module."""
    cache: dict[tuple, Path] = {}

    def make(*overrides: str) -> Path:
        if overrides not in cache:
            folder = tmp_path_factory.mktemp("run")
            base = [f"data.root={data_root}", "data.val_size=100", "trainer.progress=false", "trainer.epochs=6",
                    *SMALL]
            with pytest.MonkeyPatch.context() as mp:
                mp.delenv("DNNLAB_DATA", raising=False)
                with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                    cfg = compose("train", overrides=base + list(overrides))
                summary = train(cfg, folder)
            assert summary["status"] == "completed"
            cache[overrides] = folder
        return cache[overrides]

    return make


@pytest.fixture(autouse=True)
def no_data_env(monkeypatch):
    monkeypatch.delenv("DNNLAB_DATA", raising=False)


# --- eval ------------------------------------------------------------------------------------------------------

def test_eval_reproduces_the_runs_test_metrics_and_writes_tables(trained, tmp_path):
    run = trained()
    result = evaluate_run(run, tmp_path, quiet=True)
    summary = json.loads((run / "summary.json").read_text())
    assert result["accuracy"] == pytest.approx(summary["test_acc"], abs=1e-12)
    assert result["loss"] == pytest.approx(summary["test_loss"], rel=1e-5)
    matrix = torch.tensor(result["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == result["n"] == 120
    assert matrix.diag().sum().item() / 120 == pytest.approx(result["accuracy"])
    per_class = list(result["per_class_accuracy"].values())
    assert per_class == pytest.approx((matrix.diag() / matrix.sum(1)).tolist())
    assert list(result["per_class_accuracy"])[0] == "T-shirt/top"  # Fashion-MNIST's class names
    assert_png(tmp_path / "confusion_matrix.png")
    for name in ("confusion_matrix.csv", "confusion_matrix.md", "per_class.csv", "per_class.md", "eval.json"):
        assert (tmp_path / name).is_file(), name
    rows = (tmp_path / "per_class.csv").read_text().splitlines()
    assert rows[0] == "class,name,n,accuracy" and len(rows) == 11
    assert not (tmp_path / "mc_uncertain.png").exists()


def test_eval_defaults_to_the_run_directory_and_takes_a_checkpoint_file(trained):
    run = trained()
    result = evaluate_run(run / "checkpoints" / "last.pt", quiet=True)
    assert (run / "eval" / "eval.json").is_file() and result["checkpoint"].endswith("last.pt")


def test_mc_dropout_with_rate_zero_equals_plain_inference(trained, tmp_path):
    run = trained("regularizer=dropout", "regularizer.dropout.rate=0.3")
    net = load_trained(run, with_data=False).model
    x = torch.rand(50, 784)
    for m in dropout_layers(net):
        m.p = 0.0
    mean, std = mc_predict(net, x, samples=7)
    plain = torch.softmax(logits_of(net, x), 1)
    torch.testing.assert_close(mean, plain, rtol=0, atol=1e-7)
    assert torch.all(std < 1e-6)
    # a run configured with rate 0 has no dropout layers at all: MC is plain inference, prediction for prediction
    result = evaluate_run(trained("regularizer=dropout", "regularizer.dropout.rate=0.0"), tmp_path, mc_samples=5,
                          quiet=True)
    assert result["mc"]["dropout_layers"] == 0 and result["mc"]["changed_predictions"] == 0
    assert result["mc"]["accuracy"] == result["accuracy"] and result["mc"]["mean_std"] < 1e-6
    assert result["mc"]["loss"] == pytest.approx(result["loss"], rel=1e-5)


def test_mc_dropout_samples_differ_and_report_uncertainty(trained, tmp_path):
    run = trained("regularizer=dropout", "regularizer.dropout.rate=0.3")
    rng_before = torch.get_rng_state()
    result = evaluate_run(run, tmp_path, mc_samples=20, top=5, quiet=True)
    assert torch.equal(torch.get_rng_state(), rng_before)  # MC masks come from their own seeded stream
    mc = result["mc"]
    assert mc["kinds"] == ["Dropout"] and mc["dropout_layers"] == 2
    assert mc["mean_std"] > 0 and 0 < mc["mean_entropy"] < 2.31
    assert abs(mc["accuracy"] - result["accuracy"]) < 0.15
    entropies = [panel["entropy"] for panel in mc["most_uncertain"]]
    assert len(entropies) == 5 and entropies == sorted(entropies, reverse=True)
    assert_png(tmp_path / "mc_uncertain.png")
    again = evaluate_run(run, tmp_path / "again", mc_samples=20, quiet=True)
    assert again["mc"]["accuracy"] == mc["accuracy"] and again["mc"]["mean_std"] == mc["mean_std"]  # seeded


def test_eval_takes_mc_samples_as_a_key_too(trained, tmp_path):
    run = trained("regularizer=dropout", "regularizer.dropout.rate=0.3")
    eval_main([str(run), "mc_samples=4", f"out={tmp_path}"])  # as `dnnlab train` overrides are written
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["mc"]["samples"] == 4


def test_mc_alpha_dropout_keeps_batchnorm_in_inference_mode(trained):
    run = trained("activation=selu", "init=lecun_normal", "regularizer=alpha_dropout", "norm=batchnorm")
    net = load_trained(run, with_data=False).model
    assert {type(m).__name__ for m in dropout_layers(net)} == {"AlphaDropout"}
    buffers = copy.deepcopy({k: v for k, v in net.state_dict().items() if "running" in k})
    mean, std = mc_predict(net, torch.rand(40, 784), samples=6)
    assert std.max() > 0 and not net.training
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in buffers.items())  # BN statistics untouched
    assert all(not m.training for m in net.modules())


@pytest.mark.parametrize("args,message", [
    (["no/such/run"], "does not exist"),
    (["RUN", "--mc-samples", "-1"], "--mc-samples=-1"),
    (["CORRUPT"], "not a readable checkpoint"),
    (["RUN", "--device", "cuda:7"], "--device='cuda:7' is not allowed"),
])
def test_bad_input_is_one_line_and_exit_2(trained, tmp_path, capsys, args, message):
    corrupt = tmp_path / "bad.pt"
    corrupt.write_bytes(b"not a checkpoint")
    args = [str(trained()) if a == "RUN" else str(corrupt) if a == "CORRUPT" else a for a in args]
    with pytest.raises(SystemExit) as exit_info:
        eval_main(args + ["--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("target, nested", [("os.system", False), ("pathlib.Path.touch", True)],
                         ids=["in place of a component", "inside a list"])
def test_a_checkpoint_with_a_foreign_target_is_refused_before_it_runs(trained, tmp_path, capsys, target, nested):
    state = checkpoint.load(trained() / "checkpoints" / "best.pt")
    victim = tmp_path / "victim"
    evil = f"torch.nn.ELU\n  _args_:\n  - _target_: {target}\n    _args_: [{victim}]" if nested else target
    state["config"] = state["config"].replace("torch.nn.ELU", evil)
    assert target in state["config"]
    checkpoint.save(tmp_path / "evil.pt", state)
    with pytest.raises(SystemExit):
        eval_main([str(tmp_path / "evil.pt")])
    assert target in capsys.readouterr().err and not victim.exists()


# --- sparsity and pruning -------------------------------------------------------------------------------------

def test_sparsity_counts_on_constructed_weights():
    model = nn.Sequential()
    model.add_module("hidden1", nn.Sequential(nn.Linear(4, 2)))
    model.add_module("output", nn.Linear(2, 2))
    with torch.no_grad():
        model.hidden1[0].weight.copy_(torch.tensor([[0.0, 1e-4, 0.5, -2e-3], [0.0, 0.0, -1e-5, 1.0]]))
        model.output.weight.copy_(torch.tensor([[1.0, 0.0], [2e-4, 3.0]]))
    rows = {r["layer"]: r for r in sparsity(model, 1e-3)}
    assert rows["hidden1"]["below_threshold"] == 5 / 8 and rows["hidden1"]["exact_zero"] == 3 / 8
    assert rows["output"]["below_threshold"] == 2 / 4 and rows["output"]["exact_zero"] == 1 / 4
    assert rows["all"]["weights"] == 12 and rows["all"]["below_threshold"] == 7 / 12


def test_prune_zeroes_exactly_the_smallest_weights(trained):
    net = load_trained(trained(), with_data=False).model
    mats = [m.weight for m in net.modules() if isinstance(m, nn.Linear)]
    everything = torch.cat([w.detach().abs().flatten() for w in mats])
    cut = torch.sort(everything).values[int(0.6 * everything.numel())]
    assert prune(copy.deepcopy(net), 0.0) == 0.0
    pruned = copy.deepcopy(net)
    zero = prune(pruned, 0.6)
    assert zero == pytest.approx(0.6, abs=1e-4)
    for w0, w in zip(mats, [m.weight for m in pruned.modules() if isinstance(m, nn.Linear)]):
        kept = w != 0
        assert torch.equal(w[kept], w0[kept]) and torch.all(w0.abs()[~kept] <= cut)
    per_layer = copy.deepcopy(net)
    prune(per_layer, 0.5, scope="layer")
    for m in per_layer.modules():
        if isinstance(m, nn.Linear):
            assert (m.weight == 0).float().mean().item() == pytest.approx(0.5, abs=1 / m.weight.numel())


def test_pruning_keeps_accuracy_on_an_easy_task(trained, tmp_path):
    run = trained()
    result = prune_run(run, tmp_path, levels=[0.0, 0.5, 0.8, 0.99], save=0.5)
    rows = {r["level"]: r for r in result["pruning"]}
    full = rows[0.0]["test_acc"]
    assert full > 0.9  # the fixture's classes light different 7x7 blocks: easy
    assert rows[0.5]["test_acc"] >= full - 0.05 and rows[0.5]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert rows[0.99]["test_acc"] < full  # almost nothing left
    assert_png(tmp_path / "pruning.png")
    assert (tmp_path / "pruning.csv").read_text().startswith("level,sparsity,test_acc")
    saved = evaluate_run(tmp_path / "pruned_0.5.pt", tmp_path / "eval", quiet=True)
    assert saved["accuracy"] == pytest.approx(rows[0.5]["test_acc"], abs=1e-4)
    model = load_trained(tmp_path / "pruned_0.5.pt", with_data=False).model
    assert sparsity(model, 1e-12)[-1]["exact_zero"] == pytest.approx(0.5, abs=1e-3)


def test_l1_and_ftrl_runs_report_their_sparsity(trained, tmp_path):
    plain = sparsity(load_trained(trained(), with_data=False).model, 1e-3)[-1]
    ftrl_run = trained("optimizer=ftrl", "optimizer.lr=0.3", "optimizer.l1=0.01")
    ftrl = sparsity(load_trained(ftrl_run, with_data=False).model, 1e-3)[-1]
    assert ftrl["exact_zero"] > 0.2 and plain["exact_zero"] == 0  # FTRL's l1 gives exact zeros, Adam none
    assert json.loads((ftrl_run / "summary.json").read_text())["test_acc"] > 0.9  # and the network still learned
    result = prune_run(ftrl_run, tmp_path, levels=[0.0])
    assert result["sparsity"][-1]["exact_zero"] == ftrl["exact_zero"]


def test_prune_bad_arguments_are_one_line(trained, capsys):
    with pytest.raises(SystemExit) as exit_info:
        prune_main([str(trained()), "--levels", "0.5,1.5"])
    assert exit_info.value.code == 2 and "--levels" in capsys.readouterr().err


# --- latency -----------------------------------------------------------------------------------------------------

def test_latency_measures_every_precision_this_device_has(trained, tmp_path, capfd):
    pytest.importorskip("torchao")  # int8 (dnnlab[int8], in dnnlab[test])
    run = trained()
    capfd.readouterr()
    result = measure(run, tmp_path, batch_size=16, min_time=0.01, device="cpu")
    assert capfd.readouterr().err == ""  # no warnings from torch, torchao or the benchmark's imports
    rows = {r["precision"]: r for r in result["rows"]}
    assert set(rows) == {"fp32", "bf16", "int8"} and "fp16" in result["skipped"]
    for r in rows.values():  # medians and interquartile ranges
        assert r["single_us"] > 0 and r["single_iqr_us"] >= 0 and r["batch16_ms"] > 0 and r["batch16_iqr_ms"] >= 0
        assert r["images_per_s"] > 0
    assert rows["fp32"]["acc_change_pp"] == 0
    assert abs(rows["int8"]["acc_change_pp"]) <= 5 and abs(rows["bf16"]["acc_change_pp"]) <= 5
    assert rows["int8"]["size_kb"] < rows["fp32"]["size_kb"]
    assert (tmp_path / "latency.csv").read_text().startswith(
        "precision,single_us,single_iqr_us,batch16_ms,batch16_iqr_ms,images_per_s,size_kb,test_acc")


def test_latency_times_with_the_threads_asked_and_leaves_torchs_setting_alone(trained, tmp_path):
    before = torch.get_num_threads()
    result = measure(trained(), tmp_path, batch_size=8, min_time=0.01, precisions=("fp32",), threads=before + 1,
                     device="cpu")
    assert result["threads"] == before + 1 and torch.get_num_threads() == before
    assert result["min_time_s"] == 0.01 and "batch8_ms" in result["rows"][0]


def test_latency_rejects_an_unknown_precision(trained, capsys):
    with pytest.raises(SystemExit) as exit_info:
        latency_main([str(trained()), "--precisions", "fp8"])
    assert exit_info.value.code == 2 and "--precisions=fp8" in capsys.readouterr().err


def test_latency_of_one_lower_precision_still_reports_the_change_against_fp32(trained, tmp_path):
    latency_main([str(trained()), "--precisions", "bf16", "--min-time", "0.01", "--out", str(tmp_path)])
    rows = {r["precision"]: r for r in json.loads((tmp_path / "latency.json").read_text())["rows"]}
    assert list(rows) == ["fp32", "bf16"] and isinstance(rows["bf16"]["acc_change_pp"], float)


def test_latency_without_torchao_says_in_one_line_which_extra_int8_needs(trained, tmp_path, monkeypatch, capsys):
    for module in ("torchao", "torchao.quantization", "torchao.utils"):
        monkeypatch.setitem(sys.modules, module, None)  # importing it now fails as if it were not installed
    latency_main([str(trained()), "--precisions", "int8", "--min-time", "0.01", "--device", "cpu",
                  "--out", str(tmp_path)])
    result = json.loads((tmp_path / "latency.json").read_text())
    assert [r["precision"] for r in result["rows"]] == ["fp32"]
    why = "needs dnnlab's optional packages 'int8' (torchao is not installed): pip install 'dnnlab[int8]'"
    assert result["skipped"] == {"int8": why} and f"int8: skipped ({why})\n" in capsys.readouterr().out
