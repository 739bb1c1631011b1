"""Per-layer diagnostics: statistics equal hand computations, dead and saturated fractions on constructed inputs, the
sampling protocol, and `dnnlab diagnose` end to end (valid PNGs)."""
from __future__ import annotations

import copy
import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dnnlab.diagnose import diagnose
from dnnlab.diagnostics import COLUMNS, Diagnostics, activation_stats, hidden_layers, read_csv, settings
from dnnlab.errors import DnnlabError
from dnnlab.model import build_mlp
from dnnlab.record import read_scalars
from dnnlab.runs import compose_config

TINY = ("model.n_hidden=2", "model.n_neurons=[5,4]")


def assert_png(path) -> None:
    """A complete, decodable PNG image."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        image.load()
        assert image.size[0] > 100 and image.size[1] > 100


def on(every=2, **extra):
    return {"every": every, **extra}


class FakeWriter:
    def __init__(self):
        self.scalars, self.histograms, self.flushed = [], [], 0

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_histogram(self, tag, values, step):
        self.histograms.append((tag, tuple(values.shape), step))

    def flush(self):
        self.flushed += 1


def train_steps(model, diag, batches, lr=0.1):
    """The training loop's protocol: begin, forward, backward, before_step, step, after_step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step, (x, y) in enumerate(batches):
        diag.begin(step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        diag.before_step(step)
        opt.step()
        diag.after_step(step)


def batches(n, size=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(size, 784, generator=g) - 0.3, torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def by_hand(model, x, y, lr):
    """Forward, backward and the SGD step of a 2-hidden-layer ReLU MLP written out with matrices."""
    (w1, b1), (w2, b2), (w3, b3) = [(m.weight.detach().clone().requires_grad_(),
                                     m.bias.detach().clone().requires_grad_())
                                    for m in model.modules() if isinstance(m, nn.Linear)]
    h1 = torch.relu(x @ w1.T + b1)
    h2 = torch.relu(h1 @ w2.T + b2)
    F.cross_entropy(h2 @ w3.T + b3, y).backward()
    rows = []
    for h, w in ((h1, w1), (h2, w2)):
        h = h.detach()
        update = lr * w.grad
        rows.append({"act_mean": h.sum().item() / h.numel(),
                     "act_std": math.sqrt(((h - h.mean()) ** 2).sum().item() / (h.numel() - 1)),
                     "dead": sum(bool((h[:, j] == 0).all()) for j in range(h.shape[1])) / h.shape[1],
                     "grad_norm": math.sqrt((w.grad ** 2).sum().item()),
                     "weight_norm": math.sqrt((w.detach() ** 2).sum().item()),
                     "update_ratio": math.sqrt((update ** 2).sum().item()) / math.sqrt((w.detach() ** 2).sum().item())})
    return rows


def test_recorded_statistics_equal_the_hand_computation(make_cfg, tmp_path):
    cfg = make_cfg("activation=relu", *TINY)
    torch.manual_seed(0)
    model = build_mlp(cfg, 3)
    with torch.no_grad():  # some units of layer 1 dead for every example, so the dead fraction is not trivially 0
        model.hidden1[0].bias[:2] = -100.0
    data = batches(5)
    expected = {}
    replay = copy.deepcopy(model)
    opt = torch.optim.SGD(replay.parameters(), lr=0.1)
    for step, (x, y) in enumerate(data):
        if step % 2 == 0:
            expected[step] = by_hand(replay, x, y, 0.1)
        opt.zero_grad()
        F.cross_entropy(replay(x), y).backward()
        opt.step()
    writer = FakeWriter()
    with Diagnostics(model, on(every=2), tmp_path, writer) as diag:
        train_steps(model, diag, data)
    rows = read_csv(tmp_path / "diagnostics.csv")
    assert [(r["step"], r["layer"]) for r in rows] == [(s, f"hidden{i}") for s in (0, 2, 4) for i in (1, 2)]
    for r in rows:
        want = expected[r["step"]][int(r["layer"][-1]) - 1]
        for key, value in want.items():
            assert r[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (r["step"], r["layer"], key)
        assert math.isnan(r["saturated"])  # ReLU does not saturate
    assert rows[0]["dead"] == pytest.approx(2 / 5)
    header = (tmp_path / "diagnostics.csv").read_text().splitlines()[0]
    assert tuple(header.split(",")) == COLUMNS
    tags = {tag for tag, _, _ in writer.scalars}
    assert "diagnostics_act_std/hidden1" in tags and "diagnostics_update_ratio/hidden2" in tags
    assert not any("saturated" in tag for tag in tags)  # a statistic that does not apply is not logged
    assert {step for _, _, step in writer.scalars} == {0, 2, 4}


def test_non_sampled_steps_arm_no_hooks(make_cfg, tmp_path):
    model = build_mlp(make_cfg(*TINY), 3)
    layers = hidden_layers(model)
    with Diagnostics(model, on(every=3), tmp_path) as diag:
        diag.begin(1)
        assert all(not layer.act._forward_hooks for layer in layers)
        diag.begin(3)
        assert all(len(layer.act._forward_hooks) == 1 for layer in layers)
        model(torch.rand(4, 784))  # one-shot: the hooks remove themselves after the forward pass
        assert all(not layer.act._forward_hooks for layer in layers)
        train_steps(model, diag, batches(7))
    steps = sorted({r["step"] for r in read_csv(tmp_path / "diagnostics.csv")})
    assert steps == [0, 3, 6]


@pytest.mark.parametrize("act,outputs,expected", [
    (nn.Sigmoid(), [[0.01, 0.5, 0.97, 0.949], [0.05, 0.95, 0.2, 0.8]], 4 / 8),
    (nn.Tanh(), [[-0.95, 0.89, 0.91, 0.0], [1.0, -0.9, -0.5, 0.3]], 4 / 8),
    (nn.Hardsigmoid(), [[0.01, 0.5, 0.97, 0.949], [0.05, 0.95, 0.2, 0.8]], 4 / 8),
    (nn.Hardtanh(), [[-0.95, 0.89, 0.91, 0.0], [1.0, -0.9, -0.5, 0.3]], 4 / 8),
    (nn.Softsign(), [[-0.95, 0.89, 0.91, 0.0], [1.0, -0.9, -0.5, 0.3]], 4 / 8),
])
def test_saturated_fraction_on_constructed_outputs(act, outputs, expected):
    stats = activation_stats(torch.tensor(outputs), act, margin=0.05).tolist()
    assert stats[2] == pytest.approx(expected)
    assert stats[3] == 0.0


@pytest.mark.parametrize("act", [nn.ReLU(), nn.ELU(), nn.SELU(), nn.GELU(), nn.Softplus(), nn.PReLU()])
def test_activations_without_two_asymptotes_have_no_saturated_fraction(act):
    assert math.isnan(activation_stats(torch.tensor([[0.0, 0.99, 5.0, -0.99]]), act, margin=0.05)[2].item())


def test_saturated_fraction_through_real_activations():
    x = torch.tensor([[-10.0, -1.0, 0.0, 1.0, 10.0, 2.0, -3.0, 3.0]])  # sigmoid(±3) = 0.047 / 0.953: saturated
    assert activation_stats(torch.sigmoid(x), nn.Sigmoid(), 0.05)[2].item() == pytest.approx(4 / 8)
    assert activation_stats(torch.tanh(x / 2), nn.Tanh(), 0.05)[2].item() == pytest.approx(4 / 8)  # the same points


def test_dead_fraction_on_constructed_outputs():
    out = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.0, 0.5, 0.0, 0.0]])
    mean, std, saturated, dead = activation_stats(out, nn.ReLU(), 0.05).tolist()
    assert dead == pytest.approx(2 / 4)  # columns 0 and 3 are zero for the whole batch; 1 and 2 are alive
    assert mean == pytest.approx(out.mean().item()) and std == pytest.approx(out.std().item())
    assert math.isnan(saturated)


