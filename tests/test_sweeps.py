"""Sweeps: grid sweeps that survive failed and diverged jobs, comparison presets, joblib and submitit launchers."""
from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest

from dnnlab import CONF_DIR
from tests import forked
from tests.conftest import HANG_S

QUICK = ["data.val_size=100", "trainer.epochs=2", "trainer.progress=false"]


def sweep(data_root, tmp_path, *args, timeout=HANG_S) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "sweep"
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DNNLAB_DATA": str(data_root)}
    done = forked.dnnlab("train", "-m", *args, *QUICK, f"hydra.sweep.dir={out}", cwd=tmp_path, env=env,
                         timeout=timeout)
    return done, out


def summaries(out: Path) -> dict[int, dict]:
    return {int(p.parent.name): json.loads(p.read_text()) for p in out.glob("*/summary.json")}


def metrics(run: Path) -> list[list[str]]:
    """metrics.csv without its wall-time column."""
    return [row[:-1] for row in csv.reader(open(run / "metrics.csv"))]


def test_glob_sweeps_every_option_of_a_group(data_root, tmp_path):
    done, out = sweep(data_root, tmp_path, "optimizer=glob(*)", "debug=smoke")
    assert done.returncode == 0, done.stderr
    names = {p.stem for p in (CONF_DIR / "optimizer").glob("*.yaml")}
    jobs = summaries(out)
    assert len(jobs) == len(names) >= 9 and all(s["status"] == "completed" for s in jobs.values())


def test_failed_and_diverged_jobs_are_recorded_and_the_sweep_goes_on(data_root, tmp_path):
    done, out = sweep(data_root, tmp_path, "optimizer=sgd", "optimizer.lr=-1,1e9,0.01")
    assert done.returncode == 0, done.stderr
    jobs = summaries(out)
    assert jobs[0]["status"] == "failed" and "optimizer.lr=-1" in jobs[0]["reason"]
    assert jobs[1]["status"] == "diverged" and "loss is" in jobs[1]["reason"]
    assert jobs[2]["status"] == "completed"
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("preset,jobs", [("compare_schedules", 7), ("compare_activations", 12),
                                         ("compare_regularizers", 5), ("ed3/sgd,ed3/adam,ed2/bn_before", 3)])
def test_comparison_presets_sweep_their_options(data_root, tmp_path, preset, jobs):
    done, out = sweep(data_root, tmp_path, f"experiment={preset}", "debug=smoke")
    assert done.returncode == 0, done.stderr
    found = summaries(out)
    assert len(found) == jobs and all(s["status"] == "completed" for s in found.values())


def test_joblib_launcher_runs_jobs_in_parallel_with_the_sequential_results(data_root, tmp_path):
    seq, seq_out = sweep(data_root, tmp_path / "seq", "optimizer=sgd,adam")
    par, par_out = sweep(data_root, tmp_path / "par", "optimizer=sgd,adam", "hydra/launcher=joblib",
                         "hydra.launcher.n_jobs=2")
    assert seq.returncode == 0 and par.returncode == 0, par.stderr
    assert "Joblib.Parallel(n_jobs=2" in par.stdout + par.stderr
    for job in ("0", "1"):
        assert metrics(seq_out / job) == metrics(par_out / job)
        assert json.loads((par_out / job / "summary.json").read_text())["threads"] == 1  # its share: 2 cores / 2


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to tell a share from all of them")
def test_joblib_jobs_take_their_share_of_the_cores_from_the_launcher(data_root, tmp_path):
    big = ["model.n_neurons=600", "trainer.batch_size=256", "trainer.epochs=1"]  # large enough for all cores alone
    alone, alone_out = sweep(data_root, tmp_path / "alone", "trainer.seed=1", *big)
    par, par_out = sweep(data_root, tmp_path / "par", "trainer.seed=1,2", "hydra/launcher=joblib",
                         "hydra.launcher.n_jobs=2", *big)
    assert alone.returncode == 0 and par.returncode == 0, par.stderr
    assert summaries(alone_out)[0]["threads"] == len(os.sched_getaffinity(0))
    assert [s["threads"] for s in summaries(par_out).values()] == [max(1, len(os.sched_getaffinity(0)) // 2)] * 2


def test_parallel_jobs_share_the_cores(monkeypatch):
    from omegaconf import OmegaConf

    from dnnlab.prepare import pick_threads

    cfg = OmegaConf.create({"model": {"n_hidden": 2, "n_neurons": 1000}, "trainer": {"batch_size": 1024}})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert pick_threads("auto", cfg, parallel_jobs=1) == 8
    assert pick_threads("auto", cfg, parallel_jobs=4) == 2
    assert pick_threads("auto", cfg, parallel_jobs=16) == 1
    assert pick_threads(3, cfg, parallel_jobs=4) == 3  # an explicit setting wins
    small = OmegaConf.create({"model": {"n_hidden": 5, "n_neurons": 100}, "trainer": {"batch_size": 32}})
    assert pick_threads("auto", small, parallel_jobs=1) == 1


def test_submitit_local_launcher(data_root, tmp_path):
    done, out = sweep(data_root, tmp_path, "optimizer=sgd,adam", "debug=smoke", "hydra/launcher=submitit_local",
                      "hydra.launcher.timeout_min=5")
    assert done.returncode == 0, done.stderr
    jobs = summaries(out)
    assert len(jobs) == 2 and all(s["status"] == "completed" for s in jobs.values())
    assert list(out.glob(".submitit/*"))  # submitit's own job folders


def test_shipped_slurm_launcher_config_composes(tmp_path):
    done = forked.dnnlab("train", "hydra/launcher=slurm", "--cfg", "hydra", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "SlurmLauncher" in done.stdout and "cpus_per_task: 2" in done.stdout
