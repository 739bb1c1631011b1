"""Rerun every number chapter 11's notebooks print, with each notebook's own setup, and set dnnlab's beside it.

    dnnlab reproduce [--list] [--only ID ...] [--seeds N | --seeds 7,8,9] [--out DIR] [-o key=value ...]

A row is one printed number: its id (the preset conf/experiment/<id>.yaml that runs the cell's setup, with
":what" where one run gives several numbers), the edition, the notebook cell that prints it, the metric and the
number as printed. Every seed of every row is one `dnnlab train` job; they run as Hydra multiruns through the
joblib launcher, two at a time (task B's jobs after task A's, each on the task-A run of its own seed). Finished
runs are not trained again, so an interrupted report resumes. Writes REPRODUCTION.csv, REPRODUCTION.md and
reproduction.png into --out. The verdict compares the book's number with dnnlab's seeds: "matches" inside the
95 % prediction interval of one more seed (the "interval" column: mean +- t * std * sqrt(1 + 1/n), never narrower
than +-0.5 points), else "better" or "worse"; "range" says whether the book's number is inside the seeds' range,
above or below it. "setting" sums up the run's resolved config; "keras" is the mean of
scripts/keras_reference/run.py's Keras twins of the same runs, where they were made. Rows the notebooks print but
dnnlab cannot rerun say why.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from dnnlab import extras, stored
from dnnlab.errors import ArgumentParser, DnnlabError, bad_value
from dnnlab.record import pyplot, save_figure
from dnnlab.runs import mean_spread, write_table

NOTEBOOKS = {"ed1": "handson-ml/11_deep_learning.ipynb", "ed2": "handson-ml2/11_training_deep_neural_networks.ipynb",
             "ed3": "handson-ml3/11_training_deep_neural_networks.ipynb"}


@dataclass(frozen=True)
class Row:
    id: str               # "ed3/adam", or "ed3/dropout:test" where one run prints several numbers
    cell: int             # the notebook cell (0-based index into its cells) that prints the number
    metric: str           # a summary.json key, or eval:SPLIT (the restored network on SPLIT) or mc:N (MC dropout)
    book: str             # the number exactly as the notebook prints it ("0.8396", "97.26%")
    needs: str = ""       # a preset whose run of the same seed is this one's transfer.source
    skip: str = ""        # why dnnlab does not rerun it

    @property
    def preset(self) -> str:
        return self.id.split(":")[0]

    @property
    def edition(self) -> str:
        return self.id.split("/")[0]

    @property
    def book_value(self) -> float:
        return float(self.book[:-1]) / 100 if self.book.endswith("%") else float(self.book)


LAST, TEST = "last_val_acc", "test_acc"
CIFAR10 = "exercise 8 trains on CIFAR-10 (32 x 32 colour images), which dnnlab does not load"
ROWS = [
    Row("ed1/leaky_relu", 33, LAST, "0.9788"),
    Row("ed1/selu", 53, LAST, "0.97", skip="the notebook's selu() swaps its two constants (slope 1.6733 for z >= 0, "
                                          "cell 48); dnnlab's SELU is the real one"),
    Row("ed1/batch_norm", 64, LAST, "0.9742", skip="batch norm on the output logits too; dnnlab normalises hidden "
                                                  "layers only"),
    Row("ed1/gradient_clipping", 80, LAST, "0.9612"),
    Row("ed1/restore_and_continue", 102, LAST, "0.9712", skip="trains cell 80's whole network on, its output layer "
                                                             "included; dnnlab's transfer starts a new output layer"),
    Row("ed1/reuse_three_layers", 110, LAST, "0.9678", needs="ed1/gradient_clipping"),
    Row("ed1/reuse_three_layers:python", 114, LAST, "0.9678", needs="ed1/gradient_clipping"),
    Row("ed1/freeze_two_of_three", 130, LAST, "0.9602", skip="freezes the lower two of three reused layers; dnnlab "
                                                            "freezes every reused layer or none"),
    Row("ed1/freeze_two_of_three:cached", 139, LAST, "0.958",
        skip="the same partial freeze as ed1/freeze_two_of_three"),
    Row("ed1/lr_schedule", 155, LAST, "0.982"),
    Row("ed1/l1_one_hidden", 164, LAST, "0.9052"),
    Row("ed1/l1", 174, LAST, "0.9214"),
    Row("ed1/dropout", 180, LAST, "0.972"),
    Row("ed1/max_norm", 192, LAST, "0.9844", skip="tf.clip_by_norm(W, 1, axes=1) bounds each input unit's outgoing "
                                                 "weights; dnnlab's max-norm (Keras') each unit's incoming weights"),
    Row("ed1/ex8", 217, TEST, "97.26%"),
    Row("ed1/ex8_tuned", 230, TEST, "0.9891029383148473"),
    Row("ed1/ex8_rerun", 240, TEST, "0.9898812998637867"),
    Row("ed1/ex8_rerun:train", 253, "eval:train", "0.9950781082816178"),
    Row("ed1/ex8_batchnorm", 244, TEST, "0.9941622883829538"),
    Row("ed1/ex8_batchnorm_search", 248, TEST, "0.9949406499318934",
        skip="the best of a 50-candidate search (160 neurons, batch 10: about an hour a seed here)"),
    Row("ed1/ex8_dropout", 258, TEST, "0.9861840825063242",
        skip="dropout on each hidden layer's input (the pixels and hidden 1-4, not hidden 5's output); dnnlab drops "
             "after the top k layers"),
    Row("ed1/ex9_frozen", 281, TEST, "64.02%", skip="the new head starts from the source's trained output layer (the "
                                                   "cell restores every variable after init); dnnlab starts a new one"),
    Row("ed1/ex9_cached", 288, TEST, "61.16%", skip="the same restored head as ed1/ex9_frozen"),
    Row("ed1/ex9_four_layers", 296, TEST, "69.10%", needs="ed1/ex8_tuned"),
    Row("ed1/ex9_unfrozen", 301, TEST, "78.09%", needs="ed1/ex8_tuned"),
    Row("ed1/ex9_all_unfrozen", 304, TEST, "91.34%", skip="a third phase (everything unfrozen after ed1/ex9_unfrozen); "
                                                          "dnnlab's transfer has two"),
    Row("ed1/ex9_scratch", 307, TEST, "0.8481793869574161"),
    Row("ed1/ex10_pretrain", 356, "same-digit test accuracy", "0.9765",
        skip="two separate (unshared) 5 x 100 stacks; dnnlab's same_digit pretraining shares one"),
    Row("ed1/ex10_transfer", 362, TEST, "0.9654", skip="reuses ed1/ex10_pretrain's unshared stack"),
    Row("ed1/ex10_scratch", 365, TEST, "0.9458"),
    Row("ed2/leaky_relu", 23, LAST, "0.8396"),
    Row("ed2/prelu", 27, LAST, "0.8398"),
    Row("ed2/selu_100_layers", 48, LAST, "0.8218"),
    Row("ed2/relu_100_layers", 53, LAST, "0.7380"),
    Row("ed2/bn_after", 61, LAST, "0.8750"),
    Row("ed2/bn_before", 65, LAST, "0.8660"),
    Row("ed2/task_a", 81, LAST, "0.9200"),
    Row("ed2/task_b_scratch", 85, LAST, "0.9716"),
    Row("ed2/task_b_scratch:test", 93, TEST, "0.9705"),
    Row("ed2/task_b_on_a", 91, LAST, "0.9878", needs="ed2/task_a"),
    Row("ed2/task_b_on_a:test", 94, TEST, "0.9940", needs="ed2/task_a"),
    Row("ed2/power", 117, LAST, "0.8924"),
    Row("ed2/exponential_by_epoch", 124, LAST, "0.8928"),
    Row("ed2/exponential_by_step", 129, LAST, "0.8880"),
    Row("ed2/piecewise", 135, LAST, "0.8868"),
    Row("ed2/performance", 139, LAST, "0.8936"),
    Row("ed2/exponential", 142, LAST, "0.8904"),
    Row("ed2/lr_finder", 149, "mean loss of the sweep", "nan", skip="the mean training loss over a sweep of rates up "
                                                                   "to 10 (it diverges: nan); no number to compare"),
    Row("ed2/1cycle", 151, LAST, "0.8934"),
    Row("ed2/l2", 155, LAST, "0.8376"),
    Row("ed2/l2:partial", 156, LAST, "0.8382"),
    Row("ed2/dropout", 158, LAST, "0.8722"),
    Row("ed2/alpha_dropout", 161, LAST, "0.8760"),
    Row("ed2/alpha_dropout:test", 162, TEST, "0.8639"),
    Row("ed2/alpha_dropout:train", 163, "eval:train", "0.8840"),
    Row("ed2/mc_dropout", 173, "mc:100", "0.8661"),
    Row("ed2/max_norm", 184, LAST, "0.8662"),
    *[Row(f"ed2/ex8_cifar10_{name}", cell, metric, book, skip=CIFAR10) for name, cell, metric, book in (
        ("elu", 202, "val_acc", "0.47620001435279846"), ("batchnorm", 206, "val_acc", "0.5397999882698059"),
        ("selu", 210, "val_acc", "0.47920000553131104"), ("alpha_dropout", 213, "val_acc", "0.48899999260902405"),
        ("mc_dropout", 222, "mc:10", "0.4892"), ("1cycle", 228, LAST, "0.5198"))],
    Row("ed3/selu_100_layers", 37, LAST, "0.8046"),
    Row("ed3/relu_100_layers", 42, LAST, "0.7054"),
    Row("ed3/bn_after", 51, LAST, "0.8650"),
    Row("ed3/bn_before", 55, LAST, "0.8646"),
    Row("ed3/task_a", 63, LAST, "0.9027"),
    Row("ed3/task_b_scratch", 64, TEST, "0.9185"),
    Row("ed3/task_b_on_a", 74, TEST, "0.9385", needs="ed3/task_a"),
    Row("ed3/sgd", 80, LAST, "0.8672"),
    Row("ed3/momentum", 83, LAST, "0.8672"),
    Row("ed3/nesterov", 86, LAST, "0.8708"),
    Row("ed3/adagrad", 89, LAST, "0.8424"),
    Row("ed3/rmsprop", 92, LAST, "0.8636"),
    Row("ed3/adam", 95, LAST, "0.8696"),
    Row("ed3/adamax", 98, LAST, "0.8780"),
    Row("ed3/nadam", 101, LAST, "0.8740"),
    Row("ed3/adamw", 105, LAST, "0.8702"),
    Row("ed3/power", 113, LAST, "0.8714"),
    Row("ed3/exponential", 118, LAST, "0.8662"),
    Row("ed3/exponential_by_epoch", 124, LAST, "0.8812"),
    Row("ed3/exponential_by_step", 130, LAST, "0.8802"),
    Row("ed3/piecewise", 133, LAST, "0.8716"),
    Row("ed3/piecewise_nadam", 138, LAST, "0.8770"),
    Row("ed3/performance", 143, LAST, "0.8868"),
    Row("ed3/lr_finder", 155, "mean loss of the sweep", "1.7725",
        skip="the mean training loss over a sweep of rates from 1e-4 to 1 (mostly diverged); dnnlab lr-find "
             "reports the curve and a suggested rate instead"),
    Row("ed3/1cycle", 160, LAST, "0.8920"),
    Row("ed3/l2", 167, LAST, "0.8182"),
    Row("ed3/dropout", 171, LAST, "0.8732"),
    Row("ed3/dropout:train", 173, "eval:train", "0.8849"),
    Row("ed3/dropout:test", 174, TEST, "0.8700"),
    Row("ed3/dropout:mc", 182, "mc:100", "0.8717"),
    Row("ed3/max_norm", 190, LAST, "0.8578"),
    *[Row(f"ed3/ex8_cifar10_{name}", cell, metric, book, skip=CIFAR10) for name, cell, metric, book in (
        ("swish", 208, "val_acc", "0.4675999879837036"), ("batchnorm", 212, "val_acc", "0.5073999762535095"),
        ("selu", 215, "val_acc", "0.5026000142097473"), ("alpha_dropout", 220, "val_acc", "0.498199999332428"),
        ("mc_dropout", 229, "mc:10", "0.4984"), ("1cycle", 235, LAST, "0.5242"))],
]
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]  # t(0.975, df = 1..10)


def matches(row: Row, key: str) -> bool:
    """--only KEY: a row's id or preset (ed3/dropout: all four of its numbers), or their start up to a / or _
    (ed2: the 2nd edition; ed1/ex9: exercise 9's rows)."""
    return key in (row.id, row.preset) or row.id.startswith((key + "/", key + "_"))


def pick_rows(only: list[str] | None) -> list[Row]:
    for key in only or []:
        if not any(matches(r, key) for r in ROWS):
            raise bad_value("--only", key, "a row id or its start, such as ed3, ed3/adam or ed3/dropout:mc "
                                           "(dnnlab reproduce --list shows them)")
    return [r for r in ROWS if not only or any(matches(r, key) for key in only)]


def parse_seeds(text: str) -> list[int]:
    """--seeds 3 (seeds 0, 1, 2) or --seeds 7,8,9."""
    try:
        seeds = list(range(int(text))) if "," not in text else [int(s) for s in text.split(",")]
    except ValueError:
        raise bad_value("--seeds", text, "a count such as 3, or seeds such as 7,8,9") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise bad_value("--seeds", text, "a count >= 1, or distinct seeds >= 0")
    return seeds


def run_dir(out: Path, preset: str, seed: int) -> Path:
    return out / "runs" / preset / f"seed{seed}"


def finished(path: Path, name: str = "summary.json") -> dict | None:
    """The summary of a run that completed (so it is not trained again)."""
    try:
        summary = json.loads((path / name).read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("status", "completed") == "completed" else None


def multirun(presets: list[str], seeds: list[int], out: Path, extra: list[str], needs: str = "") -> None:
    """Train presets x seeds as one Hydra multirun on the joblib launcher, each job in its row's folder."""
    extras.need("dnnlab reproduce (its jobs run on the joblib launcher)", *extras.OPTIONS["hydra/launcher/joblib"])
    source = [f"transfer.source={out.resolve() / 'runs' / needs}/seed${{trainer.seed}}"] if needs else []
    command = [sys.executable, "-m", "dnnlab", "train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
               f"experiment={','.join(presets)}", f"trainer.seed={','.join(map(str, seeds))}",
               "data.seed=${trainer.seed}", f"hydra.sweep.dir={out.resolve() / 'runs'}",
               "hydra.sweep.subdir=${hydra.runtime.choices.experiment}/seed${trainer.seed}",
               "trainer.progress=false", *source, *extra]
    result = subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode not in (0, 1):  # 1: some job failed; its row says so
        raise DnnlabError(f"dnnlab train -m ended with exit status {result.returncode}: {' '.join(command)}")


def train_missing(rows: list[Row], seeds: list[int], out: Path, extra: list[str]) -> None:
    """Every run the rows need and do not have yet: sources first, then the rows that reuse them."""
    wanted = {r.preset: r.needs for r in rows if not r.skip}
    for preset, needs in list(wanted.items()):
        if needs:
            wanted.setdefault(needs, "")
    for level in ("", "needs"):
        groups: dict[tuple[str, tuple[int, ...]], list[str]] = {}
        for preset, needs in wanted.items():
            if bool(needs) != bool(level):
                continue
            missing = tuple(s for s in seeds if not finished(run_dir(out, preset, s)))
            if missing:
                groups.setdefault((needs, missing), []).append(preset)
        for (needs, missing), presets in groups.items():
            multirun(presets, list(missing), out, extra, needs)


def measure(row: Row, out: Path, seed: int) -> tuple[float | None, float | None]:
    """(the row's number, train seconds) for one seed's run; None where the run did not complete."""
    path = run_dir(out, row.preset, seed)
    summary = finished(path)
    if summary is None:
        return None, None
    seconds = summary.get("train_seconds")
    if row.metric.startswith(("eval:", "mc:")):
        from dnnlab.evaluation import evaluate_run

        kind, arg = row.metric.split(":")
        split, samples = (arg, 0) if kind == "eval" else ("test", int(arg))
        folder = path / f"eval_{row.metric.replace(':', '')}"
        result = finished(folder, "eval.json") or evaluate_run(path, out=folder, split_name=split,
                                                               mc_samples=samples, quiet=True)
        return (result["mc"]["accuracy"] if samples else result["accuracy"]), seconds
    value = summary.get(row.metric)
    return (None if value is None or math.isnan(value) else float(value)), seconds


def interval(values: list[float]) -> float:
    """Half the width of the 95 % prediction interval of one more seed, mean +- t * std * sqrt(1 + 1/n), never
    under half a point."""
    n, std = len(values), mean_spread(values)[1]
    t = T95[n - 2] if n - 2 < len(T95) else 1.96
    return max(t * std * math.sqrt(1 + 1 / n), 0.005)


def verdict(values: list[float], book: float) -> str:
    """matches: the book's number is where one more seed could land; else better or worse."""
    if len(values) < 2:
        return "one seed: not compared"
    mean = mean_spread(values)[0]
    if abs(book - mean) <= interval(values):
        return "matches"
    return "better" if mean > book else "worse"


def keras_twin(row: Row, out: Path, seeds: list[int]) -> str:
    """The mean over seeds of scripts/keras_reference/run.py's number for this row, where it ran."""
    found = [finished(run_dir(out, row.preset, s), "keras.json") for s in seeds]
    values = [f[row.metric] for f in found if f and row.metric in f]
    return f"{sum(values) / len(values):.4f} ({len(values)})" if values else ""


def setting(path: Path) -> str:
    """The run's setup in a few words, from its resolved config (so it cannot drift from the preset)."""
    from omegaconf import OmegaConf

    try:
        c = OmegaConf.create(stored.read_mapping(path / ".hydra" / "config.yaml"))
    except (OSError, DnnlabError):
        return ""
    d, m, o, t = c.data, c.model, c.optimizer, c.trainer
    widths = list(m.n_neurons) if OmegaConf.is_list(m.n_neurons) else [m.n_neurons] * m.n_hidden
    net = "-".join(map(str, widths)) if len(set(widths)) > 1 and len(widths) < 8 else \
        f"{len(widths)} x {widths[-1]}" + (f" (first {widths[0]})" if widths[0] != widths[-1] else "")
    init = {1.0: "LeCun" if c.init.mode == "fan_in" else "Glorot", 2.0: "He"}.get(c.init.scale, "scaled")
    words = [f"{d.name} ({'first' if d.val_from == 'first' else 'last'} {d.val_size} validate"
             + (", standardized" if d.standardize != "none" else "") + (f", {d.n_train} train" if d.n_train else "")
             + (f", {d.n_per_class}/class" if d.n_per_class else "") + ")",
             f"{net} {c.activation._target_.split('.')[-1]} {init} {c.init.distribution}"
             + (f", BN {c.norm.position}" + (" + input" if c.norm.input else "") if c.norm.kind == "batch" else ""),
             f"{o._target_.split('.')[-1]} {o.lr:g}" + (f" momentum {o.momentum:g}" if o.get("momentum") else ""),
             c.schedule._target_.split(".")[-1].lower(),
             *(f"{k} {v}" if not OmegaConf.is_dict(v) else f"{k} {v.rate}" + (" + input" if v.input else "")
               for k, v in c.regularizer.items()),
             f"batch {t.batch_size}, {t.epochs} epochs"
             + (f", early stopping patience {t.early_stopping.patience}" if t.early_stopping.monitor else "")]
    if c.transfer.get("reuse_layers") is not None:
        frozen = f" {c.transfer.frozen_epochs} epochs" if c.transfer.frozen_epochs and c.transfer.unfreeze_top else ""
        words.append(f"reuse {c.transfer.reuse_layers} layers" + (" frozen" + frozen if c.transfer.freeze else "")
                     + (f", then unfreeze {c.transfer.unfreeze_top}" if c.transfer.unfreeze_top else ""))
    return "; ".join(words)


def table_row(row: Row, out: Path, seeds: list[int]) -> dict:
    line = {"id": row.id, "edition": row.edition, "cell": row.cell, "metric": row.metric, "book": row.book,
            "mean": "", "std": "", "seeds": 0, "verdict": f"not rerun: {row.skip}", "interval": "", "range": "",
            "train s": "",
            "keras": "", "setting": ""}
    if row.skip:
        return line
    found = [measure(row, out, s) for s in seeds]
    values = [v for v, _ in found if v is not None]
    seconds = [s for _, s in found if s is not None]
    line["setting"] = setting(run_dir(out, row.preset, seeds[0]))
    if not values:
        return {**line, "verdict": "no completed run"}
    mean, std = mean_spread(values)
    return {**line, "mean": f"{mean:.4f}", "std": f"{std:.4f}", "seeds": len(values),
            "verdict": verdict(values, row.book_value), "interval": f"{interval(values):.4f}" if len(values) > 1 else "",
            "range": "inside" if min(values) <= row.book_value <= max(values) else
                     "above" if row.book_value > max(values) else "below",
            "train s": f"{mean_spread(seconds)[0]:.0f}" if seconds else "", "keras": keras_twin(row, out, seeds)}


def list_rows() -> None:
    """One line per row: id, edition, notebook cell, metric, the book's value as printed (and why not rerun)."""
    for r in ROWS:
        print(f"{r.id:34} {r.edition} {NOTEBOOKS[r.edition]} cell {r.cell:<4} {r.metric:13} {r.book}"
              + (f"  (not rerun: {r.skip})" if r.skip else ""))


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="dnnlab reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    parser.add_argument("--only", nargs="+", metavar="ID", help="rows by id or its start: ed2, ed3/adam, ed1/ex9")
    parser.add_argument("--seeds", default="3", type=parse_seeds, help="a count (3: seeds 0,1,2) or seeds: 7,8,9")
    parser.add_argument("--out", type=Path, default=Path("outputs/reproduce"))
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra override for every job (a test's tiny data, say)")
    args = parser.parse_args(argv)
    if args.list:
        return list_rows()
    rows = pick_rows(args.only)
    train_missing(rows, args.seeds, args.out, args.override)
    results = [(r, table_row(r, args.out, args.seeds)) for r in rows]
    table = [t for _, t in results]
    write_table(table, args.out / "REPRODUCTION", f"Chapter 11's printed numbers rerun by dnnlab "
                                                  f"(seeds {','.join(map(str, args.seeds))})")
    plot_comparison([(r, t) for r, t in results if t["mean"]], args.out / "reproduction.png")


def plot_comparison(results: list[tuple[Row, dict]], path: Path) -> None:
    """dnnlab's mean minus the book's number, in points, one line per row, with the prediction interval of one
    more seed as the error bar: a bar that crosses 0 is a match."""
    if not results:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.2 * len(results) + 1.4))
    ys = list(range(len(results)))
    gaps = [100 * (float(t["mean"]) - r.book_value) for r, t in results]
    bars = [100 * float(t["interval"] or 0) for _, t in results]
    colours = ["tab:blue" if t["verdict"] == "matches" else "tab:red" for _, t in results]
    ax.errorbar(gaps, ys, xerr=bars, fmt="none", ecolor="0.6", elinewidth=1)
    ax.scatter(gaps, ys, c=colours, s=14, zorder=3)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlim(-8, 8)  # the 100-layer and exercise-9 rows' intervals run far wider; their points stay inside
    ax.set_yticks(ys, [t["id"] for _, t in results], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("dnnlab's mean - the book's number (points; bars: 95 % prediction interval of one more seed, "
                  "cut at 8)", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
