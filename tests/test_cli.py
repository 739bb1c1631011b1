"""The installed command, run as a user runs it: `python -m dnnlab ...` and the `dnnlab` console script.

Every test runs the command in a process of its own in tmp_path, with $DNNLAB_DATA at the tiny datasets of
conftest.py: forked from a server that imported dnnlab (tests/forked.py), or started as `python -m dnnlab` and as
the console script where the test is about those.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dnnlab import CONF_DIR
from dnnlab.record import COLUMNS
from tests import forked
from tests.conftest import HANG_S

SCRIPT = Path(sys.executable).parent / "dnnlab"  # the console script pip installed beside this interpreter
LAUNCHERS = {"module": [sys.executable, "-m", "dnnlab"], "script": [str(SCRIPT)]}
BOTH = pytest.mark.parametrize("launcher", list(LAUNCHERS))
# Every config group on disk (hydra/ holds the help template, not a group users choose from).
GROUP_OPTIONS = {d.name: sorted(p.stem for p in d.glob("*.yaml"))
                 for d in sorted(CONF_DIR.iterdir()) if d.is_dir() and d.name != "hydra"}
# The groups only `dnnlab pretrain` takes, beside conf/ (dnnlab/conf_dirs.py)
PRETRAIN_GROUPS = {d.name: sorted(p.stem for p in d.glob("*.yaml"))
                   for d in sorted((CONF_DIR.parent / "conf_pretrain").iterdir()) if d.is_dir()}
NO_CUDA_DEVICE = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.fixture
def dnnlab(data_root, tmp_path):
    """Run `dnnlab ARGS` in tmp_path on the tiny data; returns the CompletedProcess (text)."""
    assert SCRIPT.is_file(), f"no console script at {SCRIPT}: install dnnlab into this venv (scripts/install.sh)"
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "DNNLAB_ALLOWED_TARGETS")}
    env["DNNLAB_DATA"] = str(data_root)

    def run(*args: str, launcher: str = "forked") -> subprocess.CompletedProcess:
        if launcher == "forked":
            return forked.dnnlab(*args, cwd=tmp_path, env=env)
        return subprocess.run(LAUNCHERS[launcher] + list(args), cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=HANG_S)

    return run


def test_the_chapter_groups_are_on_disk():
    assert {"init", "activation", "norm", "optimizer", "schedule", "regularizer", "data", "model", "trainer",
            "debug"} <= set(GROUP_OPTIONS)


@BOTH
def test_no_arguments_print_the_command_list(dnnlab, launcher):
    result = dnnlab(launcher=launcher)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: dnnlab COMMAND")
    commands = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert commands[0] == "train" and "data" in commands


def test_unknown_command_fails_with_the_command_list(dnnlab):
    result = dnnlab("frobnicate")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown command 'frobnicate': one of train, pretrain" in lines[0]
    assert "did you mean train?" in dnnlab("trian").stderr


def test_train_help_lists_every_group_and_option(dnnlab):
    result = dnnlab("train", "--help", launcher="module")  # sys.argv[0] is .../dnnlab/__main__.py
    assert result.returncode == 0, result.stderr
    out = result.stdout
    lines = out.splitlines()
    for group, options in GROUP_OPTIONS.items():
        assert f"{group}: {', '.join(options)}" in lines, group
    assert "Usage: dnnlab train" in out
    assert "__main__" not in out and "cli.py" not in out  # Hydra names the app dnnlab, not the file
    # the default config follows, one top-level key per group
    assert {"data:", "model:", "init:", "activation:", "norm:", "optimizer:", "schedule:", "regularizer: {}",
            "trainer:"} <= set(lines)
    assert not any(line.startswith("pretrain") for line in lines)  # a group of dnnlab pretrain only
    assert 'eval "$(dnnlab completion bash)"' in out  # the working tab-completion line, not Hydra's


def test_each_apps_help_lists_the_groups_it_takes(dnnlab):
    lines = dnnlab("pretrain", "--help").stdout.splitlines()
    assert PRETRAIN_GROUPS == {"pretrain": ["autoencoder", "same_digit"]}
    for group, options in {**GROUP_OPTIONS, **PRETRAIN_GROUPS}.items():
        assert f"{group}: {', '.join(options)}" in lines, group
    assert "Usage: dnnlab pretrain [pretrain=autoencoder|same_digit] [key=value ...]" in lines


def test_a_misspelt_key_is_refused_not_added(dnnlab, tmp_path):
    """Hydra would add +trainer.epoch=3 (and advised that + for trainer.epoch=3): a run with the default epochs."""
    for override in ("trainer.epoch=3", "+trainer.epoch=3"):
        result = dnnlab("train", "debug=smoke", override, f"hydra.run.dir={tmp_path / 'run'}", launcher="script")
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == ["error: unknown key 'trainer.epoch': did you mean "
                                                      "trainer.epochs? (--help lists every group and key)"]
        assert not (tmp_path / "run").exists() and "+trainer.epoch" not in result.stderr
    result = dnnlab("train", "--cfg", "job", "+regularizer.max_norm=1.0", "+optimizer.amsgrad=true")
    assert result.returncode == 0, result.stderr  # a key of another option of its group; an argument of Adam
    cfg = OmegaConf.create(result.stdout)
    assert cfg.regularizer.max_norm == 1.0 and cfg.optimizer.amsgrad is True


def test_cfg_job_prints_the_composed_config_without_running(dnnlab, tmp_path):
    result = dnnlab("train", "--cfg", "job", "optimizer=nadam", "schedule=1cycle")
    assert result.returncode == 0, result.stderr
    cfg = OmegaConf.create(result.stdout)
    assert cfg.optimizer._target_ == "torch.optim.NAdam"
    assert cfg.schedule._target_ == "dnnlab.schedule.OneCycle"
    assert cfg.schedule.max_lr == cfg.optimizer.lr == 0.001  # ${optimizer.lr}, resolved here
    assert cfg.init.mode == "fan_in" and cfg.activation._target_ == "torch.nn.ELU"  # the other defaults stay
    assert not (tmp_path / "outputs").exists()


def test_smoke_run_writes_every_output(dnnlab, tmp_path, data_root):
    run_dir = tmp_path / "X"
    result = dnnlab("train", "debug=smoke", "data.val_size=100", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "completed" in result.stdout
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "metrics.csv", "summary.json", "environment.json",
                 "learning_curves.png", "train.log", "checkpoints/last.pt", "checkpoints/best.pt",
                 "checkpoints/epoch_1.pt"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "metrics.csv").read_text().splitlines()[0] == ",".join(COLUMNS)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 1 and summary["device"] == "cpu"
    assert summary["data_source"] == str(data_root / "FashionMNIST" / "raw")
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").trainer.limit_batches == 3
    assert "debug=smoke" in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
    assert not (tmp_path / "outputs").exists()  # hydra.run.dir replaced the default outputs/DATE/TIME


def test_multirun_sweeps_one_job_per_value(dnnlab, tmp_path):
    sweep = tmp_path / "S"
    result = dnnlab("train", "-m", "optimizer=sgd,adam", "debug=smoke", "data.val_size=100",
                    f"hydra.sweep.dir={sweep}", launcher="script")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job, optimizer in (("0", "sgd"), ("1", "adam")):
        assert json.loads((sweep / job / "summary.json").read_text())["status"] == "completed"
        assert f"optimizer={optimizer}" in OmegaConf.load(sweep / job / ".hydra" / "overrides.yaml")
    assert (sweep / "multirun.yaml").is_file()


@pytest.mark.parametrize("override,key", [
    ("optimizer.lr=-1", "optimizer.lr"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("data.classes=[0,12]", "data.classes"),
    (f"trainer.device={NO_CUDA_DEVICE}", "trainer.device"),
])
def test_bad_value_is_one_line_on_stderr_and_exit_2(dnnlab, tmp_path, override, key):
    run_dir = tmp_path / "run"
    result = dnnlab("train", "debug=smoke", "data.val_size=100", override, f"hydra.run.dir={run_dir}")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and f"{key}=" in lines[0]
    assert not (run_dir / "metrics.csv").exists() and not (run_dir / "summary.json").exists()


def test_a_refused_command_leaves_the_reused_run_directory_as_it_was(dnnlab, tmp_path):
    run_dir, sweep = tmp_path / "run", tmp_path / "sweep"
    assert dnnlab("train", "debug=smoke", "data.val_size=100", f"hydra.run.dir={run_dir}").returncode == 0
    assert dnnlab("train", "-m", "debug=smoke", "data.val_size=100", f"hydra.sweep.dir={sweep}").returncode == 0

    def files():
        """Every file but the logs (appended to) and the sweep's multirun.yaml (each sweep command writes its own)."""
        return {p: p.read_bytes() for d in (run_dir, sweep) for p in d.rglob("*")
                if p.is_file() and p.suffix != ".log" and p.name != "multirun.yaml"}

    before = files()
    for refused in ("optimizer.lr=-1", "optimizer.lr=0.01"):  # a bad value; another config than the run's
        result = dnnlab("train", "debug=smoke", "data.val_size=100", refused, f"hydra.run.dir={run_dir}")
        assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
        result = dnnlab("train", "-m", "debug=smoke", "data.val_size=100", refused, f"hydra.sweep.dir={sweep}")
        assert result.returncode == 0 and "error: " in result.stderr, result.stderr  # recorded, the sweep goes on
    assert files() == before  # .hydra/ (which Hydra rewrites before the task runs), summary, metrics, checkpoints


