"""The learning-rate range test: exponential schedule, exact restoration of the weights, early stop on divergence,
the suggestion rules (the book's, fastai's steep and valley), and `dnnlab lr-find` end to end."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from dnnlab.errors import DnnlabError
from dnnlab.lr_find import lr_find, range_test, suggestions, valley_index
from dnnlab.model import build_mlp
from dnnlab.runs import compose_config
from tests.test_diagnostics import assert_png

SMALL = ("model.n_hidden=2", "model.n_neurons=16")


def toy(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.rand(n, 784, generator=g) * 0.3
    x[torch.arange(n), y * 70] += 1.0  # one bright pixel per class: learnable
    return x, y


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra", [(), ("norm=batchnorm", "regularizer=dropout")])
def test_weights_buffers_and_mode_are_restored_exactly(make_cfg, extra):
    cfg = make_cfg("optimizer=sgd", *SMALL, *extra)
    torch.manual_seed(0)
    model = build_mlp(cfg, 10)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    x, y = toy()
    result = range_test(model, x, y, cfg, batch_size=32, min_lr=1e-4, max_lr=1.0,
                        steps=20, diverge_factor=None)
    assert len(result.lrs) == 20 and result.stopped is None
    assert same_state(before, model.state_dict())  # weights and BatchNorm's running statistics
    assert not model.training and all(p.grad is None for p in model.parameters())
    np.testing.assert_allclose(result.lrs[0], 1e-4) and np.testing.assert_allclose(result.lrs[-1], 1.0)
    ratios = np.diff(np.log(result.lrs))
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-9)  # multiplied by the same factor every step


def test_the_test_really_trains_in_between(make_cfg):
    cfg = make_cfg("optimizer=sgd", *SMALL)
    torch.manual_seed(0)
    model = build_mlp(cfg, 10)
    x, y = toy()
    result = range_test(model, x, y, cfg, batch_size=32, min_lr=0.01, max_lr=0.5,
                        steps=40, diverge_factor=None)
    assert result.smoothed[-1] < result.smoothed[0]  # the loss fell: the weights did change during the test


def test_stops_when_the_smoothed_loss_diverges_and_still_restores(make_cfg):
    cfg = make_cfg("optimizer=sgd", *SMALL)
    torch.manual_seed(0)
    model = build_mlp(cfg, 10)
    before = copy.deepcopy(model.state_dict())
    x, y = toy()
    result = range_test(model, x, y, cfg, batch_size=32, min_lr=1e-3, max_lr=1e6,
                        steps=200, diverge_factor=4.0)
    assert result.stopped is not None and len(result.lrs) < 200
    finite = [s for s in result.smoothed if math.isfinite(s)]
    if "passed" in result.stopped:
        assert finite[-1] > 4 * min(finite)
    assert same_state(before, model.state_dict())


def test_stops_on_a_non_finite_loss(make_cfg):
    cfg = make_cfg("optimizer=sgd", *SMALL)
    model = build_mlp(cfg, 10)
    before = copy.deepcopy(model.state_dict())
    x, y = toy()
    result = range_test(model, x, y, cfg, batch_size=32, min_lr=1e10, max_lr=1e30,
                        steps=50, diverge_factor=None)  # no ratio test: only the non-finite loss can stop it
    assert "the loss is" in result.stopped and not math.isfinite(result.losses[-1]) and len(result.lrs) < 50
    assert same_state(before, model.state_dict())


def test_an_exception_mid_test_still_restores(make_cfg):
    cfg = make_cfg(*SMALL)
    model = build_mlp(cfg, 10)
    before = copy.deepcopy(model.state_dict())
    x, y = toy()

    def boom(step):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        range_test(model, x, y, cfg, batch_size=32, min_lr=1e-3, max_lr=1.0, steps=60,
                   progress=boom)
    assert same_state(before, model.state_dict())


def fastai_valley(lrs, losses):
    """fastai.callback.schedule.valley, transcribed (O(n^2) loops)."""
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(0, i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return float(lrs[idx])


def test_suggestion_rules_on_a_known_curve():
    rng = np.random.default_rng(0)
    lrs = np.logspace(-5, 1, 200)
    x = np.log10(lrs)
    losses = 2.3 - 1.5 / (1 + np.exp(-3 * (x + 3))) + np.exp(3 * (x + 0.5)) * 0.2 + rng.normal(0, 0.01, 200)
    found = suggestions(lrs.tolist(), losses.tolist())
    i_min = int(np.argmin(losses))
    assert found["minimum"]["lr"] == pytest.approx(lrs[i_min])
    assert found["book"]["lr"] == pytest.approx(lrs[i_min] / 10)  # the book: ~10x below the turning point
    window_lrs, window = lrs[20:-5], losses[20:-5]  # fastai: lrs[num_it // 10:-5]
    slopes = np.diff(window) / np.diff(np.log(window_lrs))
    assert found["steep"]["lr"] == pytest.approx(window_lrs[np.argmin(slopes)])
    assert 10 ** -3.6 < found["steep"]["lr"] < 10 ** -2.4  # where the sigmoid-shaped drop is steepest (1e-3)
    assert found["valley"]["lr"] == pytest.approx(fastai_valley(window_lrs, window))
    assert found["steep"]["lr"] < found["minimum"]["lr"] and found["valley"]["lr"] < found["minimum"]["lr"]


def test_valley_index_equals_fastais_loops_on_noise():
    rng = np.random.default_rng(1)
    for _ in range(5):
        losses = rng.normal(size=60).cumsum()
        start, end = valley_index(losses)
        lrs = np.arange(60, dtype=float)
        sections = (end - start) / 3
        assert lrs[start + int(sections) + int(sections / 2)] == fastai_valley(lrs, losses)


def test_suggestions_ignore_the_non_finite_tail():
    lrs = np.logspace(-4, 0, 40)
    losses = np.linspace(2.0, 0.5, 40)
    losses[30:] = np.nan
    found = suggestions(lrs.tolist(), losses.tolist())
    assert found["minimum"]["lr"] == pytest.approx(lrs[29])


def test_too_few_steps_is_one_line():
    with pytest.raises(DnnlabError, match="only 1 usable"):
        suggestions([1e-3, 1e-2], [1.0, math.nan])


@pytest.fixture
def lr_cfg(data_root, monkeypatch):
    monkeypatch.delenv("DNNLAB_DATA", raising=False)

    def make(*overrides):
        return compose_config([f"data.root={data_root}", "data.val_size=100", "trainer.progress=false", *SMALL,
                               *overrides], "lr_find_app")
    return make


def test_lr_find_command_writes_plot_table_and_suggestion(lr_cfg, tmp_path):
    summary = lr_find(lr_cfg("lr_find.max_lr=100"), tmp_path)
    assert summary["planned_steps"] == 16  # one pass over 500 training images in batches of 32
    assert 1e-5 <= summary["suggested_lr"] <= 100 and summary["rule"] == "book"
    assert summary["suggested_lr"] == pytest.approx(summary["suggestions"]["minimum"]["lr"] / 10)
    assert_png(tmp_path / "lr_find.png")
    lines = (tmp_path / "lr_find.csv").read_text().splitlines()
    assert lines[0] == "step,lr,loss,smoothed_loss" and len(lines) == summary["steps"] + 1
    assert json.loads((tmp_path / "lr_find.json").read_text())["suggested_lr"] == summary["suggested_lr"]


def test_lr_find_rule_and_steps_are_configurable(lr_cfg, tmp_path):
    summary = lr_find(lr_cfg("lr_find.rule=valley", "lr_find.steps=40", "lr_find.diverge_factor=null"), tmp_path)
    assert summary["steps"] == 40 and summary["suggested_lr"] == summary["suggestions"]["valley"]["lr"]


@pytest.mark.parametrize("override,key", [("lr_find.max_lr=1e-6", "lr_find.max_lr"),
                                          ("lr_find.rule=magic", "lr_find.rule"),
                                          ("lr_find.steps=1", "lr_find.steps"),
                                          ("lr_find.diverge_factor=0.5", "lr_find.diverge_factor")])
def test_bad_settings_are_one_line(lr_cfg, tmp_path, override, key):
    with pytest.raises(DnnlabError, match=key):
        lr_find(lr_cfg(override), tmp_path)
