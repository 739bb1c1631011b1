"""Stacked sweeps: jobs trained together as one batched network give each job the results it gets alone, write the
files of a normal run, and the hydra/launcher=stacked launcher groups compatible jobs and runs the rest alone."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dnnlab import checkpoint
from dnnlab.fast import native
from dnnlab.model import build_mlp
from dnnlab.fast.flat_adam import span
from dnnlab.optim import build_optimizer
from dnnlab.record import LearningCurves, read_scalars
from dnnlab.stack import job_major
from dnnlab.stacked import plan, train_group, why_not
from dnnlab.bookkeeping import evaluate
from dnnlab.trainer import train
from tests import forked
from tests.conftest import HANG_S

# Every per-job setting a stack must keep apart. Each job differs from the default network in these overrides.
VARIANTS = {
    "seed 1": ["trainer.seed=1"],
    "seed 2, lr 0.003": ["trainer.seed=2", "optimizer.lr=0.003"],
    "l2 0.001": ["regularizer=l2", "regularizer.l2=0.001"],
    "l1 0.0001": ["regularizer=l1", "regularizer.l1=0.0001"],
    "adamw weight decay 0.01": ["optimizer=adamw", "optimizer.weight_decay=0.01"],
    "adam L2 weight decay 0.001": ["optimizer.weight_decay=0.001"],
    "dropout 0.3": ["regularizer=dropout", "regularizer.dropout.rate=0.3"],
    "dropout 0.1 top 2, input": ["regularizer=dropout", "regularizer.dropout.rate=0.1", "regularizer.dropout.top_k=2",
                                 "regularizer.dropout.input=true"],
    "init scale 1": ["init.scale=1.0"],
    "init glorot uniform": ["init=glorot_uniform"],
    "sgd momentum": ["optimizer=momentum", "optimizer.lr=0.01"],
    "1cycle, clip norm": ["schedule=1cycle", "trainer.clip_norm=0.5"],
    "exponential, clip value": ["schedule=exponential", "schedule.s=20", "trainer.clip_value=0.01"],
    "max-norm 1": ["regularizer=max_norm"],
}
METRIC_COLUMNS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def assert_same_metrics(stacked: Path, alone: Path, atol: float = 2e-5, rtol: float = 1e-4) -> None:
    """Equal epochs, and every metric equal up to float rounding (the stack's batched products
    sum in another order; a wrong seed, rate, mask or schedule shows as differences of 1e-3 and more)."""
    a, b = metrics(stacked), metrics(alone)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for ra, rb in zip(a, b):
        for c in METRIC_COLUMNS:
            assert math.isclose(float(ra[c]), float(rb[c]), rel_tol=rtol, abs_tol=atol), (stacked.name, ra, rb, c)


def run_both(make_cfg, tmp_path, named: dict[str, list[str]], *common: str):
    cfgs = [make_cfg(*common, *o) for o in named.values()]
    dirs = [tmp_path / f"stacked_{i}" for i in range(len(cfgs))]
    summaries = train_group(cfgs, dirs, progress=False)
    alone = [train(make_cfg(*common, *o), tmp_path / f"alone_{i}") for i, o in enumerate(named.values())]
    return cfgs, dirs, summaries, alone


ADAM_FAMILY = {name: o for name, o in VARIANTS.items() if name != "sgd momentum"}
# nothing changes the gradients between the backward pass and the update: the C++ step takes every job's update
IN_STEP = {name: o for name, o in ADAM_FAMILY.items() if not any(k in " ".join(o) for k in ("l1", "l2", "clip"))}
IN_STEP["1cycle"] = ["schedule=1cycle"]
IN_STEP["beta1 0.3"] = ["optimizer.betas=[0.3,0.999]"]


@pytest.mark.parametrize("variants", [IN_STEP, ADAM_FAMILY, VARIANTS],
                         ids=["adam family: each job's update in the C++ step", "adam family: stacked kernel calls",
                              "with sgd: one optimizer step per job"])
def test_each_stacked_job_matches_the_job_trained_alone(make_cfg, tmp_path, variants, monkeypatch):
    import dnnlab.stack

    steps, step = [], dnnlab.stack.Stepper.step
    monkeypatch.setattr(dnnlab.stack.Stepper, "step", lambda self, stack: steps.append(1) or step(self, stack))
    cfgs, dirs, summaries, alone = run_both(make_cfg, tmp_path, variants, "trainer.epochs=3")
    # with the update in the C++ step, torch's first step (creating the optimizers' state) is the only separate one
    # (torch 2.4's AdamW is no Adam subclass, so its job takes optimizer.step)
    assert (len(steps) == 1) == (variants is IN_STEP and issubclass(torch.optim.AdamW, torch.optim.Adam))
    for (name, _), d, s, a in zip(variants.items(), dirs, summaries, alone):
        assert s["status"] == a["status"] == "completed", name
        assert_same_metrics(d, d.parent / d.name.replace("stacked", "alone"))
        assert s["best_epoch"] == a["best_epoch"] and s["epochs"] == a["epochs"], name
        assert math.isclose(s["test_loss"], a["test_loss"], rel_tol=1e-3, abs_tol=1e-5), name
        assert s["test_acc"] == pytest.approx(a["test_acc"], abs=1.0 / a["n_test"]), name
    # and the jobs really differ from one another (a stack that trained one network eight times would not)
    assert len({metrics(d)[-1]["train_loss"] for d in dirs}) == len(dirs)


def test_other_activations_stack_too(make_cfg, tmp_path):
    named = {"relu": ["activation=relu"], "relu, seed 3": ["activation=relu", "trainer.seed=3"]}
    _, dirs, _, _ = run_both(make_cfg, tmp_path / "relu", named)
    named = {"selu": ["activation=selu", "init=lecun_normal"], "selu lr": ["activation=selu", "init=lecun_normal",
                                                                          "optimizer.lr=0.002"]}
    _, dirs2, _, _ = run_both(make_cfg, tmp_path / "selu", named)
    for d in dirs + dirs2:
        assert_same_metrics(d, d.parent / d.name.replace("stacked", "alone"))


def test_a_job_that_stops_early_leaves_the_stack_and_the_others_go_on(make_cfg, tmp_path):
    named = {"stops": ["trainer.early_stopping.monitor=val_acc", "trainer.early_stopping.patience=1"],
             "runs on": ["trainer.early_stopping.monitor=null", "trainer.seed=5"],
             "fewer epochs": ["trainer.epochs=2", "trainer.seed=6"]}
    _, dirs, summaries, alone = run_both(make_cfg, tmp_path, named, "trainer.epochs=6")
    stops, runs_on, fewer = summaries
    assert stops["stopped_early"] and stops["epochs"] < 6
    assert runs_on["epochs"] == 6 and not runs_on["stopped_early"] and fewer["epochs"] == 2
    for d, s, a in zip(dirs, summaries, alone):
        assert_same_metrics(d, d.parent / d.name.replace("stacked", "alone"))
        assert s["epochs"] == a["epochs"] and s["best_epoch"] == a["best_epoch"]
        assert s["test_loss"] == pytest.approx(a["test_loss"], rel=1e-3, abs=1e-5)


def test_a_diverging_job_is_recorded_and_the_others_go_on(make_cfg, tmp_path):
    named = {"diverges": ["init=normal", "init.std=30", "optimizer.lr=1e9"], "fine": ["optimizer.lr=0.01"]}
    _, dirs, summaries, alone = run_both(make_cfg, tmp_path, named, "optimizer=sgd")
    assert summaries[0]["status"] == alone[0]["status"] == "diverged"
    assert summaries[0]["reason"].split(":")[0] == alone[0]["reason"].split(":")[0]  # the same epoch and step
    assert math.isnan(summaries[0]["test_loss"])
    assert summaries[1]["status"] == alone[1]["status"] == "completed"
    assert_same_metrics(dirs[1], tmp_path / "alone_1")


def test_every_job_gets_the_files_of_a_normal_run(make_cfg, tmp_path, monkeypatch):
    drawn, draw = {}, LearningCurves.draw  # what each learning_curves.png shows (a stack reuses one figure)

    def spy(self, rows, title="", lr=None, best_epoch=None):
        drawn[title.split(":")[0]] = (lr, best_epoch, len(rows))
        return draw(self, rows, title=title, lr=lr, best_epoch=best_epoch)

    monkeypatch.setattr(LearningCurves, "draw", spy)
    cfgs = [make_cfg("trainer.checkpoint_every=1", f"trainer.seed={s}", "schedule=1cycle") for s in (1, 2)]
    dirs = [tmp_path / "a", tmp_path / "b"]
    summaries = train_group(cfgs, dirs, progress=False)
    train(make_cfg("trainer.checkpoint_every=1", "trainer.seed=1", "schedule=1cycle"), tmp_path / "alone")
    rates = read_scalars(tmp_path / "alone" / "tensorboard" / "steps", "lr")  # per step, as dnnlab train logs them
    assert len(rates) == 32 and len({v for _, v in rates}) > 2
    assert read_scalars(tmp_path / "a" / "tensorboard" / "steps", "lr") == rates
    key = "/".join(tmp_path.parts[-2:])
    assert drawn[f"{key}/a"] == drawn[f"{key}/alone"] and drawn[f"{key}/a"][1] == summaries[0]["best_epoch"]
    normal = json.loads((tmp_path / "alone" / "summary.json").read_text())
    for cfg, d, s in zip(cfgs, dirs, summaries):
        assert {p.name for p in (d / "checkpoints").iterdir()} == {"last.pt", "best.pt", "final.pt", "epoch_1.pt", "epoch_2.pt"}
        assert (d / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert list((d / "tensorboard").glob("events.out.tfevents.*"))
        assert json.loads((d / "environment.json").read_text())["device"] == "cpu"
        saved = json.loads((d / "summary.json").read_text())
        assert set(normal) <= set(saved) and saved["stacked"] == {"jobs": 2, "position": dirs.index(d)}
        assert saved["n_params"] == normal["n_params"]
        # the job's own network, in the normal format: loads into build_mlp and gives the summary's test metrics
        state = checkpoint.load(d / "checkpoints" / "best.pt")
        model = build_mlp(cfg, 10)
        model.load_state_dict(state["model"])
        from dnnlab.data import load

        data = load(cfg.data, torch.device("cpu"))
        from contextlib import nullcontext

        loss, acc = evaluate(model, data.x_test, data.y_test, nullcontext())
        assert loss == pytest.approx(s["test_loss"], rel=1e-5) and acc == s["test_acc"]
        optimizer = build_optimizer(cfg.optimizer, list(model.parameters()), torch.device("cpu"))
        optimizer.load_state_dict(state["optimizer"])  # its own optimizer state, shaped like its parameters
        for p in model.parameters():
            assert optimizer.state[p]["exp_avg"].shape == p.shape
        assert state["epoch"] == s["best_epoch"] and state["step"] == s["steps"] // s["epochs"] * s["best_epoch"]
        last = checkpoint.load(d / "checkpoints" / "last.pt")
        assert last["epoch"] == 2 and torch.equal(
            last["model"]["hidden1.0.weight"], checkpoint.load(d / "checkpoints" / "epoch_2.pt")["model"]["hidden1.0.weight"])


def test_plan_stacks_compatible_jobs_and_runs_the_others_alone(make_cfg):
    cfgs = [make_cfg("optimizer.lr=0.001"), make_cfg("optimizer.lr=0.01"),      # 0, 1: one stack
            make_cfg("model.n_neurons=50"), make_cfg("model.n_neurons=50", "trainer.seed=3"),  # 2, 3: another
            make_cfg("activation=relu"),                                         # 4: alone (no partner)
            make_cfg("norm=batchnorm"), make_cfg("norm=batchnorm", "trainer.seed=2"),  # 5, 6: unstackable
            make_cfg("activation=prelu"), make_cfg("regularizer=alpha_dropout"),  # 7, 8: unstackable
            make_cfg("optimizer.lr=-1"),                                         # 9: invalid, alone
            make_cfg("trainer.batch_size=16")]                                   # 10: another batch size
    assert plan(cfgs) == [[0, 1], [2, 3], [4], [5], [6], [7], [8], [9], [10]]
    assert plan(cfgs[:2], max_group=1) == [[0], [1]]
    assert why_not(cfgs[5]).startswith("normalisation")
    assert why_not(cfgs[7]).startswith("PReLU") and why_not(cfgs[8]) == "alpha dropout"
    with pytest.raises(ValueError):
        train_group([cfgs[0], cfgs[2]], ["a", "b"])


# ------------------------------------------------------------------------------------------------ the launcher

def sweep(data_root, out: Path, *args, timeout=HANG_S) -> subprocess.CompletedProcess:
    env = {**os.environ, "DNNLAB_DATA": str(data_root)}
    out.parent.mkdir(parents=True, exist_ok=True)
    return forked.dnnlab("train", "-m", *args, "data.val_size=100", "trainer.epochs=2", "trainer.progress=false",
                         f"hydra.sweep.dir={out}", cwd=out.parent, env=env, timeout=timeout)


NORMAL_FILES = {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "train.log", "metrics.csv",
                "summary.json", "environment.json", "learning_curves.png", "checkpoints/last.pt", "checkpoints/best.pt",
                "checkpoints/final.pt"}


def test_stacked_launcher_sweep_equals_the_basic_launcher_sweep(data_root, tmp_path):
    args = ["optimizer.lr=0.001,0.003", "model.n_neurons=50,100", "norm=none,batchnorm"]
    stacked = sweep(data_root, tmp_path / "stacked", "hydra/launcher=stacked", "hydra.launcher.cpu=stack", *args)
    assert stacked.returncode == 0, stacked.stderr
    assert "4 in 2 stack(s), 4 one at a time" in stacked.stdout + stacked.stderr
    basic = sweep(data_root, tmp_path / "basic", *args)
    assert basic.returncode == 0, basic.stderr
    for job in range(8):
        run = tmp_path / "stacked" / str(job)
        for name in NORMAL_FILES:
            assert (run / name).is_file(), (job, name)
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
        overrides = (run / ".hydra" / "overrides.yaml").read_text()
        assert overrides == (tmp_path / "basic" / str(job) / ".hydra" / "overrides.yaml").read_text()
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed"
        assert ("stacked" in summary) == ("norm=none" in overrides), job  # batch norm: one at a time
        assert "data: fashion_mnist" in (run / "train.log").read_text()
        assert_same_metrics(run, tmp_path / "basic" / str(job))
    # each job's log holds its own lines and the stack's, not another job's
    assert (tmp_path / "stacked" / "0" / "train.log").read_text().count("data: fashion_mnist") == 1


def test_stacked_launcher_records_a_bad_job_and_goes_on(data_root, tmp_path):
    done = sweep(data_root, tmp_path / "out", "hydra/launcher=stacked", "hydra.launcher.cpu=stack",
                 "optimizer.lr=-1,0.001,0.003")
    assert done.returncode == 0, done.stderr
    jobs = {int(p.parent.name): json.loads(p.read_text()) for p in (tmp_path / "out").glob("*/summary.json")}
    assert jobs[0]["status"] == "failed" and "optimizer.lr=-1" in jobs[0]["reason"]
    assert jobs[1]["status"] == jobs[2]["status"] == "completed" and jobs[1]["stacked"]["jobs"] == 2
    assert "Traceback" not in done.stderr


def test_on_a_cpu_with_two_cores_the_sweep_goes_to_the_joblib_launcher(data_root, tmp_path):
    """cpu=processes (the default) on a CPU with 2+ cores: the jobs run as `hydra/launcher=joblib` runs them, each
    alone (the same metrics as the basic launcher), and their .hydra/hydra.yaml names the launcher that ran them;
    on one core the sweep is stacked."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores")
    args = ["optimizer.lr=0.001,0.003"]
    done = sweep(data_root, tmp_path / "stacked", "hydra/launcher=stacked", *args)
    assert done.returncode == 0, done.stderr
    assert "handing the 2 jobs to hydra/launcher=joblib (n_jobs=" in done.stdout + done.stderr
    basic = sweep(data_root, tmp_path / "basic", *args)
    for job in range(2):
        run = tmp_path / "stacked" / str(job)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed" and "stacked" not in summary
        launcher = OmegaConf.load(run / ".hydra" / "hydra.yaml").hydra.launcher
        assert launcher._target_.endswith("JoblibLauncher") and launcher.n_jobs == 2  # 2 jobs, 2 cores or more
        assert_same_metrics(run, tmp_path / "basic" / str(job))
    assert basic.returncode == 0, basic.stderr
    own = tmp_path / "mine" / "experiment"  # a preset of the user's own that picks the launcher and sets its keys
    own.mkdir(parents=True)
    (own / "own.yaml").write_text("# @package _global_\ndefaults:\n  - override /hydra/launcher: stacked\n"
                                  "hydra:\n  launcher:\n    min_group: 2\n")
    done = sweep(data_root, tmp_path / "own", "--config-dir", str(tmp_path / "mine"), "experiment=own", *args)
    assert done.returncode == 0, done.stderr
    assert "do not compose with the joblib launcher" in done.stdout + done.stderr
    assert "2 in 1 stack(s)" in done.stdout + done.stderr
    one_core = {**os.environ, "DNNLAB_DATA": str(data_root)}
    done = subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "dnnlab", "train", "-m",
                           "hydra/launcher=stacked", *args, "data.val_size=100", "trainer.epochs=1",
                           "trainer.progress=false", f"hydra.sweep.dir={tmp_path / 'one'}"], cwd=tmp_path,
                          env=one_core, capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, done.stderr
    assert "2 in 1 stack(s)" in done.stdout + done.stderr


