"""`dnnlab report DIR`: tables, groups of repeats, plots and Optuna plots of finished, partial and broken sweeps.

A real sweep (`python -m dnnlab train -m ...`, once per module) and in-process runs on the tiny data of conftest.py;
hand-written run folders where the numbers must be exact (cross-validation folds) or many (legibility).
"""
from __future__ import annotations

import csv
import json
import os
import re
import select
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import matplotlib.image
import optuna
import pytest
import yaml
from optuna.storages.journal import JournalFileBackend

from dnnlab import report_plots
from dnnlab.record import COLUMNS, read_metrics
from dnnlab.report import MAX_LEGEND, main, report
from dnnlab.train import train
from tests import forked
from tests.conftest import HANG_S

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_COLUMNS = ["status", "best val_acc", "test_acc", "epochs", "seconds"]


@pytest.fixture(scope="module")
def sweep(data_root, tmp_path_factory) -> Path:
    """A finished Hydra sweep of 4 jobs: optimizer x optimizer.lr (model.n_hidden=1 is the same in every job)."""
    folder = tmp_path_factory.mktemp("sweep")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["DNNLAB_DATA"] = str(data_root)
    result = forked.dnnlab("train", "-m", "optimizer=sgd,adam", "optimizer.lr=0.001,0.0001", "model.n_hidden=1",
                           "data.val_size=100", "trainer.epochs=2", "trainer.progress=false",
                           f"hydra.sweep.dir={folder / 'S'}", cwd=folder, env=env)
    assert result.returncode == 0, result.stderr
    return folder / "S"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def best_val_acc(run: Path) -> float:
    return max(r["val_acc"] for r in read_metrics(run / "metrics.csv"))


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4), image.shape
    assert 150 < image.shape[0] < 3000 and 300 < image.shape[1] < 3000, image.shape
    assert image[..., :3].std() > 0.01  # something is drawn


def fake_run(folder: Path, overrides: list[str] | None, val_acc: list[float] = (), summary: dict | None = None,
             hydra_choices: dict | None = None) -> Path:
    """A run folder written by hand: .hydra/overrides.yaml, metrics.csv with these val_acc per epoch, summary.json."""
    folder.mkdir(parents=True)
    if overrides is not None:
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if hydra_choices is not None:
        hydra_yaml = {"hydra": {"runtime": {"choices": hydra_choices}}}
        (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra_yaml))
    if val_acc:
        lines = [",".join(COLUMNS)]
        lines += [f"{e},{1 - a:.4f},{a:.4f},{1 - a:.4f},{a:.4f},0.001,0.5" for e, a in enumerate(val_acc, 1)]
        (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps({"status": "completed", "epochs": len(val_acc),
                                                         "train_seconds": 0.5 * len(val_acc), **summary}))
    return folder


