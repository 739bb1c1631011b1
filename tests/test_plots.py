"""learning_curves.png as a figure: the run named in the title, loss, accuracy and learning-rate panels with whole
epochs on the x axis, and the best epoch marked (checked on the Figure's artists, not on pixels)."""
from __future__ import annotations

import pytest
from matplotlib.ticker import MaxNLocator

from dnnlab.record import TITLE_LINES, TITLE_WIDTH, LearningCurves, run_title


def rows(epochs: int) -> list[dict]:
    return [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e + 0.05 * (e == 3), "train_acc": 1 - 0.3 / e,
             "val_acc": 1 - 0.4 / e, "lr": 0.01 / e} for e in range(1, epochs + 1)]


def marked(ax) -> list[float]:
    """x of the visible best-epoch lines of an axis."""
    return [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--" and line.get_visible()]


@pytest.fixture
def curves():
    figure = LearningCurves()
    yield figure
    figure.close()


def test_the_figure_names_the_run_marks_the_best_epoch_and_shows_the_rate_per_step(curves):
    steps = range(60)  # 1cycle-like: up, then down, 10 steps an epoch
    lr = ([(t + 1) / 10 for t in steps], [0.001 + 0.009 * (1 - abs(t - 30) / 30) for t in steps])
    fig = curves.draw(rows(6), title="outputs/2024-01-01/12-00-00:  fashion_mnist", lr=lr, best_epoch=4)
    assert fig.get_suptitle() == "outputs/2024-01-01/12-00-00:  fashion_mnist"
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy", "learning rate (per training step)"]
    assert [ax.get_xlabel() for ax in fig.axes] == ["epoch"] * 3
    assert [ax.get_ylabel() for ax in fig.axes] == ["cross-entropy", "accuracy", "learning rate"]
    for ax in fig.axes:
        assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator) and marked(ax) == [4]
        lo, hi = ax.get_xlim()
        assert all(t == int(t) for t in ax.get_xticks() if lo <= t <= hi)
        assert "best epoch (4)" in [t.get_text() for t in ax.get_legend().get_texts()]
    stars = [line.get_data() for ax in fig.axes[:2] for line in ax.get_lines() if line.get_marker() == "*"]
    assert [(list(x), list(y)) for x, y in stars] == [([4], [1.2 / 4]), ([4], [1 - 0.4 / 4])]
    xs, ys = fig.axes[2].get_lines()[-1].get_data()
    assert list(xs) == lr[0] and list(ys) == lr[1] and max(ys) == ys[30]
    assert fig.axes[2].get_ylim()[0] == 0  # the rate from 0, so a constant one reads as a flat line
    fig = curves.draw(rows(6), title="another run")  # reused for a run without a best epoch nor per-step rates
    assert fig.get_suptitle() == "another run" and all(marked(ax) == [] for ax in fig.axes)
    xs, ys = fig.axes[2].get_lines()[-1].get_data()  # the rows' lr column instead, a point per epoch
    assert list(xs) == [1, 2, 3, 4, 5, 6] and list(ys) == [0.01 / e for e in range(1, 7)]


def test_two_epochs_get_whole_ticks_only(curves):
    fig = curves.draw(rows(2), lr=([0.5, 1.0, 1.5, 2.0], [1e-3] * 4), best_epoch=2)
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        assert [t for t in ax.get_xticks() if lo <= t <= hi] in ([1, 2], [0, 1, 2])  # never 1.5


def test_the_title_names_the_folder_the_settings_and_the_overrides(make_cfg, tmp_path):
    run_dir = tmp_path / "multirun" / "3"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(
        "- optimizer=nadam\n- schedule=1cycle\n- hydra.run.dir=x\n- trainer.progress=false\n- trainer.seed=2\n")
    title = run_title(make_cfg("optimizer=nadam", "schedule=1cycle", "trainer.batch_size=64"), run_dir)
    first, second = title.split("\n")
    assert first == f"{tmp_path.name}/multirun/3:  fashion_mnist, NAdam lr=0.001, schedule OneCycle, batch 64"
    assert second == "optimizer=nadam schedule=1cycle trainer.seed=2"  # what changes no result: left out
    assert run_title(make_cfg(), tmp_path).count("\n") == 0  # no .hydra: the folder and settings only


def test_a_long_override_list_fills_at_most_the_title_lines(make_cfg, tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("".join(f"- trainer.seed={k}\n" for k in range(200)))
    lines = run_title(make_cfg(), tmp_path).split("\n")
    assert len(lines) == TITLE_LINES and all(len(line) <= TITLE_WIDTH for line in lines)
    assert lines[-1].endswith(" and more (.hydra/overrides.yaml)") and lines[1].startswith("trainer.seed=0 ")