def test_dead_units_relu_against_leaky_relu(make_cfg, tmp_path):
    """Push every unit of layer 1 into the negative region: ReLU units are all dead, leaky ReLU units are not."""
    for name, dead in (("relu", 1.0), ("leaky_relu", 0.0)):
        model = build_mlp(make_cfg(f"activation={name}", *TINY), 3)
        with torch.no_grad():
            model.hidden1[0].bias.fill_(-1000.0)
        out = tmp_path / name
        with Diagnostics(model, on(every=1), out) as diag:
            train_steps(model, diag, batches(1), lr=0.0)
        assert read_csv(out / "diagnostics.csv")[0]["dead"] == dead


def test_saturation_of_a_sigmoid_network_with_large_weights(make_cfg, tmp_path):
    model = build_mlp(make_cfg("activation=sigmoid", "init=normal", "init.std=30", *TINY), 3)
    with Diagnostics(model, on(every=1), tmp_path) as diag:
        train_steps(model, diag, batches(1), lr=0.0)
    rows = read_csv(tmp_path / "diagnostics.csv")
    assert rows[0]["saturated"] > 0.8 and rows[0]["dead"] == 0.0
    assert rows[0]["update_ratio"] == 0.0  # lr 0: nothing moved


def test_histograms_and_kept_history(make_cfg, tmp_path):
    model = build_mlp(make_cfg(*TINY), 3)
    writer = FakeWriter()
    with Diagnostics(model, on(every=2, histograms=True), tmp_path, writer, keep=True) as diag:
        train_steps(model, diag, batches(3))
    assert [(t, s) for t, _, s in writer.histograms] == [("diagnostics_activations/hidden1", 0),
                                                         ("diagnostics_activations/hidden2", 0),
                                                         ("diagnostics_activations/hidden1", 2),
                                                         ("diagnostics_activations/hidden2", 2)]
    assert len(diag.history) == 4 and set(diag.activations) == {0, 2}
    assert diag.activations[0]["hidden1"].shape == (6, 5)


