"""Resume after a crash: killed (SIGKILL) at several points, or stopped by SIGINT/SIGTERM, a run resumed with the
same command ends with exactly the metrics of an uninterrupted run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dnnlab.errors import DnnlabError
from dnnlab.train import train
from tests.conftest import HANG_S

# Runs the CLI in a subprocess with one patch that kills (or signals) the process at a chosen point.
WRAPPER = r"""
import os, signal, sys
import dnnlab.checkpoint as ck, dnnlab.optim as optim, dnnlab.record as record
kind, point = os.environ.get("KILL_AT", "none:0").split(":")
name, n = point.split("@") if "@" in point else (None, point)  # checkpoint_write:FILE@N: the N-th write of FILE
n, count = int(n), [0]

def hit():
    count[0] += 1
    return count[0] == n

if kind == "checkpoint_write":  # half of the file is on disk, not yet renamed into place
    real = ck.atomic_write
    def atomic_write(path, data):
        if path.name == name and hit():
            with open(path.with_name(f".{path.name}.tmp{os.getpid()}"), "wb") as f:
                f.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, data)
    ck.atomic_write = atomic_write
elif kind == "checkpoint_rename":  # the whole file is written and synced under its temporary name, not renamed
    real_replace = os.replace
    def replace(src, dst, *args, **kwargs):
        if os.path.basename(dst) == name and hit():
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *args, **kwargs)
    os.replace = replace
elif kind == "metrics_row":  # the n-th metrics row is on disk, its checkpoints are not
    real_log = record.Recorder.log_epoch
    def log_epoch(self, row):
        real_log(self, row)
        if hit():
            os.kill(os.getpid(), signal.SIGKILL)
    record.Recorder.log_epoch = log_epoch
elif kind in ("step", "sigint", "sigterm"):  # after the n-th optimizer step, in the middle of an epoch
    sig = {"step": signal.SIGKILL, "sigint": signal.SIGINT, "sigterm": signal.SIGTERM}[kind]
    real_after = optim.GradientRules.after_step
    def after_step(self):
        real_after(self)
        if hit():
            os.kill(os.getpid(), sig)
    optim.GradientRules.after_step = after_step
