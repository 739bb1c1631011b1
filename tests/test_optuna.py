"""The Optuna sweeper (hydra/sweeper=optuna, hydra_plugins/dnnlab_optuna_sweeper) and the per-epoch trial reporter.

Search-space parsing is tested in process; every sweep runs `python -m dnnlab train -m ...` in a subprocess on the
tiny datasets of conftest.py, with its sweep directory (and so its default journal storage) in tmp_path. The
PostgreSQL test starts a real server on 127.0.0.1 (initdb + pg_ctl; as root through `runuser -u postgres`).
"""
from __future__ import annotations

import glob
import json
import math
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from dnnlab.trial import open_storage, reported_metric
from hydra_plugins.dnnlab_optuna_sweeper import _space
from tests import forked
from tests.conftest import HANG_S

SWEEPER = ["hydra/sweeper=optuna"]
SHORT = ["data.val_size=100", "trainer.progress=false"]


@pytest.fixture
def sweep(data_root, tmp_path):
    """sweep(*overrides, epochs=2) runs `python -m dnnlab train -m hydra/sweeper=optuna ...` into tmp_path/sweep;
    sweep.start(...) starts it in the background."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["DNNLAB_DATA"] = str(data_root)
    sweep_dir = tmp_path / "sweep"

    def command(*overrides: str, epochs: int = 2, sweeper: bool = True) -> list[str]:
        return [sys.executable, "-m", "dnnlab", "train", "-m", *(SWEEPER if sweeper else []), *SHORT,
                f"trainer.epochs={epochs}", f"hydra.sweep.dir={sweep_dir}", *overrides]

    def run(*overrides: str, epochs: int = 2, sweeper: bool = True, check: bool = True):
        result = forked.dnnlab(*command(*overrides, epochs=epochs, sweeper=sweeper)[3:], cwd=tmp_path, env=env)
        if check:
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    def start(*overrides: str, epochs: int = 2) -> subprocess.Popen:
        """The sweep in the background, in a session of its own (so that its process group can be killed), its
        output in run.log."""
        with open(run.log, "w") as out:
            return subprocess.Popen(command(*overrides, epochs=epochs), cwd=tmp_path, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    run.dir, run.log, run.start = sweep_dir, tmp_path / "background.log", start
    return run


def journal_study(sweep_dir: Path, name: str = "dnnlab") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(str(sweep_dir / "optuna.journal")))


def states(study: optuna.Study) -> list[TrialState]:
    return [t.state for t in study.get_trials(deepcopy=False)]


def summary(trial: optuna.trial.FrozenTrial) -> dict:
    return json.loads((Path(trial.user_attrs["output_dir"]) / "summary.json").read_text())


# ---- search spaces -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, distribution, grid", [
    ("optimizer.lr=interval(1e-4, 1e-1)", FloatDistribution(1e-4, 0.1), None),
    ("optimizer.lr=tag(log, interval(1e-4, 1e-1))", FloatDistribution(1e-4, 0.1, log=True), None),
    ("model.n_hidden=int(interval(1, 10))", IntDistribution(1, 10), None),
    ("model.n_neurons=tag(log, int(interval(16, 256)))", IntDistribution(16, 256, log=True), None),
    ("model.n_hidden=range(1, 10, 2)", IntDistribution(1, 9, step=2), [1, 3, 5, 7, 9]),
    ("model.n_hidden=range(4)", IntDistribution(0, 3), [0, 1, 2, 3]),
    ("regularizer.dropout.rate=range(0.1, 0.5, 0.1)", FloatDistribution(0.1, 0.4, step=0.1), [0.1, 0.2, 0.3, 0.4]),
    ("optimizer=choice(adam, nadam, sgd)", CategoricalDistribution(["adam", "nadam", "sgd"]),
     ["adam", "nadam", "sgd"]),
    ("trainer.batch_size=32,64,128", CategoricalDistribution([32, 64, 128]), [32, 64, 128]),
])
def test_search_space_strings_become_optuna_distributions(text, distribution, grid):
    params, fixed = _space.parse([text])
    assert fixed == []
    (param,) = params.values()
    assert param.name == text.split("=")[0]
    assert param.distribution == distribution
    assert param.grid == grid


def test_trial_values_become_overrides():
    params, _ = _space.parse(["model.n_neurons=choice([300,100], [100,100,100])", "+extra.rate=range(0.1, 0.4, 0.1)",
                              "optimizer.lr=tag(log, interval(1e-4, 1e-1))", "optimizer=choice(adam, nadam)"])
    neurons = params["model.n_neurons"]
    assert neurons.distribution.choices == ("[300,100]", "[100,100,100]")  # lists are stored as their text
    assert neurons.override("[100,100,100]") == "model.n_neurons=[100,100,100]"
    assert params["extra.rate"].override(0.30000000000000004) == "+extra.rate=0.3"  # the key keeps its +
    assert params["optimizer.lr"].override(0.0012345678901234) == "optimizer.lr=0.0012345678901234"
    assert params["optimizer"].override("nadam") == "optimizer=nadam"


def test_fixed_overrides_and_the_last_word():
    params, fixed = _space.parse(["optimizer.lr=tag(log, interval(1e-4, 1e-1))", "trainer.epochs=3",
                                  "optimizer=choice(adam, sgd)", "optimizer.lr=0.01", "trainer.epochs=choice(2, 4)"])
    assert list(params) == ["optimizer", "trainer.epochs"]  # the command line fixed lr, and searches epochs
    assert fixed == ["optimizer.lr=0.01"]


def test_yaml_params_flatten_and_typed_params_are_recovered():
    node = {"optimizer.lr": "tag(log, interval(1e-4, 1e-1))", "trainer": {"batch_size": "choice(32, 64)"},
            "trainer.epochs": 3}
    assert _space.flatten(node) == {"optimizer.lr": "tag(log, interval(1e-4, 1e-1))",
                                    "trainer.batch_size": "choice(32, 64)", "trainer.epochs": 3}
    assert _space.param_override("trainer.epochs", 3) == "trainer.epochs=3"
    typed = ["hydra/sweeper=optuna", "++hydra.sweeper.params.optimizer.lr='tag(log, interval(1e-4, 1e-1))'",
             "hydra.sweeper.n_trials=3"]
    assert _space.command_line_params(typed) == [("optimizer.lr", "tag(log, interval(1e-4, 1e-1))")]


@pytest.mark.parametrize("text, message", [
    ("optimizer.lr=tag(log, interval(0, 1))", "low > 0"),
    ("model.n_hidden=tag(log, range(1, 10, 2))", "log range needs step 1"),
    ("model.n_hidden=range(5, 1)", "empty"),
])
def test_bad_search_spaces_are_one_line_errors(text, message):
    with pytest.raises(_space.SearchSpaceError, match=message):
        _space.parse([text])


def test_the_grid_needs_discrete_parameters():
    params, _ = _space.parse(["optimizer=choice(adam, sgd)", "trainer.batch_size=range(16, 64, 16)"])
    assert _space.grid_space(params) == {"optimizer": ["adam", "sgd"], "trainer.batch_size": [16, 32, 48]}
    params, _ = _space.parse(["optimizer.lr=interval(1e-4, 1e-1)"])
    with pytest.raises(_space.SearchSpaceError, match="grid sampler needs choice"):
        _space.grid_space(params)


def test_the_pruner_hears_a_per_epoch_metric():
    assert reported_metric("val_loss", "minimize") == "val_loss"
    assert reported_metric("val_acc", "maximize") == "val_acc"
    assert reported_metric("test_acc", "maximize") == "val_acc"  # known only at the end: its validation twin
    assert reported_metric("test_loss", "minimize") == "val_loss"


def test_the_plugin_is_registered():
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    names = {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Sweeper)}
    assert "hydra_plugins.dnnlab_optuna_sweeper.optuna_sweeper.DnnlabOptunaSweeper" in names
    assert "optuna.yaml" in ConfigStore.instance().list("hydra/sweeper")
    plugin_dir = Path(_space.__file__).parent
    assert not (plugin_dir.parent / "__init__.py").exists()  # hydra_plugins stays a namespace package


# ---- sweeps --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_tpe_and_random_samplers_fill_the_journal(sweep, sampler):
    result = sweep(f"hydra.sweeper.sampler={sampler}", "hydra.sweeper.seed=0", "hydra.sweeper.n_trials=3",
                   "hydra.sweeper.metric=test_acc", "optimizer.lr=tag(log, interval(1e-3, 1e-1))",
                   "optimizer=choice(adam, nadam)")
    study = journal_study(sweep.dir)
    trials = study.get_trials()
    assert states(study) == [TrialState.COMPLETE] * 3
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE  # inferred from test_acc
    for trial in trials:
        assert set(trial.params) == {"optimizer.lr", "optimizer"}
        assert 1e-3 <= trial.params["optimizer.lr"] <= 1e-1
        run = summary(trial)
        assert trial.value == run["test_acc"]
        assert Path(trial.user_attrs["output_dir"]) == sweep.dir / str(trial.number)
        config = (sweep.dir / str(trial.number) / ".hydra" / "config.yaml").read_text()
        assert f"lr: {trial.params['optimizer.lr']}" in config and "metric: test_acc" in config
        # the run reported val_acc (test_acc's per-epoch twin) every epoch
        assert sorted(trial.intermediate_values) == [1, 2]
        assert trial.intermediate_values[2] == pytest.approx(
            float((sweep.dir / str(trial.number) / "metrics.csv").read_text().splitlines()[2].split(",")[4]))
    info = json.loads((sweep.dir / "optuna_study.json").read_text())
    assert info["study_name"] == "dnnlab" and info["storage"] == str(sweep.dir / "optuna.journal")
    assert info["n_trials"] == 3 and info["direction"] == "maximize" and info["metric"] == "test_acc"
    assert info["best_value"] == study.best_value and info["best_params"] == study.best_params
    assert "optuna study dnnlab" in result.stdout and "best trial" in result.stdout


def test_grid_sampler_tries_every_point_once(sweep):
    sweep("hydra.sweeper.sampler=grid", "hydra.sweeper.n_trials=10", "optimizer=choice(adam, sgd)",
          "trainer.batch_size=range(32, 97, 64)", epochs=1)
    study = journal_study(sweep.dir)
    points = sorted((t.params["optimizer"], t.params["trainer.batch_size"]) for t in study.trials)
    assert points == [("adam", 32), ("adam", 96), ("sgd", 32), ("sgd", 96)]  # 4 trials, not 10
    assert states(study) == [TrialState.COMPLETE] * 4
    result = sweep("hydra.sweeper.sampler=grid", "optimizer=choice(adam, sgd)",
                   "trainer.batch_size=range(32, 97, 64)", epochs=1)
    assert len(journal_study(sweep.dir).trials) == 4  # rerun: nothing left to try
    assert ("already has 4 of hydra.sweeper.n_trials=20 trials with a result: nothing to run (every point of its "
            "4-point grid has a result)") in result.stdout


def test_rerunning_the_command_continues_the_study(sweep):
    args = ["hydra.sweeper.sampler=random", "hydra.sweeper.seed=1", "optimizer.lr=tag(log, interval(1e-3, 1e-1))"]
    sweep(*args, "hydra.sweeper.n_trials=2")
    first = [t.params["optimizer.lr"] for t in journal_study(sweep.dir).trials]
    (sweep.dir / "3").mkdir()  # a stray folder where trial 3 would go: its run goes beside it, not into it
    result = sweep(*args, "hydra.sweeper.n_trials=4")  # the study's target: two more
    assert "2 of hydra.sweeper.n_trials=4 trials with a result" in result.stdout and "2 to run" in result.stdout
    study = journal_study(sweep.dir)
    assert [t.number for t in study.trials] == [0, 1, 2, 3] and states(study) == [TrialState.COMPLETE] * 4
    assert [t.params["optimizer.lr"] for t in study.trials[:2]] == first
    assert not set(first) & {t.params["optimizer.lr"] for t in study.trials[2:]}  # the seed moved on
    assert sorted(p.name for p in sweep.dir.iterdir() if p.is_dir()) == ["0", "1", "2", "3", "3-2"]
    assert study.trials[3].user_attrs["output_dir"] == str(sweep.dir / "3-2")
    assert json.loads((sweep.dir / "optuna_study.json").read_text())["n_trials"] == 4


def test_failed_and_diverged_trials_fail_and_the_sweep_continues(sweep):
    # a grid of 6: an unknown optimizer (does not compose), a negative lr (rejected by validate.check, as
    # trainer.batch_size=0 would be), a huge one (diverges), a good one
    sweep("hydra.sweeper.sampler=grid", "optimizer=choice(sgd, no_such_optimizer)",
          "optimizer.lr=choice(-1.0, 1e6, 0.01)")
    study = journal_study(sweep.dir)
    outcome = {(t.params["optimizer"], t.params["optimizer.lr"]): (t.state, t.user_attrs.get("status"))
               for t in study.trials}
    assert outcome == {
        ("sgd", -1.0): (TrialState.FAIL, "failed"),
        ("sgd", 1e6): (TrialState.FAIL, "diverged"),
        ("sgd", 0.01): (TrialState.COMPLETE, "completed"),
        ("no_such_optimizer", -1.0): (TrialState.FAIL, "failed"),
        ("no_such_optimizer", 1e6): (TrialState.FAIL, "failed"),
        ("no_such_optimizer", 0.01): (TrialState.FAIL, "failed"),
    }
    reasons = {t.params["optimizer.lr"]: t.user_attrs["reason"] for t in study.trials
               if t.params["optimizer"] == "sgd" and t.state == TrialState.FAIL}
    assert "optimizer.lr=-1.0 is not allowed" in reasons[-1.0] and "nan" in reasons[1e6]
    assert "no_such_optimizer" in next(t.user_attrs["reason"] for t in study.trials
                                       if t.params["optimizer"] == "no_such_optimizer")
    assert json.loads((sweep.dir / "optuna_study.json").read_text())["best_params"] == {
        "optimizer": "sgd", "optimizer.lr": 0.01}


def test_median_pruner_stops_a_bad_trial_early(sweep):
    pruning = ["hydra.sweeper.sampler=random", "hydra.sweeper.pruner=median",
               "hydra.sweeper.median.n_startup_trials=3", "hydra.sweeper.median.n_warmup_steps=1"]
    sweep(*pruning, "hydra.sweeper.n_trials=3", "optimizer.lr=0.01", "trainer.seed=choice(1, 2, 3)", epochs=4)
    # the same study, one more trial (a target of 4) with a learning rate too small to learn anything in 4 epochs
    result = sweep(*pruning, "hydra.sweeper.n_trials=4", "optimizer.lr=1e-9", epochs=4)
    study = journal_study(sweep.dir)
    assert len(study.trials) == 4  # the target, not 3 + 4
    good, bad = study.trials[:3], study.trials[3]
    assert [t.state for t in good] == [TrialState.COMPLETE] * 3
    assert all(sorted(t.intermediate_values) == [1, 2, 3, 4] for t in good)
    assert bad.state == TrialState.PRUNED, result.stdout[-3000:]
    run = summary(bad)
    assert run["status"] == "pruned" and run["epochs"] < 4 and "median pruner" in run["reason"]
    assert len(bad.intermediate_values) == run["epochs"]
    assert "trial 3 pruned" in result.stdout


def test_experiment_preset_declares_its_search_space_in_yaml(sweep):
    result = sweep("experiment=search_lr", "hydra.sweeper.n_trials=2", "optimizer.lr=0.005", "model.n_hidden=1",
                   "trainer.batch_size=choice(32, 64)", sweeper=False, epochs=1)
    study = journal_study(sweep.dir, "search_lr")
    assert len(study.trials) == 2 and study.direction == optuna.study.StudyDirection.MAXIMIZE
    for trial in study.trials:
        # the command line fixed the YAML's lr search and replaced its batch sizes
        assert set(trial.params) == {"optimizer", "trainer.batch_size", "regularizer.dropout.rate"}
        assert trial.params["trainer.batch_size"] in (32, 64)
        assert 0.0 <= trial.params["regularizer.dropout.rate"] <= 0.5
        config = (sweep.dir / str(trial.number) / ".hydra" / "config.yaml").read_text()
        assert "lr: 0.005" in config and "name: median" in config
    assert "maximize val_acc" in result.stdout


def test_joblib_launcher_runs_a_batch_in_parallel_into_one_journal(sweep):
    sweep("hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=4",
          "hydra.sweeper.pruner=hyperband", "optimizer.lr=tag(log, interval(1e-3, 1e-1))")
    study = journal_study(sweep.dir)
    assert len(study.trials) == 4
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    assert all(t.intermediate_values for t in study.trials)  # the workers reported to the same journal
    hydra_cfg = (sweep.dir / "0" / ".hydra" / "hydra.yaml").read_text()
    assert "hydra_joblib_launcher" in hydra_cfg
    config = (sweep.dir / "0" / ".hydra" / "config.yaml").read_text()
    assert "name: hyperband" in config and "max_resource: 2" in config  # auto: trainer.epochs

    def span(n: int) -> tuple[float, float]:  # from the job's config being written to its summary
        run = sweep.dir / str(n)
        return (run / ".hydra" / "config.yaml").stat().st_mtime, (run / "summary.json").stat().st_mtime

    (start0, end0), (start1, end1) = span(0), span(1)
    assert start0 < end1 and start1 < end0, "the two trials of the first batch did not overlap"


# ---- a shared database ---------------------------------------------------------------------------------------

def postgres_bindir() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/VERSION/bin (newest)."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: [int(x) for x in Path(p).parent.parent.name.split(".") if x.isdigit()])
    return Path(found[-1]).parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A PostgreSQL server of its own on 127.0.0.1:<free port>, with a password user and an empty database."""
    import psycopg2  # the test extra installs psycopg2-binary

    bindir = postgres_bindir()
    if bindir is None:
        if os.environ.get("CI"):  # .ci/run installs PostgreSQL: its absence there is a broken set-up, not a skip
            pytest.fail("CI=true but no PostgreSQL server binaries were found (see .ci/run)")
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin; "
                    "install Debian's postgresql package")
    as_root = os.geteuid() == 0
    prefix = []
    if as_root:  # postgres refuses to run as root: run it as the postgres user, in a folder it owns
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root needs the `postgres` user (Debian's postgresql package creates it)")
        assert shutil.which("runuser"), "running as root needs runuser (util-linux) to start postgres"
        prefix = ["runuser", "-u", "postgres", "--"]
    # a folder of its own under /tmp: pytest's tmp_path sits in a 0700 folder the postgres user cannot enter
    base = Path(tempfile.mkdtemp(prefix="dnnlab-pg-"))
    data, password = base / "data", "s3cr:t@pw/x"
    (base / "pw").write_text(password + "\n")
    if as_root:
        for path in (base, base / "pw"):
            os.chown(path, owner.pw_uid, owner.pw_gid)

    def run(*args):
        result = subprocess.run(prefix + [str(a) for a in args], cwd=base, capture_output=True, text=True,
                                timeout=HANG_S)
        assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout}\n{result.stderr}\n" + (
            (base / "log").read_text() if (base / "log").exists() else "")

    port = free_port()
    try:
        run(bindir / "initdb", "-D", data, "-U", "dnnlab", f"--pwfile={base / 'pw'}", "--auth-host=scram-sha-256",
            "--auth-local=trust", "-E", "UTF8", "--no-sync")
        run(bindir / "pg_ctl", "-D", data, "-l", base / "log", "-w", "-t", "60", "-o",
            f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={base} -c fsync=off", "start")
        connection = psycopg2.connect(host="127.0.0.1", port=port, user="dnnlab", password=password,
                                      dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE studies")
        connection.close()
        yield f"postgresql://dnnlab:{urllib.parse.quote(password, safe='')}@127.0.0.1:{port}/studies"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           cwd=base, capture_output=True, timeout=HANG_S)
        shutil.rmtree(base, ignore_errors=True)


def test_postgresql_storage_holds_the_study(sweep, postgres_url):
    args = [f"hydra.sweeper.storage={postgres_url}", "hydra.sweeper.study_name=pg", "hydra.sweeper.n_trials=2",
            "hydra.sweeper.pruner=median", "optimizer.lr=tag(log, interval(1e-3, 1e-1))"]
    result = sweep(*args)
    assert not (sweep.dir / "optuna.journal").exists()
    # plain optuna.load_study(storage=postgres_url) needs psycopg 3 with SQLAlchemy 2.1; open_storage falls back to
    # psycopg2 as the sweeper and the runs do
    study = optuna.load_study(study_name="pg", storage=open_storage(postgres_url))
    assert states(study) == [TrialState.COMPLETE] * 2
    assert all(sorted(t.intermediate_values) == [1, 2] for t in study.trials)  # reported by the runs
    info = json.loads((sweep.dir / "optuna_study.json").read_text())
    assert info["storage"] == postgres_url and info["n_trials"] == 2
    storage_row = next(line for line in result.stdout.splitlines() if "│ storage" in line)
    assert "***" in storage_row and "s3cr" not in storage_row  # the table hides the password
    sweep(*args[:2], "hydra.sweeper.n_trials=3", "optimizer.lr=tag(log, interval(1e-3, 1e-1))")  # one more
    study = optuna.load_study(study_name="pg", storage=open_storage(postgres_url))
    assert len(study.trials) == 3 and math.isfinite(study.best_value)
