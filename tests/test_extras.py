"""What only one command or launcher needs is an extra; without it, that command is one line naming the extra."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dnnlab import extras, hydra_guard
from dnnlab.errors import DnnlabError
from tests.conftest import HANG_S


@pytest.mark.parametrize("argv,module,extra", [
    (["-m", "experiment=search_lr"], "optuna", "optuna"),
    (["-m", "hydra/sweeper=optuna"], "optuna", "optuna"),
    (["-m", "hydra/launcher=joblib"], "joblib", "joblib"),
    (["-m", "hydra/launcher=slurm"], "submitit", "slurm"),
    (["-m", "hydra/launcher=submitit_local"], "submitit", "slurm"),
    (["-m", "experiment=search_lr", "hydra.sweeper.storage=postgresql://me@127.0.0.1/studies"], "psycopg2",
     "postgres"),
])
def test_a_missing_extra_is_named_before_hydra_starts(monkeypatch, argv, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    if module == "psycopg2":
        monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(DnnlabError, match=rf"needs dnnlab's optional packages '{extra}' \({module} is not "
                                          rf"installed\): pip install 'dnnlab\[{extra}\]'"):
        hydra_guard.check_command_line("train", argv)


def test_installed_extras_pass():
    for argv in (["-m", "experiment=search_lr"], ["-m", "hydra/launcher=joblib"], ["-m", "hydra/launcher=slurm"]):
        hydra_guard.check_command_line("train", argv)


def test_a_launcher_whose_plugin_is_not_installed_at_all(monkeypatch):
    """Without hydra-joblib-launcher, Hydra finds no config hydra/launcher/joblib: the extra is still named."""
    monkeypatch.setitem(sys.modules, "hydra_plugins.hydra_joblib_launcher", None)
    with pytest.raises(DnnlabError, match=r"hydra/launcher=joblib needs .*pip install 'dnnlab\[joblib\]'"):
        extras.check_missing_config("In 'train': Could not find 'hydra/launcher/joblib'")


def test_the_command_line_says_it_in_one_line_and_writes_nothing(tmp_path):
    """A real `dnnlab train -m hydra/sweeper=optuna` where `import optuna` fails: exit 2, one line, no folder."""
    blocker = tmp_path / "site" / "optuna"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'optuna'\", name='optuna')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run([sys.executable, "-m", "dnnlab", "train", "-m", "experiment=search_lr"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == ("error: hydra/sweeper=optuna needs dnnlab's optional packages 'optuna' (optuna is "
                                   "not installed): pip install 'dnnlab[optuna]'")
    assert not (tmp_path / "outputs").exists()


def test_reproduce_names_the_joblib_extra(monkeypatch, tmp_path):
    from dnnlab import reproduce

    monkeypatch.setitem(sys.modules, "joblib", None)
    with pytest.raises(DnnlabError, match=r"dnnlab reproduce .*pip install 'dnnlab\[joblib\]'"):
        reproduce.multirun(["ed2/selu_100_layers"], [0], tmp_path, [])
    assert not (tmp_path / "runs").exists()


def test_report_without_optuna_notes_the_extra_and_reports_the_rest(monkeypatch, tmp_path):
    from dnnlab.report import report
    from tests.test_report import fake_run

    fake_run(tmp_path / "S" / "0", ["optimizer.lr=0.01"], [0.5, 0.6], {"test_acc": 0.6})
    (tmp_path / "S" / "optuna_study.json").write_text('{"study_name": "lr_search", "storage": "study.journal"}')
    monkeypatch.setitem(sys.modules, "optuna", None)
    result = report(tmp_path / "S")
    assert "no Optuna plots: they need dnnlab's optional packages 'optuna' (pip install 'dnnlab[optuna]')" \
        in result["notes"]
    assert len(result["runs"]) == 1 and (tmp_path / "S" / "report.csv").is_file()