from dnnlab.cli import main
main()
"""
ARGS = ["data.val_size=100", "trainer.epochs=5", "trainer.progress=false", "trainer.early_stopping.patience=50",
        "regularizer=dropout", "activation=rrelu", "schedule=performance", "schedule.patience=1",
        "trainer.checkpoint_every=2"]


def run(data_root, run_dir: Path, kill: str | None = None, extra=()) -> subprocess.CompletedProcess:
    env = {**os.environ, "DNNLAB_DATA": str(data_root), "KILL_AT": kill or "none:0"}
    return subprocess.run([sys.executable, "-c", WRAPPER, "train", *ARGS, *extra, f"hydra.run.dir={run_dir}"],
                          cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=HANG_S)


def metrics(run_dir: Path) -> list[str]:
    """metrics.csv without the wall-time column."""
    return [line.rsplit(",", 1)[0] for line in (run_dir / "metrics.csv").read_text().splitlines()]


@pytest.fixture(scope="module")
def baseline(data_root, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    done = run(data_root, run_dir)
    assert done.returncode == 0, done.stderr
    return run_dir


def assert_same_as_baseline(run_dir: Path, baseline: Path, resumed: bool = True) -> None:
    assert metrics(run_dir) == metrics(baseline)
    mine, theirs = (json.loads((d / "summary.json").read_text()) for d in (run_dir, baseline))
    for key in ("status", "epochs", "best_epoch", "val_acc", "val_loss", "test_acc", "test_loss", "steps"):
        assert mine[key] == theirs[key], key
    assert mine["resumed"] is resumed
    from dnnlab import checkpoint

    best, theirs_best = (checkpoint.load(d / "checkpoints" / "best.pt") for d in (run_dir, baseline))
    assert best["epoch"] == theirs_best["epoch"]  # best.pt is the best epoch's, not an older one left behind
    assert all(torch.equal(best["model"][k], v) for k, v in theirs_best["model"].items())


@pytest.mark.parametrize("kill,resumed", [
    ("checkpoint_write:last.pt@1", False),  # the very first last.pt: nothing to resume from, the run starts over
    ("checkpoint_write:best.pt@2", True),   # a later best.pt: resumes from the epoch before and writes it again
    ("checkpoint_write:last.pt@3", True),   # overwriting last.pt: the previous one is still whole
    ("checkpoint_write:epoch_2.pt@1", True),  # a periodic checkpoint
    ("checkpoint_rename:last.pt@3", True),  # last.pt whole under its temporary name, killed before the rename
    ("checkpoint_rename:best.pt@2", True),  # the same for best.pt
    ("metrics_row:2", True),                # the row is written, its checkpoints are not
    ("step:23", True)])                     # in the middle of epoch 2
def test_killed_run_resumes_to_the_same_metrics(data_root, tmp_path, baseline, kill, resumed):
    run_dir = tmp_path / "run"
    killed = run(data_root, run_dir, kill)
    assert killed.returncode == -9, killed.stderr  # SIGKILL: nothing could be cleaned up
    done = run(data_root, run_dir)  # the same command again resumes
    assert done.returncode == 0, done.stderr
    assert_same_as_baseline(run_dir, baseline, resumed)
    # the killed writer's temporary file is gone, and so is nothing else
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == sorted(
        p.name for p in (baseline / "checkpoints").iterdir())


@pytest.mark.parametrize("sig", ["sigint", "sigterm"])
def test_a_signal_checkpoints_the_position_and_exits_non_zero(data_root, tmp_path, baseline, sig):
    from dnnlab import checkpoint

    run_dir = tmp_path / "run"
    stopped = run(data_root, run_dir, f"{sig}:30")
    assert stopped.returncode == 130, stopped.stderr
    assert "interrupted" in stopped.stderr and "Traceback" not in stopped.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    last = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert last["epoch"] == 1 and last["position"]["i"] == 30 - 16  # 500 images / 32: 16 steps per epoch
    done = run(data_root, run_dir, extra=["trainer.resume=true"])
    assert done.returncode == 0, done.stderr
    assert_same_as_baseline(run_dir, baseline)


def test_a_reused_directory_of_another_run_is_refused_and_left_alone(make_cfg, tmp_path):
    train(make_cfg(), tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(DnnlabError, match="different config"):
        train(make_cfg("optimizer.lr=0.01"), tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_finished_run_resumed_changes_no_metric(make_cfg, tmp_path):
    first = train(make_cfg(), tmp_path)
    rows = (tmp_path / "metrics.csv").read_text()
    again = train(make_cfg(), tmp_path)
    assert (tmp_path / "metrics.csv").read_text() == rows
    assert again["test_acc"] == first["test_acc"] and again["epochs"] == first["epochs"]


def test_a_run_saved_before_clipping_moved_resumes_evaluates_and_reports(make_cfg, tmp_path):
    """Checkpoints and run folders written when clipping was optimizer.clip_value/clip_norm: on load the keys move
    to the trainer section, so the run resumes (the same config as the command's), evaluates and reports."""
    import yaml

    from dnnlab import checkpoint, stored
    from dnnlab.trained import load_trained

    def old_style(data: dict) -> dict:
        for key in ("clip_value", "clip_norm"):
            data["optimizer"][key] = data["trainer"].pop(key)
        return data

    first = train(make_cfg("trainer.clip_norm=1.0"), tmp_path)
    for path in (tmp_path / "checkpoints").glob("*.pt"):
        state = checkpoint.load(path)
        old = old_style(yaml.safe_load(state["config"]))
        state["config"] = yaml.safe_dump(old, sort_keys=False)
        checkpoint.save(path, state)
    again = train(make_cfg("trainer.clip_norm=1.0"), tmp_path)  # not "a different config"
    assert again["test_acc"] == first["test_acc"] and again["epochs"] == first["epochs"]
    saved = stored.checkpoint_config(checkpoint.load(tmp_path / "checkpoints" / "last.pt"), "last.pt")
    assert saved.trainer.clip_norm == 1.0 and saved.trainer.clip_value is None and "clip_norm" not in saved.optimizer
    assert load_trained(tmp_path, with_data=False).cfg.trainer.clip_norm == 1.0  # the checks of `dnnlab eval`
    hydra = tmp_path / ".hydra"
    hydra.mkdir()
    (hydra / "config.yaml").write_text(yaml.safe_dump(old))
    (hydra / "overrides.yaml").write_text(yaml.safe_dump(["optimizer.clip_norm=1.0", "+optimizer.clip_value=0.5"]))
    assert stored.read_mapping(hydra / "config.yaml")["trainer"]["clip_norm"] == 1.0
    assert stored.overrides(tmp_path) == ["trainer.clip_norm=1.0", "+trainer.clip_value=0.5"]


def files(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def one_epoch_run(data_root, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one_epoch") / "run"
    assert run(data_root, run_dir, extra=["trainer.epochs=1"]).returncode == 0
    return run_dir


@pytest.mark.parametrize("junk", [b"", b"root:x:0:0:root:/root:/bin/bash\n", b"PK\x03\x04 not a zip"])
def test_resuming_from_a_file_that_is_not_a_checkpoint_is_one_line_and_keeps_the_run(data_root, one_epoch_run,
                                                                                       tmp_path, junk):
    run_dir = tmp_path / "run"
    shutil.copytree(one_epoch_run, run_dir)
    (run_dir / "checkpoints" / "last.pt").write_bytes(junk)  # a damaged or replaced last.pt
    before = files(run_dir)
    done = run(data_root, run_dir, extra=["trainer.epochs=1"])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "last.pt" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert files(run_dir) == before  # .hydra/hydra.yaml, the log and the rest as they were


def test_periodic_checkpoints_keep_the_newest(make_cfg, tmp_path):
    train(make_cfg("trainer.checkpoint_every=1", "trainer.keep_checkpoints=2", "trainer.epochs=5",
                   "trainer.early_stopping.monitor=null"), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("epoch_*.pt")) == ["epoch_4.pt", "epoch_5.pt"]
    keep_all = tmp_path / "all"
    train(make_cfg("trainer.checkpoint_every=2", "trainer.keep_checkpoints=null", "trainer.epochs=5"), keep_all)
    assert sorted(p.name for p in (keep_all / "checkpoints").glob("epoch_*.pt")) == ["epoch_2.pt", "epoch_4.pt"]
