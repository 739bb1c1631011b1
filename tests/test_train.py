"""Training runs end to end: every option of every group trains; outputs; reproducibility; debug modes."""
from __future__ import annotations

import csv
import json
import math
import time

import pytest
import torch

from dnnlab import CONF_DIR, checkpoint
from dnnlab.errors import DnnlabError
from dnnlab.model import build_mlp
from dnnlab.record import COLUMNS, LearningCurves, Recorder, plot_learning_curves, read_scalars, run_title
from dnnlab.schedule import OneCycle
from dnnlab.train import train

GROUPS = ("init", "activation", "norm", "optimizer", "schedule", "regularizer", "data")
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]


def test_every_group_has_the_options_the_chapter_needs():
    names = {g: {o for gg, o in OPTIONS if gg == g} for g in GROUPS}
    assert names["optimizer"] == {"sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamax", "nadam", "adamw",
                                  "ftrl"}
    assert names["schedule"] == {"constant", "power", "exponential", "piecewise", "performance", "1cycle", "cosine"}
    assert {"glorot_normal", "he_avg_uniform", "lecun_normal", "normal", "constant", "orthogonal"} <= names["init"]
    assert {"leaky_relu", "prelu", "rrelu", "selu", "gelu", "swish", "mish", "softplus"} <= names["activation"]
    assert names["norm"] == {"none", "batchnorm", "input_batchnorm", "layernorm"}
    assert names["regularizer"] == {"none", "l1", "l2", "l1_l2", "dropout", "alpha_dropout", "max_norm"}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_trains(make_cfg, tmp_path, group, option):
    extra = ["schedule.boundaries=[1]", "schedule.values=[0.01,0.001]"] if option == "piecewise" else []
    summary = train(make_cfg(f"{group}={option}", *extra), tmp_path)
    assert summary["status"] == "completed", summary
    assert summary["epochs"] == 2
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["test_loss"] > 0
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]


def test_run_writes_every_output(make_cfg, tmp_path):
    summary = train(make_cfg("trainer.checkpoint_every=1"), tmp_path)
    with open(tmp_path / "metrics.csv") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = list(reader)
    assert len(rows) == 2 and all(float(r["seconds"]) > 0 for r in rows)
    saved = json.loads((tmp_path / "summary.json").read_text())
    for key in ("status", "epochs", "best_epoch", "val_acc", "test_acc", "test_loss", "train_seconds", "n_params",
                "device"):
        assert key in saved, key
    assert saved["n_params"] == 784 * 100 + 100 + 4 * (100 * 100 + 100) + 100 * 10 + 10
    assert saved == json.loads(json.dumps(summary, default=str))
    env = json.loads((tmp_path / "environment.json").read_text())
    assert env["packages"]["torch"] == torch.__version__.split("+")[0] and env["device"] == "cpu"
    assert (tmp_path / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    names = {p.name for p in (tmp_path / "checkpoints").iterdir()}
    assert names == {"last.pt", "best.pt", "final.pt", "epoch_1.pt", "epoch_2.pt"}
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert state["epoch"] == 2 and "optimizer" in state and "lr: 0.001" in state["config"]


def test_a_reused_learning_curve_figure_draws_what_a_new_one_draws(tmp_path):
    def rows(scale, epochs):
        return [{"epoch": e, "train_loss": scale / e, "val_loss": 1.2 * scale / e, "train_acc": 1 - scale / (3 * e),
                 "val_acc": 1 - scale / (2 * e)} for e in range(1, epochs + 1)]

    plot_learning_curves(rows(0.5, 6), tmp_path / "new.png")
    curves = LearningCurves()  # as a stack draws its jobs: other curves first, of other lengths and ranges
    try:
        for k, (scale, epochs) in enumerate(((30.0, 40), (0.001, 2), (0.5, 6))):
            curves.save(rows(scale, epochs), tmp_path / f"reused{k}.png")
    finally:
        curves.close()
    assert (tmp_path / "reused2.png").read_bytes() == (tmp_path / "new.png").read_bytes()
    assert (tmp_path / "reused0.png").read_bytes() != (tmp_path / "new.png").read_bytes()


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e5])
def test_learning_curve_labels_fit_the_fixed_margins(make_cfg, tmp_path, scale):
    rows = [{"epoch": e, "train_loss": scale * (1 + e / 10), "val_loss": scale * (1.5 + e / 10),
             "train_acc": 0.9999 + 1e-6 * e, "val_acc": 0.99991 + 1e-6 * e} for e in range(1, 80)]
    lr = ([t / 10 for t in range(1, 791)], [scale * 1e-3 * (1 + t % 7) for t in range(1, 791)])
    run_dir = tmp_path / ("a_long_sweep_folder_name_" * 4) / "2024-01-01" / "12-00-00"
    (run_dir / ".hydra").mkdir(parents=True)  # the widest title: a long folder, overrides over all its lines
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- model.n_neurons=[{'300,' * 9}{k}]\n"
                                                               for k in range(12)))
    title = run_title(make_cfg(), run_dir)
    assert title.count("\n") == 2
    curves = LearningCurves()
    try:
        curves.save(rows, tmp_path / "curves.png", title=title, lr=lr, best_epoch=40)
        renderer = curves.fig.canvas.get_renderer()
        width, height = curves.fig.canvas.get_width_height()
        loss_offset, acc_offset, _ = (ax.yaxis.get_offset_text().get_text() for ax in curves.axes)
        assert acc_offset and bool(loss_offset) == (scale != 1.0)  # 1e-5+9.999e-1 above the axes; 1e-4; 1e5
        boxes = [ax.get_tightbbox(renderer) for ax in curves.axes]  # every label, tick label, offset and title
        for box in boxes:
            assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, (scale, box)
        top = curves.fig._suptitle.get_window_extent(renderer)
        assert top.x0 >= 0 and top.x1 <= width and top.y1 <= height, top
        assert top.y0 >= max(box.y1 for box in boxes)  # the title clears the axes
    finally:
        curves.close()