def test_a_finished_sweep_one_row_per_run_sorted_by_val_acc(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    main([str(sweep), "--out", str(out)])
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines at the terminal's width
    assert f"dnnlab report {sweep}: 4 runs (4 completed)" in printed

    rows = read_csv(out / "report.csv")
    assert list(rows[0]) == ["run", "optimizer", "optimizer.lr", *RUN_COLUMNS]  # model.n_hidden: equal everywhere
    assert sorted(r["run"] for r in rows) == ["0", "1", "2", "3"]
    for row in rows:
        run = sweep / row["run"]
        overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        assert f"optimizer={row['optimizer']}" in overrides and f"optimizer.lr={row['optimizer.lr']}" in overrides
        summary = json.loads((run / "summary.json").read_text())
        assert row["status"] == "completed" and row["epochs"] == "2"
        assert row["best val_acc"] == f"{best_val_acc(run):.4f}"
        assert row["test_acc"] == f"{summary['test_acc']:.4f}"
        assert row["seconds"] == f"{summary['train_seconds']:.2f}"
    values = [float(r["best val_acc"]) for r in rows]
    assert values == sorted(values, reverse=True)
    for a, b in zip(rows, rows[1:]):  # ties keep the sweep's order
        assert a["best val_acc"] != b["best val_acc"] or int(a["run"]) < int(b["run"])

    md = (out / "report.md").read_text().splitlines()
    assert md[0].startswith(f"# dnnlab report {sweep}")
    assert md[2] == "| run | optimizer | optimizer.lr | status | best val_acc | test_acc | epochs | seconds |"
    assert md[4:] == ["| " + " | ".join(r.values()) + " |" for r in rows]
    assert not (out / "report_groups.csv").exists()  # nothing repeats a setting
    for name in ("val_curves.png", "final_metric.png"):
        assert_png(out / name)
    assert not list(sweep.glob("report*"))  # --out, not DIR


def test_loss_metrics_sort_ascending_and_out_defaults_to_dir(sweep, tmp_path):
    copy = shutil.copytree(sweep, tmp_path / "S")
    main([str(copy), "--metric", "val_loss"])
    rows = read_csv(copy / "report.csv")
    assert "best val_loss" in rows[0]
    values = [float(r["best val_loss"]) for r in rows]
    assert values == sorted(values)
    for row in rows:
        losses = [r["val_loss"] for r in read_metrics(copy / row["run"] / "metrics.csv")]
        assert row["best val_loss"] == f"{min(losses):.4f}"
    assert_png(copy / "final_metric.png")


def test_a_single_run_directory(sweep, tmp_path):
    result = report(sweep / "2", out=tmp_path)
    rows = read_csv(tmp_path / "report.csv")
    assert [r["run"] for r in rows] == ["2"] and list(rows[0]) == ["run", *RUN_COLUMNS]
    assert result["keys"] == [] and result["groups"] is None


def test_a_partial_sweep_is_reported_without_failing(sweep, tmp_path, capsys):
    copy = shutil.copytree(sweep, tmp_path / "S")
    (copy / "0" / "summary.json").unlink()  # still going: metrics.csv was just written
    shutil.copytree(copy / "0", copy / "4")
    os.utime(copy / "4" / "metrics.csv", (time.time() - 3600,) * 2)  # no word for an hour: crashed
    text = (copy / "1" / "summary.json").read_text()
    (copy / "1" / "summary.json").write_text(text[:len(text) // 2])  # half-written
    for item in (copy / "2").iterdir():  # only .hydra: the job has not started
        if item.name != ".hydra":
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    lines = (copy / "3" / "metrics.csv").read_text().splitlines()
    (copy / "3" / "metrics.csv").write_text("\n".join(lines[:-1] + [lines[-1][:lines[-1].index(",", 2)]]))
    shutil.copytree(sweep / "3", copy / "5")
    shutil.copytree(sweep / "3", copy / "extra" / "seed0", ignore=shutil.ignore_patterns(".hydra"))  # no Hydra

    result = report(copy)
    rows = {r["run"]: r for r in read_csv(copy / "report.csv")}
    assert {name: r["status"] for name, r in rows.items()} == {
        "0": "running", "1": "unreadable", "2": "not started", "3": "unreadable", "4": "crashed", "5": "completed",
        "extra/seed0": "completed"}
    assert rows["0"]["best val_acc"] == f"{best_val_acc(sweep / '0'):.4f}" and rows["0"]["test_acc"] == ""
    assert rows["0"]["epochs"] == "2" and float(rows["0"]["seconds"]) > 0  # from metrics.csv
    assert rows["2"]["best val_acc"] == rows["2"]["epochs"] == ""
    assert rows["extra/seed0"]["optimizer"] == ""  # found at depth 2, but nothing says its overrides
    values = [r["best val_acc"] for r in read_csv(copy / "report.csv")]
    assert values[-1] == "" and values[:-1] == sorted(values[:-1], reverse=True)  # no value: last
    printed = capsys.readouterr().out
    assert "1: cannot read summary.json (JSONDecodeError)" in printed and "3: cannot read metrics.csv" in printed
    assert {p.name for p in result["written"]} >= {"report.csv", "report.md", "val_curves.png", "final_metric.png"}
    for name in ("val_curves.png", "final_metric.png"):
        assert_png(copy / name)


def test_a_sweep_that_has_not_started(tmp_path):
    for i in range(2):
        fake_run(tmp_path / str(i), [f"optimizer.lr={i}"])
    result = report(tmp_path)
    assert [r.status for r in result["runs"]] == ["not started"] * 2
    assert not (tmp_path / "val_curves.png").exists() and not (tmp_path / "final_metric.png").exists()
    assert any("val_curves.png skipped" in n for n in result["notes"])


def test_seeds_are_grouped_with_mean_and_std(make_cfg, tmp_path):
    sweep = tmp_path / "seeds"
    for i, (opt, lr) in enumerate([("sgd", 0.0005), ("adam", 0.001)]):
        for seed in range(3):
            overrides = [f"optimizer={opt}", f"optimizer.lr={lr}", f"trainer.seed={seed}", "model.n_hidden=1"]
            run = sweep / f"{opt}" / f"seed{seed}"
            train(make_cfg(*overrides), run)
            (run / ".hydra").mkdir()
            (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    result = report(sweep, out=tmp_path / "out")

    rows = read_csv(tmp_path / "out" / "report.csv")
    assert len(rows) == 6 and list(rows[0])[:4] == ["run", "optimizer", "optimizer.lr", "trainer.seed"]
    groups = read_csv(tmp_path / "out" / "report_groups.csv")
    assert list(groups[0]) == ["optimizer", "optimizer.lr", "n", "status", "best val_acc", "test_acc", "epochs",
                               "seconds"]
    assert [g["n"] for g in groups] == ["3", "3"] and [g["status"] for g in groups] == ["3 completed"] * 2
    means = []
    for g in groups:
        runs = [sweep / g["optimizer"] / f"seed{s}" for s in range(3)]
        val = [best_val_acc(r) for r in runs]
        test = [json.loads((r / "summary.json").read_text())["test_acc"] for r in runs]
        assert g["best val_acc"] == f"{statistics.fmean(val):.4f} ± {statistics.stdev(val):.4f}"
        assert g["test_acc"] == f"{statistics.fmean(test):.4f} ± {statistics.stdev(test):.4f}"
        assert g["epochs"] == "2.0"
        means.append(statistics.fmean(val))
    assert means == sorted(means, reverse=True)
    md = (tmp_path / "out" / "report_groups.md").read_text()
    assert "mean ± standard deviation over trainer.seed" in md.splitlines()[0]
    assert [len(g.runs) for g in result["groups"]] == [3, 3]
    assert_png(tmp_path / "out" / "val_curves.png")


def test_cross_validation_folds_give_mean_and_std(tmp_path):
    accs = {"adam": [0.80, 0.82, 0.84, 0.86, 0.88], "sgd": [0.70, 0.70, 0.72, 0.74, 0.74]}
    for opt, values in accs.items():
        for fold, acc in enumerate(values):
            overrides = ["data.folds=5", f"data.fold={fold}"] + ([f"optimizer={opt}"] if opt == "sgd" else [])
            # adam is the default: its runs do not name it, their .hydra/hydra.yaml does
            fake_run(tmp_path / "cv" / f"{opt}_{fold}", overrides, [acc - 0.1, acc, acc - 0.05],
                     {"test_acc": acc - 0.01}, hydra_choices={"optimizer": opt})
    fake_run(tmp_path / "cv" / "sgd_5", ["data.folds=5", "data.fold=0", "optimizer=sgd", "trainer.seed=1"],
             [0.5, 0.6])  # a repeat still going (no summary.json)
    report(tmp_path / "cv", out=tmp_path / "out")
    groups = read_csv(tmp_path / "out" / "report_groups.csv")
    assert [g["optimizer"] for g in groups] == ["adam", "sgd"]
    assert groups[0]["n"] == "5" and groups[0]["status"] == "5 completed"
    assert groups[0]["best val_acc"] == "0.8400 ± 0.0316"  # stdev of 0.80..0.88: sqrt(0.001)
    assert groups[0]["test_acc"] == "0.8300 ± 0.0316"
    assert groups[1]["n"] == "6" and groups[1]["status"] == "5 completed, 1 running"
    sgd = accs["sgd"] + [0.6]
    assert groups[1]["best val_acc"] == f"{statistics.fmean(sgd):.4f} ± {statistics.stdev(sgd):.4f}"
    assert groups[1]["test_acc"] == f"{statistics.fmean(accs['sgd']) - 0.01:.4f} ± 0.0200"
    assert groups[0]["epochs"] == "3.0" and groups[1]["epochs"] == f"{(5 * 3 + 2) / 6:.1f}"
    title = (tmp_path / "out" / "report_groups.md").read_text().splitlines()[0]
    assert "over data.fold and trainer.seed" in title
    rows = read_csv(tmp_path / "out" / "report.csv")
    assert list(rows[0])[:4] == ["run", "data.fold", "optimizer", "trainer.seed"]  # data.folds: equal everywhere
    assert {r["optimizer"] for r in rows} == {"adam", "sgd"}  # the default filled in from hydra.yaml


def test_a_cv_of_one_setting_is_one_group(tmp_path):
    for fold, acc in enumerate([0.9, 0.8]):
        fake_run(tmp_path / str(fold), ["data.folds=2", f"data.fold={fold}"], [acc], {"test_acc": acc})
    report(tmp_path)
    assert read_csv(tmp_path / "report_groups.csv") == [
        {"group": "all runs", "n": "2", "status": "2 completed", "best val_acc": "0.8500 ± 0.0707",
         "test_acc": "0.8500 ± 0.0707", "epochs": "1.0", "seconds": "0.50"}]


def test_many_runs_keep_the_plots_legible(tmp_path, monkeypatch):
    for i in range(30):
        acc = 0.5 + 0.01 * i
        fake_run(tmp_path / str(i), [f"optimizer.lr={i / 1000}"], [acc - 0.1 + e / 500 for e in range(60)],
                 {"test_acc": acc})
    figures = {}
    real_save = report_plots.save_figure

    def spy(fig, path, **kwargs):
        figures[Path(path).name] = (fig.axes[0].get_legend(), fig.axes[0].get_yticklabels())
        real_save(fig, path, **kwargs)

    monkeypatch.setattr(report_plots, "save_figure", spy)
    report(tmp_path)
    legend = [t.get_text() for t in figures["val_curves.png"][0].get_texts()]
    assert len(legend) == MAX_LEGEND + 1 and legend[-1] == f"{30 - MAX_LEGEND} more runs"
    assert legend[0] == "optimizer.lr=0.029"  # the best first
    bars = [t.get_text() for t in figures["final_metric.png"][1]]
    assert len(bars) == 30 and bars[0] == "29: optimizer.lr=0.029"
    for name in ("val_curves.png", "final_metric.png"):
        assert_png(tmp_path / name)


def test_long_plot_labels_wrap_and_keep_the_status(tmp_path, monkeypatch):
    keys = ("optimizer.lr", "model.n_neurons", "trainer.patience", "data.val_size", "model.n_hidden")
    for i in range(3):
        fake_run(tmp_path / str(i), [f"{k}={i}" for k in keys], [0.5 + i / 10],
                 {"test_acc": 0.5, **({"status": "failed"} if i == 0 else {})})
    labels = {}
    real_save = report_plots.save_figure

    def spy(fig, path, **kwargs):
        ax = fig.axes[0]
        texts = ax.get_legend().get_texts() if ax.get_legend() else ax.get_yticklabels()
        labels[Path(path).name] = [t.get_text() for t in texts]
        real_save(fig, path, **kwargs)

    monkeypatch.setattr(report_plots, "save_figure", spy)
    report(tmp_path)
    failed = ", ".join(f"{k}=0" for k in keys) + " [failed]"
    assert labels["val_curves.png"][-1].replace("\n", " ") == failed  # every override, on lines, and the status
    assert labels["final_metric.png"][-1].replace("\n", " ") == "0: " + failed
    for label in labels["val_curves.png"] + labels["final_metric.png"]:
        assert "…" not in label and 2 <= len(label.splitlines()) and max(map(len, label.splitlines())) <= 60


def make_study(path: Path, n_trials: int) -> None:
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    study = optuna.create_study(study_name="lr_search", storage=storage, direction="maximize")
    study.optimize(lambda t: 1 - (t.suggest_float("lr", 1e-4, 1e-1, log=True) - 0.01) ** 2
                   - 0.01 * (t.suggest_categorical("optimizer", ["sgd", "adam"]) == "sgd"), n_trials=n_trials)


@pytest.fixture
def quiet_optuna():
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(level)


def test_optuna_study_history_and_importances(sweep, tmp_path, quiet_optuna):
    copy = shutil.copytree(sweep, tmp_path / "S")
    make_study(copy / "study.journal", 8)
    (copy / "optuna_study.json").write_text(json.dumps({"study_name": "lr_search", "storage": "study.journal",
                                                        "metric": "val_acc", "direction": "maximize"}))
    journal = (copy / "study.journal").read_bytes()
    style = dict(matplotlib.rcParams)
    result = report(copy, out=tmp_path / "out")
    assert dict(matplotlib.rcParams) == style  # optuna's ggplot style stays inside its own figures
    for name in ("optuna_history.png", "optuna_importances.png"):
        assert tmp_path / "out" / name in result["written"]
        assert_png(tmp_path / "out" / name)
    assert (copy / "study.journal").read_bytes() == journal  # only read
    assert sorted(p.name for p in copy.iterdir() if not p.name.isdigit()) == [
        "multirun.yaml", "optuna_study.json", "study.journal"]


def test_optuna_importances_need_two_completed_trials(tmp_path, quiet_optuna):
    fake_run(tmp_path / "S" / "0", ["optimizer.lr=0.01"], [0.5, 0.6], {"test_acc": 0.6})
    make_study(tmp_path / "elsewhere.journal", 1)
    (tmp_path / "elsewhere.journal").chmod(0o444)  # a read-only journal is read from a copy
    (tmp_path / "S" / "optuna_study.json").write_text(json.dumps({"study_name": "lr_search",
                                                                 "storage": str(tmp_path / "elsewhere.journal")}))
    result = report(tmp_path / "S")
    assert_png(tmp_path / "S" / "optuna_history.png")
    assert not (tmp_path / "S" / "optuna_importances.png").exists()
    assert any("optuna_importances.png skipped" in n and "1 completed" in n for n in result["notes"])

    (tmp_path / "S" / "optuna_study.json").write_text(json.dumps({"study_name": "other",
                                                                 "storage": str(tmp_path / "elsewhere.journal")}))
    result = report(tmp_path / "S")  # a wrong study: a note, the rest of the report stands
    assert any("no study 'other'" in n for n in result["notes"])
    (tmp_path / "S" / "optuna_study.json").write_text('{"study_name": "lr_')
    assert any("cannot open the study" in n for n in report(tmp_path / "S")["notes"])


def test_the_optuna_sweepers_trial_keys_are_not_settings(tmp_path):
    for i, seed in enumerate([0, 1, 0, 1]):
        opt = "adam" if i < 2 else "sgd"
        fake_run(tmp_path / str(i), [f"optimizer={opt}", f"trainer.seed={seed}", "++trial.study=dnnlab",
                                     f"++trial.number={i}", "++trial.metric=val_acc"], [0.5 + i / 10], {})
    result = report(tmp_path)
    assert result["keys"] == ["optimizer", "trainer.seed"]
    assert [len(g.runs) for g in result["groups"]] == [2, 2]
    assert "trial.number" not in read_csv(tmp_path / "report.csv")[0]


def test_list_overrides_reach_the_csv_and_markdown(tmp_path, capsys):
    for i, reg in enumerate(["[l2,dropout]", "[l2]"]):
        fake_run(tmp_path / str(i), [f"regularizer={reg}"], [0.5 + i / 10], {"test_acc": 0.5})
    report(tmp_path)
    assert [r["regularizer"] for r in read_csv(tmp_path / "report.csv")] == ["[l2]", "[l2,dropout]"]
    assert "| 0 | [l2,dropout] |" in (tmp_path / "report.md").read_text()


def test_list_overrides_show_in_the_terminal_table(tmp_path, capsys):
    for i, reg in enumerate(["[l2,dropout]", "[l2]"]):
        fake_run(tmp_path / str(i), [f"regularizer={reg}"], [0.5 + i / 10], {"test_acc": 0.5})
    report(tmp_path)
    assert "[l2,dropout]" in capsys.readouterr().out


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: p, lambda p: (p / "f").touch() or p / "f"],
                         ids=["missing", "empty", "a file"])
def test_no_runs_is_one_line_and_exit_2(tmp_path, capsys, make):
    with pytest.raises(SystemExit) as exit_info:
        main([str(make(tmp_path))])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(tmp_path) in err[0]


def test_the_command_line_error_has_no_traceback(tmp_path):
    result = forked.dnnlab("report", str(tmp_path / "nope"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nope'} does not exist" and "Traceback" not in result.stderr


# --- legibility at 80 columns, and in a file --------------------------------------------------------------------

EXTRA = {"model.n_neurons": "1{i}0", "model.activation": ["relu", "elu", "selu", "gelu"], "trainer.seed": "{i}",
         "regularizer": ["[l2,dropout]", "[l2]", "[dropout]", "[]"], "trainer.patience": "{i}",
         "init": ["he_normal", "glorot_uniform", "lecun_normal", "he_uniform"],
         "data.root": "/mnt/datasets/a_rather_long_folder_name_for_the_images/copy_{i}"}


@pytest.fixture
def wide_sweep(sweep, tmp_path) -> Path:
    """The real sweep with 9 differing overrides (a long data.root among them), plus a job that has not started
    and one that failed: what a sweep over many settings leaves."""
    copy = shutil.copytree(sweep, tmp_path / "S")
    for run in sorted(p for p in copy.iterdir() if p.name.isdigit()):
        i = int(run.name)
        extra = [f"{k}={v[i] if isinstance(v, list) else v.format(i=i)}" for k, v in EXTRA.items()]
        overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides + extra))
    shutil.copytree(copy / "0" / ".hydra", copy / "4" / ".hydra")  # queued: only .hydra
    shutil.copytree(copy / "1", copy / "5")
    summary = json.loads((copy / "5" / "summary.json").read_text())
    (copy / "5" / "summary.json").write_text(json.dumps({**summary, "status": "failed", "test_acc": None}))
    return copy


def narrow_rows(text: str, names: set[str]) -> dict[str, tuple[str, str]]:
    """The first table of a narrow report: {run: (its row, the overrides printed under it, on one line)}."""
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if line and set(line) == {"─"})
    rows: dict[str, list[str]] = {}
    for line in lines[rule + 1:]:
        if line.startswith("    ") and rows:
            rows[list(rows)[-1]].append(line.strip())
        elif line.split(" ", 1)[0] in names and ": " not in line:  # not the next table's title
            rows[line.split(" ", 1)[0]] = [line]
        else:
            break
    return {name: (row[0], " ".join(row[1:])) for name, row in rows.items()}


def test_the_terminal_table_is_readable_at_80_columns(wide_sweep, tmp_path, monkeypatch, capsys):
    from dnnlab import ui

    monkeypatch.setattr(ui.console, "_width", 80)  # as a terminal of 80 columns
    report(wide_sweep, out=tmp_path / "out")
    text = capsys.readouterr().out
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    lines = text.splitlines()
    header = lines[next(i for i, line in enumerate(lines) if set(line) == {"─"}) - 1]
    assert header.split() == ["run", "status", "val_acc", "test_acc", "epochs", "seconds"]  # 'best' above val_acc

    csv_rows = {r["run"]: r for r in read_csv(tmp_path / "out" / "report.csv")}
    keys = list(read_csv(tmp_path / "out" / "report.csv")[0])[1:-len(RUN_COLUMNS)]
    assert len(keys) == 2 + len(EXTRA)
    shown = narrow_rows(text, set(csv_rows))
    assert list(shown) == list(csv_rows)  # every run, in the report's order
    for name, (row, under) in shown.items():
        r = csv_rows[name]
        cells = [name, r["status"], r["best val_acc"], r["test_acc"], r["epochs"], r["seconds"]]
        assert row.split() == " ".join(cells).split(), row  # each value whole, on the run's line
        assert under == ", ".join(f"{k}={r[k]}" for k in keys)  # the differing overrides, all of them
    assert shown["4"][0].split()[1:] == ["not", "started"] and shown["5"][0].split()[1] == "failed"
    assert "data.root=/mnt/datasets/a_rather_long_folder_name_for_the_images/copy_2" in shown["2"][1]
    groups = text[text.index("settings: mean ± standard deviation over trainer.seed"):]
    assert "0.0000" in groups and "setting" not in groups.splitlines()[1]  # the groups' settings under them too


@pytest.mark.parametrize("columns", [None, "80"])
def test_a_report_piped_to_a_file_keeps_its_rows_whole(wide_sweep, tmp_path, columns):
    """Not a terminal: a row per line at the table's full width (rich alone would fit it into 80 columns), unless
    COLUMNS says otherwise."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")}
    env.update({"COLUMNS": columns} if columns else {})
    result = forked.dnnlab("report", str(wide_sweep), "--out", str(tmp_path), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    if columns:
        assert max(map(len, lines)) <= 80 and "…" not in result.stdout
        assert "data.root=/mnt/datasets/a_rather_long_folder_name_for_the_images/copy_2" in result.stdout
        return
    assert lines[0] == f"dnnlab report {wide_sweep}: 6 runs (4 completed, 1 failed, 1 not started), by best val_acc"
    header = lines[1].split("  ")
    assert [h.strip() for h in header if h.strip()] == list(read_csv(tmp_path / "report.csv")[0])
    row = next(line for line in lines if line.startswith("2 "))
    assert row.split() == list(next(r for r in read_csv(tmp_path / "report.csv") if r["run"] == "2").values())


def test_a_terminal_gets_a_table_of_its_own_width(wide_sweep, tmp_path):
    """Under a pseudo-terminal of 80 columns (no COLUMNS): the narrow table, not the file's full-width one."""
    pty = pytest.importorskip("pty")
    import fcntl
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR")}
    env["TERM"] = "xterm"
    with subprocess.Popen([sys.executable, "-m", "dnnlab", "report", str(wide_sweep), "--out", str(tmp_path)],
                          stdin=follower, stdout=follower, stderr=follower, env=env) as job:
        os.close(follower)
        output, deadline = b"", time.monotonic() + HANG_S
        while time.monotonic() < deadline:
            if not select.select([leader], [], [], 1.0)[0]:
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the job has closed the terminal
                break
            if not chunk:
                break
            output += chunk
        if job.poll() is None:
            job.kill()
        assert job.wait() == 0, output
    os.close(leader)
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", output.decode()).replace("\r", "")
    assert max(map(len, text.splitlines())) <= 80 and "…" not in text
    shown = narrow_rows(text, {"0", "1", "2", "3", "4", "5"})
    assert len(shown) == 6 and "init=glorot_uniform" in shown["1"][1]
