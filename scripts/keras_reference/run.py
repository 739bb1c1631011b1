"""Train the Keras twin of finished dnnlab runs: the same setup from each run's .hydra/config.yaml, in Keras.

    python scripts/keras_reference/run.py RUN_DIR [RUN_DIR ...]     (in a venv with tensorflow and pyyaml)

For a row of `dnnlab reproduce` that misses the book, this tells a miss of dnnlab from a miss of the setup or of
seed-to-seed noise: Keras (the notebooks' library) is given the run's data split, network, initialisation,
optimizer, schedule, regularizer, epochs, batch size and seed (keras.utils.set_random_seed), and its numbers go to
RUN_DIR/keras.json (last_val_acc, test_acc), which `dnnlab reproduce` shows in its "keras" column. Transfer runs
(task B on task A) and MC dropout are not covered. Runs outside dnnlab: it reads the config as plain YAML.
"""
from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path

import keras
import numpy as np
import yaml

FILES = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}


def idx(path: Path) -> np.ndarray:
    data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def splits(d: dict) -> dict:
    """The run's train / val / test arrays, split, filtered, cut and scaled as dnnlab's data.load does."""
    folder = Path(d["root"] or os.environ["DNNLAB_DATA"]) / FILES[d["name"]] / "raw"
    read = lambda stem: idx(next(folder.glob(stem + "*")))  # noqa: E731
    x, y = read("train-images").reshape(-1, 784) / 255.0, read("train-labels").astype(np.int64)
    xt, yt = read("t10k-images").reshape(-1, 784) / 255.0, read("t10k-labels").astype(np.int64)
    n = d["val_size"]
    val, train = (slice(0, n), slice(n, None)) if d["val_from"] == "first" else (slice(-n, None), slice(0, -n))
    parts = {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (xt, yt)}
    if d["classes"] is not None or d["n_per_class"] is not None:
        if d["n_per_class"] is not None:
            raise SystemExit("n_per_class is not covered by the Keras twin")
        relabel = {c: i for i, c in enumerate(d["classes"])}
        parts = {k: (a[np.isin(b, d["classes"])], np.array([relabel[c] for c in b if c in relabel]))
                 for k, (a, b) in parts.items()}
    if d.get("n_train"):
        parts["train"] = tuple(a[:d["n_train"]] for a in parts["train"])
    if d["standardize"] != "none":
        axis = None if d["standardize"] == "global" else 0
        mean, std = parts["train"][0].mean(axis), parts["train"][0].std(axis)
        std = np.where(std < 1e-6, 1.0, std)
        parts = {k: ((a - mean) / std, b) for k, (a, b) in parts.items()}
    return parts


def activation(a: dict):
    name = a["_target_"].split(".")[-1]
    if name == "LeakyReLU":
        return keras.layers.LeakyReLU(negative_slope=a.get("negative_slope", 0.01))
    if name == "PReLU":
        return keras.layers.PReLU(alpha_initializer=keras.initializers.Constant(a.get("init", 0.25)))
    return keras.layers.Activation(name.lower())


def network(cfg: dict, n_classes: int) -> keras.Sequential:
    """Flatten [-> BN] [-> dropout] -> hidden layers (Dense -> [BN] -> act -> [BN] [-> dropout]) -> softmax."""
    m, i, norm, reg = cfg["model"], cfg["init"], cfg["norm"], cfg["regularizer"] or {}
    widths = m["n_neurons"] if isinstance(m["n_neurons"], list) else [m["n_neurons"]] * m["n_hidden"]
    dist = {"normal": "untruncated_normal"}.get(i["distribution"], i["distribution"])
    init = keras.initializers.VarianceScaling(i["scale"], i["mode"], dist)
    penalty = keras.regularizers.L1L2(reg.get("l1", 0.0), reg.get("l2", 0.0)) if "l1" in reg or "l2" in reg else None
    drop = next(((keras.layers.Dropout if k == "dropout" else keras.layers.AlphaDropout, reg[k])
                 for k in ("dropout", "alpha_dropout") if k in reg), None)
    bn = (lambda: keras.layers.BatchNormalization(momentum=1 - norm["momentum"], epsilon=norm["eps"])) \
        if norm["kind"] == "batch" else None
    before = bn is not None and norm["position"] == "before"
    layers = [keras.Input((784,))] + ([bn()] if norm["input"] else [])
    layers += [drop[0](drop[1]["rate"])] if drop and drop[1]["input"] else []
    for w in widths:
        layers.append(keras.layers.Dense(w, kernel_initializer=init, use_bias=not before, kernel_regularizer=penalty,
                                         kernel_constraint=keras.constraints.MaxNorm(reg["max_norm"])
                                         if "max_norm" in reg else None))
        layers += [bn(), activation(cfg["activation"])] if before else \
            [activation(cfg["activation"])] + ([bn()] if bn else [])
        layers += [drop[0](drop[1]["rate"])] if drop else []
    layers.append(keras.layers.Dense(n_classes, activation="softmax", kernel_regularizer=penalty))
    return keras.Sequential(layers)