def test_tensorboard_events_hold_the_epoch_metrics(make_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(make_cfg(), tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(COLUMNS[1:]) - {"lr"} <= set(events.Tags()["scalars"]) and "lr" not in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("val_acc")] == [1, 2]
    assert [s for s, _ in read_scalars(tmp_path / "tensorboard" / "steps", "lr")] == list(range(32))  # by step


def test_a_1cycle_run_logs_and_plots_the_rate_of_every_step(make_cfg, tmp_path, monkeypatch):
    figures, draw = [], LearningCurves.draw

    def spy(self, *args, **kwargs):
        figures.append(draw(self, *args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(LearningCurves, "draw", spy)
    summary = train(make_cfg("schedule=1cycle", "optimizer.lr=0.01", "trainer.epochs=3"), tmp_path)
    logged = read_scalars(tmp_path / "tensorboard" / "steps", "lr")
    spe, total = 16, 48  # 500 training images / 32
    assert [s for s, _ in logged] == list(range(total))
    rates = [v for _, v in logged]
    assert rates == pytest.approx([OneCycle(0.01, total, spe, max_lr=0.01).lr(t) for t in range(total)], rel=1e-6)
    peak = rates.index(max(rates))
    assert 0 < peak < total - 1 and len(set(rates)) > 2 and rates[0] < rates[peak] > rates[-1]
    assert all(a < b for a, b in zip(rates[:peak], rates[1:peak + 1]))  # rises, then falls
    assert all(a > b for a, b in zip(rates[peak:], rates[peak + 1:]))
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))  # the epoch's lr column: its last step's rate
    assert [float(r["lr"]) for r in rows] == pytest.approx([rates[spe * e - 1] for e in (1, 2, 3)], rel=1e-6)
    fig = figures[-1]
    xs, ys = fig.axes[2].get_lines()[-1].get_data()
    assert list(ys) == pytest.approx(rates, rel=1e-6) and xs[spe - 1] == 1 and xs[-1] == 3
    assert str(tmp_path.name) in fig.get_suptitle() and "OneCycle" in fig.get_suptitle()
    marked = [line.get_xdata()[0] for ax in fig.axes for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert marked == [summary["best_epoch"]] * 3


def test_the_recorder_keeps_about_100_rates_an_epoch(tmp_path):
    recorder = Recorder(tmp_path)
    recorder.log_lr(lambda t: 1e-3 * (1 + t), 1719, 2 * 1719, offset=5)  # a Fashion-MNIST epoch of batch 32
    recorder.close()
    steps = [s for s, _ in recorder.lr_steps]
    assert 90 <= len(steps) <= 101 and steps[0] == 5 + 1719 and steps[-1] == 5 + 2 * 1719 - 1
    assert len({b - a for a, b in zip(steps[:-2], steps[1:-1])}) == 1  # evenly spaced, and the last step
    logged = read_scalars(tmp_path / "tensorboard" / "steps", "lr")
    assert [s for s, _ in logged] == steps
    assert [v for _, v in logged] == pytest.approx([v for _, v in recorder.lr_steps], rel=1e-6)


def test_a_resumed_recorder_keeps_the_earlier_rates_and_replaces_the_later(tmp_path):
    def row(epoch):
        return {"epoch": epoch, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0, "val_acc": 0.5, "lr": 1.0,
                "seconds": 1.0}

    recorder = Recorder(tmp_path)
    for epoch in (1, 2):
        recorder.log_epoch(row(epoch))
        recorder.log_lr(lambda t: 1.0 + t, 16 * (epoch - 1), 16 * epoch)
    recorder.close()  # then killed before epoch 2's checkpoint: resumed from the end of epoch 1
    # by a later process: TensorBoard reads event files in name order, whole seconds first, then a counter of the
    # process's writers (a 10th writer in the same second would sort before its 9th)
    time.sleep(1 - time.time() % 1 + 0.01)
    recorder = Recorder(tmp_path, keep_epochs=1, keep_steps=16)
    assert recorder.lr_steps == [(t, 1.0 + t) for t in range(16)]
    recorder.log_epoch(row(2))
    recorder.log_lr(lambda t: 100.0 + t, 16, 32)
    recorder.close()
    expected = [(t, 1.0 + t) for t in range(16)] + [(t, 100.0 + t) for t in range(16, 32)]
    assert recorder.lr_steps == expected and read_scalars(tmp_path / "tensorboard" / "steps", "lr") == expected


def test_best_checkpoint_restores_the_best_epoch(make_cfg, tmp_path):
    summary = train(make_cfg("trainer.epochs=4"), tmp_path)
    best = checkpoint.load(tmp_path / "checkpoints" / "best.pt")
    assert best["epoch"] == summary["best_epoch"]
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert min(float(r["val_loss"]) for r in rows) == pytest.approx(summary["val_loss"])


def test_same_seed_gives_identical_metrics(make_cfg, tmp_path):
    cfg = make_cfg("regularizer=dropout", "activation=rrelu")
    a, b = train(cfg, tmp_path / "a"), train(cfg, tmp_path / "b")
    rows_a = (tmp_path / "a" / "metrics.csv").read_text().splitlines()
    rows_b = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert [r.rsplit(",", 1)[0] for r in rows_a] == [r.rsplit(",", 1)[0] for r in rows_b]  # last column: seconds
    assert a["test_acc"] == b["test_acc"] and a["test_loss"] == b["test_loss"]
    c = train(make_cfg("regularizer=dropout", "activation=rrelu", "trainer.seed=7"), tmp_path / "c")
    assert c["test_loss"] != a["test_loss"]


def test_early_stopping_stops_after_patience_epochs(make_cfg, tmp_path):
    # a learning rate of 0 never improves after the first epoch
    summary = train(make_cfg("optimizer=sgd", "optimizer.lr=1e-12", "trainer.epochs=20",
                             "trainer.early_stopping.patience=2"), tmp_path)
    assert summary["stopped_early"] and summary["epochs"] <= 4


def test_debug_smoke_limits_every_split(make_cfg, tmp_path):
    summary = train(make_cfg("debug=smoke", short=False), tmp_path)
    assert summary["epochs"] == 1
    assert summary["n_train"] == summary["n_val"] == summary["n_test"] == 3 * 32


def test_debug_overfit_drives_the_loss_to_zero(make_cfg, tmp_path):
    summary = train(make_cfg("debug=overfit", "trainer.epochs=60"), tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert summary["n_train"] == 64 and float(rows[-1]["train_loss"]) < 0.01
    assert float(rows[-1]["train_acc"]) == 1.0


def test_default_network_is_the_books_exercise(make_cfg):
    cfg = make_cfg()
    model = build_mlp(cfg, 10)
    assert list(dict(model.named_children())) == ["input", "hidden1", "hidden2", "hidden3", "hidden4", "hidden5",
                                                  "output"]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [100] * 5 + [10]
    assert sum(isinstance(m, torch.nn.ELU) for m in model.modules()) == 5
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.trainer.batch_size == 32
    assert cfg.trainer.early_stopping.monitor == "val_loss"
    assert default_choices() == {"init": "he_normal", "activation": "elu", "norm": "none", "optimizer": "adam",
                                        "schedule": "constant", "regularizer": "none", "data": "fashion_mnist"}
    assert (cfg.init.scale, cfg.init.mode, cfg.init.distribution) == (2.0, "fan_in", "normal")  # He normal
    assert make_cfg("activation=leaky_relu").activation.negative_slope == 0.2  # the book's advice, not torch's 0.01


def default_choices() -> dict:
    """The option `dnnlab train` picks in each group when none is given (Hydra's record of the defaults list)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        choices = compose("train", return_hydra_config=True).hydra.runtime.choices
    return {g: choices[g] for g in GROUPS}


def test_classes_subset_sets_the_output_width(make_cfg, tmp_path):
    summary = train(make_cfg("data.classes=[5,6,7,8,9]", "data.n_per_class=10"), tmp_path)
    assert summary["classes"] == [5, 6, 7, 8, 9] and summary["n_train"] == 50
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["model"]["output.weight"].shape == (5, 100)


def test_diverging_run_is_stopped_and_recorded(make_cfg, tmp_path):
    summary = train(make_cfg("optimizer=sgd", "optimizer.lr=1e6", "init=normal", "init.std=100",
                             "trainer.epochs=5"), tmp_path)
    assert summary["status"] == "diverged" and "loss is" in summary["reason"]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"


@pytest.mark.parametrize("override,key", [
    ("optimizer.lr=0", "optimizer.lr"),
    ("regularizer=dropout regularizer.dropout.rate=1.0", "regularizer.dropout.rate"),
    ("data.classes=[0,10]", "data.classes"),
    ("data.n_per_class=1000", "data.n_per_class"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("trainer.epochs=two", "trainer.epochs"),
    ("trainer.device=cuda:7", "trainer.device"),
    ("model.n_neurons=[300,100]", "model.n_hidden"),
    ("schedule=piecewise schedule.values=[0.1]", "schedule.values"),
    ("init._target_=os.system", "init._target_"),
])
def test_bad_values_fail_before_training(make_cfg, tmp_path, override, key):
    with pytest.raises(DnnlabError, match=key.replace(".", r"\.")) as info:
        train(make_cfg(*override.split()), tmp_path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "metrics.csv").exists()


@pytest.mark.parametrize("setting", ["trainer.precision=bf16", "trainer.deterministic=true", "trainer.threads=2",
                                     "trainer.device=cpu", "trainer.early_stopping.monitor=val_acc",
                                     "trainer.early_stopping.monitor=null"])
def test_trainer_settings_train(make_cfg, tmp_path, setting):
    summary = train(make_cfg(setting), tmp_path)
    assert summary["status"] == "completed" and summary["test_acc"] > 0.5
    if setting == "trainer.threads=2":
        assert summary["threads"] == 2


def test_test_metrics_use_the_restored_best_weights(make_cfg, tmp_path):
    from contextlib import nullcontext

    from dnnlab.data import load
    from dnnlab.bookkeeping import evaluate

    cfg = make_cfg("trainer.epochs=5", "optimizer.lr=0.02")  # a high rate makes later epochs worse at times
    summary = train(cfg, tmp_path)
    model = build_mlp(cfg, 10)
    model.load_state_dict(checkpoint.load(tmp_path / "checkpoints" / "best.pt")["model"])
    data = load(cfg.data, torch.device("cpu"))
    loss, acc = evaluate(model, data.x_test, data.y_test, nullcontext())
    assert loss == pytest.approx(summary["test_loss"], rel=1e-6) and acc == summary["test_acc"]
    assert summary["test_epoch"] == summary["best_epoch"]
    ckpts = tmp_path / "checkpoints"  # eval, latency, prune and transfer.source take the tested weights
    assert checkpoint.find(tmp_path) == ckpts / "final.pt" and (ckpts / "final.pt").samefile(ckpts / "best.pt")


def test_without_early_stopping_the_last_epoch_is_reported_and_tested(make_cfg, tmp_path):
    """As a Keras fit without callbacks: the final weights are tested, and the summary keeps the last epoch's
    validation metrics beside the best epoch's."""
    from contextlib import nullcontext

    from dnnlab.data import load
    from dnnlab.bookkeeping import evaluate

    cfg = make_cfg("trainer.epochs=5", "optimizer.lr=0.05", "trainer.early_stopping.monitor=null")
    summary = train(cfg, tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert summary["best_epoch"] < 5  # the rate makes later epochs worse: best and last differ
    assert summary["test_epoch"] == summary["epochs"] == 5
    assert summary["last_val_acc"] == pytest.approx(float(rows[-1]["val_acc"]))
    assert summary["last_train_loss"] == pytest.approx(float(rows[-1]["train_loss"]))
    best = min(rows, key=lambda r: float(r["val_loss"]))
    assert summary["best_epoch"] == int(best["epoch"]) and summary["val_acc"] == pytest.approx(float(best["val_acc"]))
    model = build_mlp(cfg, 10)
    model.load_state_dict(checkpoint.load(checkpoint.find(tmp_path))["model"])  # final.pt: the last epoch's
    data = load(cfg.data, torch.device("cpu"))
    loss, acc = evaluate(model, data.x_test, data.y_test, nullcontext())
    assert loss == pytest.approx(summary["test_loss"], rel=1e-6) and acc == summary["test_acc"]
    assert (tmp_path / "checkpoints" / "final.pt").samefile(tmp_path / "checkpoints" / "last.pt")


def test_the_task_returns_the_monitored_metric(make_cfg, tmp_path):
    from dnnlab.train import objective

    for monitor in ("val_loss", "val_acc"):
        cfg = make_cfg(f"trainer.early_stopping.monitor={monitor}")
        summary = train(cfg, tmp_path / monitor)
        assert objective(summary) == summary[monitor]
    assert math.isnan(objective({"status": "diverged", "monitor": "val_loss", "val_loss": 1.0}))  # a sweeper must not prefer it


def test_patience_zero_stops_at_the_first_epoch_without_improvement(make_cfg, tmp_path):
    summary = train(make_cfg("trainer.epochs=30", "trainer.early_stopping.patience=0", "optimizer.lr=0.05"), tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    losses = [float(r["val_loss"]) for r in rows]
    assert all(b < a for a, b in zip(losses, losses[1:-1]))  # it went on while the loss fell...
    assert summary["stopped_early"] and losses[-1] >= min(losses[:-1])  # ...and stopped at the first rise


def test_environment_records_the_command_and_versions(make_cfg, tmp_path):
    import sys

    train(make_cfg(), tmp_path)
    env = json.loads((tmp_path / "environment.json").read_text())
    assert env["argv"] == sys.orig_argv and env["python"] == sys.version.split()[0]
    assert env["git_commit"] is None or len(env["git_commit"]) == 40
    assert {"platform", "cpu_count", "torch_threads", "device", "packages"} <= set(env)


@pytest.mark.parametrize("overrides", [[], ["norm=batchnorm", "regularizer=dropout", "norm.input=true"],
                                       ["activation=prelu", "norm=layernorm"]])
def test_flat_forward_computes_what_the_network_does(make_cfg, overrides):
    from dnnlab.fast.forward import flat_forward

    model = build_mlp(make_cfg(*overrides), 10)
    model.train()
    x = torch.rand(16, 784)
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)  # the same dropout masks
    torch.testing.assert_close(flat_forward(model)(x), expected, rtol=0, atol=0)


def test_flat_forward_is_refused_where_it_would_skip_something(make_cfg):
    from dnnlab.fast.forward import flat_forward

    model = build_mlp(make_cfg(), 10)
    handle = model.hidden2[1].register_forward_hook(lambda *_: None)
    assert flat_forward(model) is None  # a hook (dnnlab's diagnostics) would not run
    handle.remove()
    assert flat_forward(model) is not None

    class Residual(torch.nn.Sequential):
        def forward(self, x):
            return x + super().forward(x)

    assert flat_forward(torch.nn.Sequential(Residual(torch.nn.Linear(4, 4)))) is None