def test_a_step_without_forward_or_backward_records_nan(make_cfg, tmp_path):
    model = build_mlp(make_cfg(*TINY), 3)
    with Diagnostics(model, on(every=1), tmp_path) as diag:
        diag.begin(0)
        diag.after_step(0)  # no forward, no before_step: nothing to measure, but no crash
    row = read_csv(tmp_path / "diagnostics.csv")[0]
    assert math.isnan(row["act_std"]) and math.isnan(row["grad_norm"]) and math.isnan(row["update_ratio"])
    assert row["weight_norm"] > 0


def test_config_option_and_bad_settings(make_cfg):
    cfg = make_cfg("diagnostics=on")
    assert cfg.diagnostics.enabled is True and cfg.diagnostics.every == 100
    assert make_cfg("diagnostics=none").diagnostics.enabled is False
    assert settings(cfg.diagnostics).saturation_margin == 0.05
    for bad, key in (({"every": 0}, "diagnostics.every"), ({"saturation_margin": 0.7}, "diagnostics.saturation_margin"),
                     ({"every": "often"}, "diagnostics.every")):
        with pytest.raises(DnnlabError, match=key):
            settings(bad)


def test_a_network_without_hidden_layers_is_refused(make_cfg, tmp_path):
    with pytest.raises(DnnlabError, match="no hidden layers"):
        Diagnostics(build_mlp(make_cfg("model.n_hidden=0"), 3), on(), tmp_path)


@pytest.fixture
def diagnose_cfg(data_root, monkeypatch):
    monkeypatch.delenv("DNNLAB_DATA", raising=False)

    def make(*overrides):
        return compose_config([f"data.root={data_root}", "data.val_size=100", "trainer.progress=false",
                               "diagnose.steps=12", "diagnose.every=4", "diagnose.probe_size=64", *overrides],
                              "diagnose_app")
    return make


def test_diagnose_writes_plots_and_tables(diagnose_cfg, tmp_path):
    summary = diagnose(diagnose_cfg("activation=sigmoid", "init=normal", "model.n_hidden=3", "model.n_neurons=16"),
                       tmp_path)
    assert summary["status"] == "completed" and summary["steps"] == 12
    for name in ("activations.png", "gradients.png", "profile.png", "steps.png"):
        assert_png(tmp_path / name)
    rows = read_csv(tmp_path / "diagnostics.csv")
    assert sorted({r["step"] for r in rows}) == [0, 4, 8] and all(0 <= r["saturated"] <= 1 for r in rows)
    with open(tmp_path / "profile.csv") as f:
        profile = list(csv.DictReader(f))
    assert [(r["step"], r["layer"]) for r in profile] == [(s, f"hidden{i}") for s in ("0", "12") for i in (1, 2, 3)]
    saved = json.loads((tmp_path / "diagnose.json").read_text())
    assert len(saved["profile"]["init"]) == 3 and saved["activation"] == "Sigmoid"


def test_diagnose_leaves_the_initial_network_untouched_by_the_probe(diagnose_cfg, tmp_path):
    from dnnlab.diagnose import probe

    cfg = diagnose_cfg("norm=batchnorm", *TINY)
    model = build_mlp(cfg, 10)
    before = copy.deepcopy(model.state_dict())
    rows, acts = probe(model, torch.rand(16, 784), torch.randint(0, 10, (16,)), hidden_layers(model), 0.05)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN running stats too
    assert all(p.grad is None for p in model.parameters())
    assert [r["layer"] for r in rows] == ["hidden1", "hidden2"] and acts["hidden1"].shape == (16, 5)


