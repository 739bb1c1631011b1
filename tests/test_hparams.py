"""TensorBoard's HParams table: every run (alone, in a stack, in a sweep) writes its overrides, key settings and
final metrics into its own tensorboard/ folder, read back here with TensorBoard's own reader."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
from tensorboard.plugins.hparams import metadata

from dnnlab import hparams
from dnnlab.stacked import train_group
from dnnlab.train import train
from tests import forked
from tests.conftest import HANG_S

METRICS = ("val_acc", "val_loss", "test_acc", "test_loss", "epochs")


def session(content: dict) -> dict:
    """{hparam: value} of a run's session, from its hparams plugin data (numbers come back as floats)."""
    assert metadata.EXPERIMENT_TAG not in content  # one run's experiment would hide the other runs' keys
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    assert metadata.SESSION_END_INFO_TAG in content
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}


def read_run(folder: Path) -> tuple[dict, dict]:
    """(hparams, {metric: (step, value)}) of one run's tensorboard/ folder."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    final = {m: events.Scalars(hparams.PREFIX + m) for m in METRICS}
    return session(events.PluginTagToContent(metadata.PLUGIN_NAME)), \
        {m: (e[-1].step, e[-1].value) for m, e in final.items()}


def assert_matches(run: Path, found: tuple[dict, dict], overrides: dict) -> None:
    """The session holds the run's overrides, settings and status; its metrics are the summary's."""
    values, final = found
    summary = json.loads((run / "summary.json").read_text())
    assert values["status"] == summary["status"]
    assert {k: values.get(k) for k in overrides} == overrides
    config = run / ".hydra" / "config.yaml"
    cfg = yaml.safe_load(config.read_text()) if config.is_file() else None
    if cfg:
        assert values["trainer.batch_size"] == cfg["trainer"]["batch_size"]
        assert values["optimizer._target_"] == cfg["optimizer"]["_target_"]
    assert not any(k.startswith(hparams.NOISE) for k in values)
    for m in METRICS:
        step, value = final[m]
        assert step == summary["epochs"]
        expected = summary[m] if summary[m] is not None else math.nan
        assert value == pytest.approx(expected, rel=1e-6, nan_ok=True), m


def test_a_run_writes_its_session_and_final_metrics(make_cfg, tmp_path):
    run = tmp_path / "run"
    given = ["optimizer=sgd", "optimizer.lr=0.02", "trainer.progress=false", "+trial.storage=x"]
    (run / ".hydra").mkdir(parents=True)  # as Hydra writes it before the job starts
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(given))
    cfg = make_cfg(*given[:2])
    summary = train(cfg, run)
    found = read_run(run / "tensorboard")
    assert_matches(run, found, {"optimizer": "sgd", "optimizer.lr": 0.02})
    values = found[0]
    assert values["optimizer._target_"] == "torch.optim.SGD" and values["trainer.epochs"] == 2
    assert values["activation._target_"] == "torch.nn.ELU" and values["norm.kind"] == "none"
    assert values["init.mode"] == "fan_in" and values["regularizers"] == "none"
    assert values["trainer.seed"] == summary["seed"] and values["schedule._target_"] == "dnnlab.schedule.Constant"

    # a resumed run ends again: its new session replaces the earlier one (TensorBoard would keep the first)
    hparams.write(cfg, run, {**summary, "status": "again", "epochs": 5})
    assert len(list((run / "tensorboard").glob(f"*{hparams.SUFFIX}"))) == 1
    values, final = read_run(run / "tensorboard")
    assert values["status"] == "again" and final["epochs"] == (5, 5.0)


def test_a_run_without_hydra_and_a_diverged_run(make_cfg, tmp_path):
    summary = train(make_cfg("optimizer=sgd", "optimizer.lr=1e9"), tmp_path)
    assert summary["status"] == "diverged"
    values, final = read_run(tmp_path / "tensorboard")
    assert_matches(tmp_path, (values, final), {})
    assert values["status"] == "diverged" and values["optimizer.lr"] == 1e9 and math.isnan(final["test_acc"][1])


def test_each_stacked_job_writes_its_own_session(make_cfg, tmp_path):
    cfgs = [make_cfg("trainer.seed=1"), make_cfg("trainer.seed=2", "optimizer.lr=0.003")]
    dirs = [tmp_path / "a", tmp_path / "b"]
    summaries = train_group(cfgs, dirs, progress=False)
    for d, summary, seed, lr in zip(dirs, summaries, (1, 2), (0.001, 0.003)):
        assert "stacked" in summary
        values, final = read_run(d / "tensorboard")
        assert_matches(d, (values, final), {})
        assert values["trainer.seed"] == seed and values["optimizer.lr"] == lr


def test_a_sweep_is_one_table(data_root, tmp_path):
    out = tmp_path / "sweep"
    env = {**os.environ, "DNNLAB_DATA": str(data_root)}
    done = forked.dnnlab("train", "-m", "optimizer=sgd", "optimizer.lr=0.01,1e9", "data.val_size=100",
                         "trainer.epochs=2", "trainer.progress=false", f"hydra.sweep.dir={out}", cwd=tmp_path,
                         env=env, timeout=HANG_S)
    assert done.returncode == 0, done.stderr
    runs = EventMultiplexer(size_guidance={"scalars": 0, "tensors": 0})  # as `tensorboard --logdir SWEEP_DIR`
    runs.AddRunsFromDirectory(str(out))
    runs.Reload()
    sessions = runs.PluginRunToTagToContent(metadata.PLUGIN_NAME)
    folders = sorted(out.glob("*/summary.json"))
    assert len(folders) == 2 and set(sessions) == {f"{p.parent.name}/tensorboard" for p in folders}
    for p in folders:
        run, name = p.parent, f"{p.parent.name}/tensorboard"
        given = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        lr = float(next(o for o in given if o.startswith("optimizer.lr=")).partition("=")[2])
        final = {m: runs.Scalars(name, hparams.PREFIX + m) for m in METRICS}
        found = session(sessions[name]), {m: (e[-1].step, e[-1].value) for m, e in final.items()}
        assert_matches(run, found, {"optimizer": "sgd", "optimizer.lr": lr})
        assert found[0]["status"] == ("diverged" if lr > 1 else "completed")


def test_sweep_folders_can_be_named_by_their_overrides(data_root, tmp_path):
    out = tmp_path / "sweep"
    env = {**os.environ, "DNNLAB_DATA": str(data_root)}
    done = forked.dnnlab("train", "-m", "optimizer.lr=0.01,0.02", "debug=smoke", "data.val_size=100",
                         "trainer.progress=false",
                         f"data.root={data_root}", "hydra.sweep.subdir=${hydra.job.num}_${hydra.job.override_dirname}",
                         f"hydra.sweep.dir={out}", cwd=tmp_path, env=env, timeout=HANG_S)
    assert done.returncode == 0, done.stderr
    names = sorted(p.parent.name for p in out.glob("*/summary.json"))
    # every override but the excluded keys (data.root: a path), sorted, as Hydra's override_dirname writes them
    assert names == [f"{i}_data.val_size=100,debug=smoke,optimizer.lr=0.0{i + 1}" for i in range(2)]
    runs = EventMultiplexer()
    runs.AddRunsFromDirectory(str(out))
    runs.Reload()
    assert set(runs.PluginRunToTagToContent(metadata.PLUGIN_NAME)) == {f"{n}/tensorboard" for n in names}