def test_stacked_launcher_takes_the_configs_the_sweeper_composed():
    from hydra_plugins.dnnlab_stacked_launcher.stacked_launcher import _KeepValidated

    class Loader:
        calls: list = []
        search_path = "kept as is"

        def load_sweep_config(self, master_config, sweep_overrides):
            self.calls.append(list(sweep_overrides))
            return OmegaConf.create({"lr": sweep_overrides[0].split("=")[1], "n": len(self.calls)})

    loader, master = _KeepValidated(Loader()), OmegaConf.create({})
    checked = loader.load_sweep_config(master, ["lr=1"])  # the sweeper's check
    checked.lr = "changed by the sweeper"
    assert loader.take(master, ["lr=1"]) == {"lr": "1", "n": 1}  # a copy of what the check composed
    assert loader.take(master, ["lr=1"]) == {"lr": "1", "n": 2}  # taken once: composed again
    assert loader.take(master, ["lr=2"]) == {"lr": "2", "n": 3}  # never checked
    loader.load_sweep_config(master, ["lr=3"])
    assert loader.take(OmegaConf.create({}), ["lr=3"])["n"] == 5  # another master config: composed for it
    assert Loader.calls == [["lr=1"], ["lr=1"], ["lr=2"], ["lr=3"], ["lr=3"]]
    assert loader.search_path == "kept as is"


