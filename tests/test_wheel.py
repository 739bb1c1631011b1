"""The wheel: built from this checkout, installed into a fresh venv, run from outside the repository.

The fresh venv borrows the heavy dependencies (torch, hydra, ...) from this venv through a .pth file naming this
venv's site-packages as a plain path; .pth files inside that folder (this venv's editable dnnlab) are therefore not
processed, so the dnnlab that runs must be the wheel's.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from tests.conftest import HANG_S

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=HANG_S, **kwargs)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """python -m build --wheel; isolated first (it fetches hatchling from the package index), else --no-isolation."""
    outdir = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "build", "--wheel", "--outdir", outdir, REPO]
    result = run(cmd)
    if result.returncode != 0:
        if importlib.util.find_spec("hatchling") is None:
            pytest.fail("the isolated wheel build failed and hatchling is not installed here for --no-isolation:\n"
                        + result.stdout[-2000:] + result.stderr[-2000:])
        result = run(cmd + ["--no-isolation"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    wheels = list(outdir.glob("dnnlab-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (--no-deps), seeing this venv's packages for the dependencies."""
    root = tmp_path_factory.mktemp("venv") / "v"
    result = run([sys.executable, "-m", "venv", "--without-pip", root])
    assert result.returncode == 0, result.stderr
    python = root / "bin" / "python"
    # this venv's pip installs into the new one; the new venv cannot see this venv's packages yet, so pip finds
    # no dnnlab installed there and installs the wheel's files
    result = run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel])
    assert result.returncode == 0, result.stdout + result.stderr
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    assert Path(site).is_relative_to(root), site
    shared = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))  # this venv's, in order
    (Path(site) / "_shared_test_deps.pth").write_text("".join(f"{p}\n" for p in shared))
    return root


@pytest.fixture
def outside(tmp_path) -> Path:
    """A working directory outside the repository."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    assert not cwd.resolve().is_relative_to(REPO)
    return cwd


def test_wheel_ships_the_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "dnnlab/conf/train.yaml" in names
    expected = {f"dnnlab/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    assert expected <= names, sorted(expected - names)
    for group in ("init", "activation", "norm", "optimizer", "schedule", "regularizer", "data", "model", "trainer",
                  "debug"):
        assert any(n.startswith(f"dnnlab/conf/{group}/") for n in names), group
    assert "dnnlab/__main__.py" in names and "dnnlab/cli.py" in names
    assert "dnnlab/fast/csrc/mlp_step.cpp" in names  # the native step's source, compiled where the wheel runs
    assert "dnnlab/fast/__init__.py" in names and "dnnlab/fast/native.py" in names
    plugin = {f"hydra_plugins/dnnlab_optuna_sweeper/{m}.py"
              for m in ("__init__", "config", "optuna_sweeper", "_sweep", "_space", "_settings", "_study", "_trials")}
    assert plugin <= names and "dnnlab/trial.py" in names, sorted(plugin - names)
    assert "hydra_plugins/__init__.py" not in names  # a namespace package shared with Hydra's plugins
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "dnnlab = dnnlab.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_trains_from_outside_the_repository(venv, outside, data_root):
    python, script = venv / "bin" / "python", venv / "bin" / "dnnlab"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    env["DNNLAB_DATA"] = str(data_root)

    probe = run([python, "-c", "import sys, torch, dnnlab; print(dnnlab.__file__); print(dnnlab.CONF_DIR); "
                               "print(torch.__file__); print('\\n'.join(sys.path))"], cwd=outside, env=env)
    assert probe.returncode == 0, probe.stderr
    dnnlab_file, conf_dir, torch_file, *path = probe.stdout.splitlines()
    assert Path(dnnlab_file).is_relative_to(venv), f"the editable dnnlab leaked in: {dnnlab_file}"
    assert Path(conf_dir) == Path(dnnlab_file).parent / "conf"  # the configs inside the package, not the repo's
    assert not Path(torch_file).is_relative_to(venv)  # borrowed, not copied
    assert str(REPO) not in path
    probe = run([python, "-c", "import hydra_plugins.dnnlab_optuna_sweeper as p; print(p.__file__); "
                 "from hydra.core.plugins import Plugins; from hydra.plugins.sweeper import Sweeper; "
                 "print(*(c.__name__ for c in Plugins.instance().discover(Sweeper)))"], cwd=outside, env=env)
    plugin_file, sweepers = probe.stdout.splitlines()
    assert Path(plugin_file).is_relative_to(venv) and "DnnlabOptunaSweeper" in sweepers.split(), probe.stderr

    usage = run([python, "-m", "dnnlab"], cwd=outside, env=env)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: dnnlab"), usage.stderr

    run_dir = outside / "run"
    result = run([script, "train", "debug=smoke", "data.val_size=100", f"hydra.run.dir={run_dir}"],
                 cwd=outside, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["training_step"] == "native"
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "metrics.csv").is_file()
    hydra_cfg = (run_dir / ".hydra" / "hydra.yaml").read_text()
    assert str(Path(dnnlab_file).parent / "conf") in hydra_cfg  # composed from the wheel's configs