def test_diagnose_of_a_deep_selu_network_keeps_unit_variance(diagnose_cfg, tmp_path):
    summary = diagnose(diagnose_cfg("activation=selu", "init=lecun_normal", "data.standardize=per_pixel",
                                    "model.n_hidden=30", "model.n_neurons=64", "diagnose.steps=0",
                                    "diagnose.probe_size=256"), tmp_path)
    stds = [r["act_std"] for r in summary["profile"]["init"]]
    assert len(stds) == 30 and all(0.7 < s < 1.3 for s in stds)
    assert_png(tmp_path / "profile.png")


def test_bad_diagnose_setting_is_one_line(diagnose_cfg, tmp_path):
    with pytest.raises(DnnlabError, match="diagnose.steps=-1"):
        diagnose(diagnose_cfg("diagnose.steps=-1"), tmp_path)


def test_resuming_drops_the_rows_of_steps_that_run_again(make_cfg, tmp_path):
    model = build_mlp(make_cfg(*TINY), 3)
    with Diagnostics(model, on(every=2), tmp_path) as diag:
        train_steps(model, diag, batches(7))  # rows for steps 0, 2, 4, 6
    with Diagnostics(model, on(every=2), tmp_path, keep_until=4) as diag:  # the checkpoint was taken at step 4
        for step in (4, 5):
            diag.begin(step)
            F.cross_entropy(model(torch.rand(3, 784)), torch.tensor([0, 1, 2])).backward()
            diag.before_step(step)
            diag.after_step(step)
    lines = (tmp_path / "diagnostics.csv").read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS) and lines.count(lines[0]) == 1
    assert [r["step"] for r in read_csv(tmp_path / "diagnostics.csv")] == [0, 0, 2, 2, 4, 4]


def test_training_with_diagnostics_on_records_every_hidden_layer(make_cfg, tmp_path):
    from dnnlab.train import train

    train(make_cfg("diagnostics=on", "diagnostics.every=5"), tmp_path)  # 16 steps per epoch, 2 epochs
    rows = list(csv.DictReader(open(tmp_path / "diagnostics.csv")))
    assert sorted({int(r["step"]) for r in rows}) == [0, 5, 10, 15, 20, 25, 30]
    assert {r["layer"] for r in rows} == {f"hidden{i}" for i in range(1, 6)}
    assert all(float(r["grad_norm"]) > 0 and float(r["update_ratio"]) > 0 for r in rows)
    # TensorBoard: by training step, beside the per-step learning rate (not among the per-epoch metrics)
    steps = [s for s, _ in read_scalars(tmp_path / "tensorboard" / "steps", "diagnostics_act_std/hidden1")]
    assert steps == [0, 5, 10, 15, 20, 25, 30]
    assert not read_scalars(tmp_path / "tensorboard", "diagnostics_act_std/hidden1")


@pytest.mark.parametrize("n_layers,grid", [(10, (4, 3)), (5, (2, 3)), (2, (1, 2))])
def test_activation_histograms_are_a_readable_labelled_grid(n_layers, grid):
    from types import SimpleNamespace

    from matplotlib.text import Text

    from dnnlab.diagnose_plots import activations_figure
    from dnnlab.record import pyplot

    torch.manual_seed(0)
    layers = [SimpleNamespace(name=f"hidden{i + 1}") for i in range(n_layers)]
    init = {layer.name: torch.randn(64, 8) for layer in layers}
    after = {layer.name: 2 * torch.randn(64, 8) + 1 for layer in layers}
    fig = activations_figure(layers, init, after, 300, max_panels=10)
    try:
        shown = [ax for ax in fig.axes if ax.axison]
        rows, cols = grid
        assert len(shown) == n_layers and len(fig.axes) == rows * cols
        assert len({round(ax.get_position().x0, 3) for ax in fig.axes}) == cols  # a grid, not a 1 x N strip
        width, height = fig.get_size_inches() * 100
        assert width <= 1300 and height >= 250 * rows
        assert fig._supxlabel.get_text().startswith("activation value") and fig._supylabel.get_text() == "density"
        assert shown[0].get_title().startswith("hidden1\nmean ") and "→" in shown[-1].get_title()
        fig.canvas.draw()  # tick labels get their text when drawn
        texts = [t for t in fig.findobj(Text) if t.get_text() and t.get_visible()]
        assert any(t.get_text() == "0" for t in texts)  # tick labels are among them
        assert min(t.get_fontsize() for t in texts) >= 9  # readable at 100 dpi
    finally:
        pyplot().close(fig)