def test_stacked_launcher_config_composes(tmp_path):
    done = forked.dnnlab("train", "hydra/launcher=stacked", "--cfg", "hydra", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "StackedLauncher" in done.stdout and "max_group: null" in done.stdout


# ------------------------------------------------------------------------------------------------------ CUDA

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stack_on_cuda_matches_the_stack_on_the_cpu(make_cfg, tmp_path):
    named = {"a": ["trainer.seed=1"], "b": ["optimizer.lr=0.003", "regularizer=l2", "regularizer.l2=0.001"]}
    cpu = train_group([make_cfg("trainer.device=cpu", *o) for o in named.values()],
                      [tmp_path / "cpu0", tmp_path / "cpu1"], progress=False)
    gpu = train_group([make_cfg("trainer.device=cuda", *o) for o in named.values()],
                      [tmp_path / "gpu0", tmp_path / "gpu1"], progress=False)
    for c, g in zip(cpu, gpu):
        assert g["device"].startswith("cuda") and g["status"] == "completed"
        assert g["test_loss"] == pytest.approx(c["test_loss"], rel=1e-2, abs=1e-3)
    assert_same_metrics(tmp_path / "gpu0", tmp_path / "cpu0", atol=1e-3, rtol=1e-2)


# ------------------------------------------------------------------------------------------- the C++ stack step

needs_native = pytest.mark.skipif(native.available() != "", reason=f"native step unavailable: {native.available()}")


@needs_native
def test_the_native_stack_and_the_autograd_stack_agree(make_cfg, tmp_path):
    named = {"seed 1": ["trainer.seed=1"], "dropout, lr": ["regularizer=dropout", "regularizer.dropout.input=true",
                                                            "optimizer.lr=0.003"],
             "l2, clip": ["regularizer=l2", "trainer.clip_norm=0.5", "trainer.seed=4"]}
    out = {}
    for setting in ("auto", "false"):
        cfgs = [make_cfg(f"trainer.native={setting}", *o) for o in named.values()]
        dirs = [tmp_path / f"{setting}_{i}" for i in range(len(cfgs))]
        out[setting] = train_group(cfgs, dirs, progress=False)
    assert {s["training_step"] for s in out["auto"]} == {"stacked native"}
    assert {s["training_step"] for s in out["false"]} == {"stacked autograd"}
    for i, (fast, slow) in enumerate(zip(out["auto"], out["false"])):
        assert_same_metrics(tmp_path / f"auto_{i}", tmp_path / f"false_{i}")
        assert fast["test_loss"] == pytest.approx(slow["test_loss"], rel=1e-3, abs=1e-5)


class _Alternating:
    """Stands in for ThreadTuner: two threads on even steps, one on odd steps."""

    def __init__(self, many, steps_per_epoch):
        self.current = many

    def before(self, i):
        self.current = 2 if i % 2 == 0 else 1
        torch.set_num_threads(self.current)

    def after(self, i):
        pass

    def settle(self):
        torch.set_num_threads(2)


@needs_native
def test_native_stack_numbers_do_not_depend_on_the_thread_count(make_cfg, tmp_path, monkeypatch):
    """What lets threads=auto switch between all cores and one mid-epoch: the same metrics, bit for bit."""
    import dnnlab.stacked as stacked

    def group(name, *overrides):
        cfgs = [make_cfg("trainer.batch_size=16", "regularizer=dropout", f"trainer.seed={s}", *overrides)
                for s in (1, 2, 3)]
        dirs = [tmp_path / f"{name}_{s}" for s in range(3)]
        summaries = train_group(cfgs, dirs, progress=False)
        assert {s["training_step"] for s in summaries} == {"stacked native"}
        return [[{k: v for k, v in r.items() if k != "seconds"} for r in metrics(d)] for d in dirs]

    group("warm-up", "trainer.threads=2")  # a worker thread's very first step may round differently
    fixed = group("two", "trainer.threads=2")
    assert group("two again", "trainer.threads=2") == fixed
    monkeypatch.setattr(stacked, "pick_threads", lambda setting, cfg, stacked: 2)
    monkeypatch.setattr(stacked, "ThreadTuner", _Alternating)
    assert group("switching", "trainer.threads=auto") == fixed
    train_columns = lambda runs: [[(r["train_loss"], r["train_acc"]) for r in rows] for rows in runs]  # noqa: E731
    assert train_columns(group("one", "trainer.threads=1")) == train_columns(fixed)  # (evaluation: by threads)


def test_trainer_native_true_refuses_a_stack_it_cannot_take_before_any_file(make_cfg, tmp_path):
    from dnnlab.errors import DnnlabError

    cfgs = [make_cfg("trainer.native=true", "trainer.precision=bf16", f"trainer.seed={s}") for s in (1, 2)]
    with pytest.raises(DnnlabError, match="trainer.precision=bf16"):
        train_group(cfgs, [tmp_path / "a", tmp_path / "b"], progress=False)
    assert not any(tmp_path.iterdir())


def test_job_major_keeps_the_values_and_puts_each_jobs_tensors_side_by_side():
    stacked = [torch.randn(3, 4, 5), torch.randn(3, 5), torch.randn(3, 5, 2), torch.randn(3, 2)]
    flat, views = job_major(stacked)
    per_job = 20 + 5 + 10 + 2
    assert flat.numel() == 3 * per_job and all(torch.equal(v, t) for v, t in zip(views, stacked))
    for k in range(3):  # job k's tensors tile its own range, in order: one run of jobs is one range
        assert span([v[k] for v in views]).data_ptr() == flat[k * per_job:].data_ptr()
        assert torch.equal(span([v[k] for v in views]), flat[k * per_job:(k + 1) * per_job])
    assert job_major([torch.zeros(0, 4, 5), torch.zeros(0, 5)])[0].numel() == 0  # every job finished