def optimizer(o: dict, t: dict, lr):
    """Keras' optimizer for the optimizer section `o`, with the trainer section `t`'s gradient clipping."""
    name, clip = o["_target_"].split(".")[-1], {"clipvalue": t.get("clip_value"), "clipnorm": t.get("clip_norm")}
    clip = {k: v for k, v in clip.items() if v is not None}
    if name == "SGD":
        return keras.optimizers.SGD(lr, momentum=o["momentum"], nesterov=o.get("nesterov", False), **clip)
    if name == "RMSprop":
        return keras.optimizers.RMSprop(lr, rho=o["alpha"], epsilon=o["eps"], momentum=o["momentum"], **clip)
    if name == "Adagrad":
        return keras.optimizers.Adagrad(lr, initial_accumulator_value=o["initial_accumulator_value"],
                                        epsilon=o["eps"], **clip)
    beta_1, beta_2 = o["betas"]
    kinds = {"Adam": keras.optimizers.Adam, "Adamax": keras.optimizers.Adamax, "NAdam": keras.optimizers.Nadam}
    if name == "AdamW":
        return keras.optimizers.AdamW(lr, weight_decay=o["weight_decay"], beta_1=beta_1, beta_2=beta_2,
                                      epsilon=o["eps"], **clip)
    return kinds[name](lr, beta_1=beta_1, beta_2=beta_2, epsilon=o["eps"], **clip)


class OneCycle(keras.callbacks.Callback):
    """dnnlab's 1cycle (conf/schedule/1cycle.yaml): linear rise, fall, then a final fall, set before each step."""

    def __init__(self, s: dict, total: int):
        super().__init__()
        self.top, self.low = s["max_lr"], s["max_lr"] / s["div_factor"]
        self.last, self.total, self.t = self.low / s["final_div_factor"], total, 0
        self.fall_end = max(0, min(2 * round(s["pct_rise"] * total), total - 2))
        self.rise = self.fall_end // 2

    def on_train_batch_begin(self, batch, logs=None):
        t = min(self.t, self.total - 1)
        if t <= self.rise:
            lr = self.low + (self.top - self.low) * t / max(1, self.rise)
        elif t <= self.fall_end:
            lr = self.top + (self.low - self.top) * (t - self.rise) / max(1, self.fall_end - self.rise)
        else:
            lr = self.low + (self.last - self.low) * (t - self.fall_end) / max(1, self.total - 1 - self.fall_end)
        self.model.optimizer.learning_rate.assign(lr)
        self.t += 1


def schedule(cfg: dict, steps_per_epoch: int):
    """(the optimizer's learning rate or Keras schedule, callbacks) for the run's schedule."""
    s, lr0 = cfg["schedule"], cfg["optimizer"]["lr"]
    name = s["_target_"].split(".")[-1]
    if name == "Power" and s["c"] == 1:
        return keras.optimizers.schedules.InverseTimeDecay(lr0, s["s"], 1.0), []
    if name == "Exponential" and s.get("unit", "step") == "step":
        return keras.optimizers.schedules.ExponentialDecay(lr0, s["s"], 0.1), []
    if name == "Exponential":
        return lr0, [keras.callbacks.LearningRateScheduler(lambda e: lr0 * 0.1 ** (e / s["s"]))]
    if name == "Piecewise":
        pick = lambda e: s["values"][sum(e >= b for b in s["boundaries"])]  # noqa: E731
        return lr0, [keras.callbacks.LearningRateScheduler(pick)]
    if name == "Performance":
        return lr0, [keras.callbacks.ReduceLROnPlateau(factor=s["factor"], patience=s["patience"],
                                                       min_delta=s["min_delta"], min_lr=s["min_lr"])]
    if name == "OneCycle":
        return lr0, [OneCycle({**s, "max_lr": lr0 if isinstance(s["max_lr"], str) else s["max_lr"]},
                              steps_per_epoch * cfg["trainer"]["epochs"])]
    if name == "Constant":
        return lr0, []
    raise SystemExit(f"schedule {name} is not covered by the Keras twin")


def twin(run: Path) -> dict:
    cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    if cfg["transfer"].get("source") or cfg["trainer"]["early_stopping"]["monitor"]:
        raise SystemExit(f"{run}: transfer and early stopping are not covered by the Keras twin")
    keras.utils.set_random_seed(cfg["trainer"]["seed"])
    data, t = splits(cfg["data"]), cfg["trainer"]
    steps = -(-len(data["train"][0]) // t["batch_size"])
    lr, callbacks = schedule(cfg, steps)
    model = network(cfg, int(data["test"][1].max()) + 1)
    model.compile(optimizer(cfg["optimizer"], t, lr), "sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(*data["train"], batch_size=t["batch_size"], epochs=t["epochs"], verbose=2,
                        validation_data=data["val"], callbacks=callbacks)
    test_loss, test_acc = model.evaluate(*data["test"], verbose=0)
    return {"last_val_acc": history.history["val_accuracy"][-1], "test_acc": test_acc, "test_loss": test_loss,
            "keras": keras.__version__, "seed": t["seed"]}


if __name__ == "__main__":
    for path in map(Path, sys.argv[1:]):
        result = twin(path)
        (path / "keras.json").write_text(json.dumps(result, indent=2))
        print(path, result)