def test_unknown_option_lists_the_valid_ones(dnnlab):
    result = dnnlab("train", "optimizer=foo")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # Hydra's message, on one line
    assert "Could not find 'optimizer/foo'" in result.stderr
    assert "Available options in 'optimizer'" in result.stderr
    listed = result.stderr.split("Available options in 'optimizer':")[1].replace(",", " ").split()
    assert set(GROUP_OPTIONS["optimizer"]) <= set(listed)
    assert "Traceback" not in result.stderr


def test_data_prints_the_folder(dnnlab, data_root):
    result = dnnlab("data", "mnist")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"mnist: {data_root / 'MNIST' / 'raw'}"
    result = dnnlab("data", "fashion_mnist", "emnist")  # the first is found, the second is not a dataset
    assert result.stdout.strip() == f"fashion_mnist: {data_root / 'FashionMNIST' / 'raw'}"
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.name='emnist'" in lines[0] and "Traceback" not in result.stderr


def test_diagnose_and_lr_find_run_as_commands(dnnlab, tmp_path):
    result = dnnlab("diagnose", "diagnose.steps=8", "diagnose.every=4", "diagnose.probe_size=64",
                    "data.val_size=100", f"hydra.run.dir={tmp_path / 'diag'}")
    assert result.returncode == 0, result.stderr
    for name in ("activations.png", "gradients.png", "profile.png", "steps.png", "profile.csv", "diagnose.json"):
        assert (tmp_path / "diag" / name).is_file(), name
    result = dnnlab("lr-find", "lr_find.steps=12", "data.val_size=100", f"hydra.run.dir={tmp_path / 'lr'}")
    assert result.returncode == 0, result.stderr
    found = json.loads((tmp_path / "lr" / "lr_find.json").read_text())
    assert found["status"] == "completed" and found["suggested_lr"] > 0 and (tmp_path / "lr" / "lr_find.png").is_file()
    result = dnnlab("lr-find", "lr_find.steps=0", f"hydra.run.dir={tmp_path / 'bad'}")
    assert result.returncode == 2 and result.stderr.startswith("error: lr_find.steps=0"), result.stderr
