"""The speed benchmark (`dnnlab bench`, scripts/bench.py) runs end to end on tiny data and writes valid reports."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dnnlab import bench_speed, bench_sweeps, bench_workers
from tests.conftest import HANG_S

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_runs_end_to_end_and_writes_json_and_markdown(data_root, tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "DNNLAB_DATA": str(data_root)}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--no-keras", "--out",
                           str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["machine"]["nproc"] == len(os.sched_getaffinity(0))
    speed = {r["contender"]: r for r in report["speed"]["rows"]}
    assert set(speed) == {"dnnlab", "DataLoader loop (torch default threads)", "arithmetic floor"}
    for row in speed.values():
        assert isinstance(row["s/epoch"], float) and row["s/epoch"] > 0, row
    assert speed["dnnlab"]["x dnnlab"] == 1.0
    assert report["speed"]["n_train"] == report["speed"]["results"]["dnnlab"][0]["n_train"] == 245
    assert "keras" in report["speed"]["notes"]  # skipped, with the reason
    rates = report["speed"]["matmul_gflops_measured"]  # at the start (all cores, one) and after the one round
    assert len(rates) == 3 and all(r > 0 for r in rates)
    assert report["speed"]["floor_seconds"] == pytest.approx(report["speed"]["flops_per_epoch"] / (max(rates) * 1e9),
                                                             rel=0.01)
    stacked = report["stacked"]["rows"]
    assert [r["jobs"] for r in stacked] == [1, 2] and stacked[1]["note"].startswith("2 jobs in one stack")
    launchers = report["launchers"]["rows"]
    assert [r["launcher"] for r in launchers] == list(bench_sweeps.LAUNCHERS) and report["launchers"]["jobs"] == 2
    assert all(isinstance(r["wall s"], float) for r in launchers), launchers
    assert launchers[0]["max val_acc gap to alone, pp"] == 0  # the basic launcher against itself
    assert launchers[1]["max val_acc gap to alone, pp"] == 0  # joblib runs each job as alone
    transfer = report["transfer"]["rows"]
    assert [r["variant"] for r in transfer] == ["frozen 5 layers, recomputed", "frozen 5 layers, cached"]
    assert transfer[1]["cache s"] > 0
    targets = {t["target"]: t for t in report["targets"]}
    assert targets["dnnlab >= 3x faster than Keras"]["met"] is None  # not measured
    assert any(t.startswith("2 stacked jobs") for t in targets)
    md = (out / "bench.md").read_text()
    for heading in ("### Training speed", "### Stacked sweeps", "### Transfer", "### Targets"):
        assert heading in md
    assert "| contender | s/epoch | images/s | peak RSS MB | x dnnlab |" in md
    for stem in ("speed", "stacked", "launchers", "transfer"):  # each table also as CSV and Markdown
        assert (out / f"{stem}.csv").is_file() and (out / f"{stem}.md").is_file()


def test_flops_per_epoch_counts_forward_and_both_gradients():
    macs = 784 * 100 + 4 * 100 * 100 + 100 * 5
    first = 784 * 100
    assert bench_speed.flops_per_epoch(1, 0) == 6 * macs - 2 * first  # no input gradient for the images
    assert bench_speed.flops_per_epoch(0, 1) == 2 * macs
    assert 15e9 < bench_speed.flops_per_epoch(27457, 2543) < 17e9


def test_the_peers_train_on_the_same_images_as_dnnlab(data_root, monkeypatch):
    from dnnlab.data import load
    from dnnlab.runs import compose_config

    monkeypatch.delenv("DNNLAB_DATA", raising=False)
    cfg = compose_config([f"data.root={data_root}", "data.classes=[0,1,2,3,4]", "data.val_size=100"])
    data = load(cfg.data, torch.device("cpu"))
    x, y = bench_workers.read_raw(bench_workers.fashion_folder(data_root), "train")
    train, val = bench_workers.split_indices(y, 100)
    assert np.array_equal(y[train], data.y_train.numpy()) and np.array_equal(y[val], data.y_val.numpy())
    assert torch.equal(torch.from_numpy(x[train].astype(np.float32) / 255), data.x_train)


def test_torchvision_reads_the_decompressed_copy(data_root, tmp_path):
    from torchvision import datasets

    root = bench_speed.torchvision_root(data_root, tmp_path)
    dataset = datasets.FashionMNIST(str(root), train=True, download=False)
    assert len(dataset) == 600


@pytest.mark.skipif(bench_speed.keras_python(type("A", (), {"no_keras": False, "keras_python": None})()) is None,
                    reason="no Python with Keras here (see dnnlab bench --help)")
def test_keras_worker_trains_the_same_network(data_root):
    python = bench_speed.keras_python(type("A", (), {"no_keras": False, "keras_python": None})())
    result = bench_workers.spawn(python, "keras", ["--data-root", str(data_root), "--val-size", "100", "--epochs", "2"],
                                 timeout=HANG_S)
    assert "error" not in result, result
    assert len(result["epoch_seconds"]) == 2 and result["n_train"] == 245 and result["peak_rss_mb"] > 0


def test_a_speed_table_fits_80_columns_with_its_notes_under_the_rows(tmp_path, monkeypatch, capsys):
    from dnnlab import ui
    from dnnlab.runs import write_table

    note = "exit 1: ImportError: No module named 'keras' | the worker stopped before its first epoch"
    rows = [{"contender": name, "s/epoch": s, "images/s": "" if s == "failed" else 12345, "peak RSS MB": 612,
             "x dnnlab": 1.0, "val acc": 0.8712, "threads": 2, "note": text}
            for name, s, text in [("dnnlab", 1.234, ""), ("keras", "failed", note),
                                  ("plain PyTorch DataLoader", 2.345, "torch.utils.data, batch sampler")]]
    monkeypatch.setattr(ui.console, "_width", 80)  # as a terminal of 80 columns
    write_table(rows, tmp_path / "speed", "Seconds per epoch", ["note"], [r["note"] for r in rows])
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 80 and not any("…" in line for line in lines)
    keras = next(i for i, line in enumerate(lines) if line.startswith("keras "))
    assert lines[keras].split() == ["keras", "failed", "612", "1.0", "0.8712", "2"]
    assert " ".join(line.strip() for line in lines[keras + 1:keras + 3]) == note  # under its row, whole
    assert "note" in (tmp_path / "speed.csv").read_text().splitlines()[0]  # the files keep the column
