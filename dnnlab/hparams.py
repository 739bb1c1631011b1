"""A finished run's row in TensorBoard's HParams table: its overrides and key settings, and its final metrics,
written into the run's own tensorboard/ folder (where its per-epoch scalars are, so the table and the curves name
the same run). `tensorboard --logdir SWEEP_DIR` then compares a sweep's runs in one table."""
from __future__ import annotations

import logging
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dnnlab import stored
from dnnlab.errors import DnnlabError
from dnnlab.record import UNSHOWN

log = logging.getLogger("dnnlab")

# overrides that change no result (record.UNSHOWN), say where the data or device is, or where a trial reports to
NOISE = (*UNSHOWN, "trainer.device", "data.root", "trial.study", "trial.storage", "trial.metric", "trial.direction",
         "trial.pruner")
SETTINGS = ("optimizer._target_", "optimizer.lr", "activation._target_", "norm.kind", "schedule._target_",
            "trainer.batch_size", "trainer.epochs", "trainer.seed")
METRICS = ("val_acc", "val_loss", "test_acc", "test_loss", "epochs")
SUFFIX = ".hparams"  # the events file of a run's session (one per run folder)
PREFIX = "final/"  # the metrics' scalar tags: not the per-epoch val_acc/val_loss curves of the same folder


def _scalar(value):
    """A value TensorBoard's HParams keep: bool, int, float or str (anything else as its text; None as null)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return "null" if value is None else str(value)


def _noise(key: str) -> bool:
    return any(key == n or key.startswith(n + ".") or key.startswith(n + "/") for n in NOISE)


def from_overrides(cfg: DictConfig, items: dict[str, str]) -> dict:
    """{key: value} of the overrides that define the run (stored.override_values). A key that names a config value
    gets the value as the run used it (0.001 as a float); a group choice (optimizer=nadam) or a deletion keeps the
    override's text."""
    out = {}
    for key, text in items.items():
        if _noise(key):
            continue
        value = OmegaConf.select(cfg, key, default=None) if "/" not in key else None
        out[key] = _scalar(value) if isinstance(value, (bool, int, float, str)) else text
    return out


def settings(cfg: DictConfig) -> dict:
    """The settings every run's row shows, overridden or not: config path -> value."""
    out = {key: _scalar(OmegaConf.select(cfg, key, default=None)) for key in SETTINGS}
    init = OmegaConf.select(cfg, "init")  # variance_scaling is He, Glorot or LeCun by its arguments
    if OmegaConf.is_dict(init):
        out |= {f"init.{k}": _scalar(v) for k, v in init.items() if k != "_partial_" and not OmegaConf.is_config(v)}
    regularizer = OmegaConf.select(cfg, "regularizer")
    names = sorted(regularizer.keys()) if OmegaConf.is_dict(regularizer) else []
    out["regularizers"] = "+".join(str(n) for n in names) or "none"  # not "regularizer": that is the override's key
    return out


def collect(cfg: DictConfig, run_dir: Path, summary: dict) -> tuple[dict, dict]:
    """(hparams, metrics) of a finished run: its settings, its overrides (.hydra/overrides.yaml: a run started from
    Python has none) and its status; the summary's final numbers (NaN where it has none)."""
    try:
        items = stored.override_values(run_dir) or {}
    except (OSError, ValueError, DnnlabError):
        items = {}
    hparams = {**settings(cfg), **from_overrides(cfg, items), "status": str(summary.get("status"))}
    metrics = {}
    for key in METRICS:
        value = summary.get(key)
        metrics[PREFIX + key] = float(value) if isinstance(value, (int, float)) else math.nan
    return hparams, metrics


def write(cfg: DictConfig, run_dir: Path, summary: dict) -> None:
    """The run's HParams session and final metrics, at the step of its last epoch, in RUN/tensorboard/, in an
    events file of their own (SUFFIX). TensorBoard keeps the first session it reads of a run, so a resumed run's
    later end replaces the earlier file instead of adding to it."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    hparams, metrics = collect(cfg, Path(run_dir), summary)
    folder, step = Path(run_dir) / "tensorboard", int(summary.get("epochs") or 0)
    try:
        earlier = list(folder.glob(f"events.out.tfevents.*{SUFFIX}"))
        # no experiment summary: TensorBoard would take one run's as every run's (its keys only); without one it
        # gathers every session's keys, which differ where a sweep's jobs override different keys
        _, start, end = hparams_summaries(hparams, metrics)
        with SummaryWriter(log_dir=str(folder), filename_suffix=SUFFIX) as writer:
            writer.file_writer.add_summary(start, step)
            writer.file_writer.add_summary(end, step)
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, step)
        for path in earlier:
            path.unlink(missing_ok=True)
    except OSError as e:  # the summary is written already: TensorBoard's table is not worth losing the run for
        log.warning("could not write the HParams of %s to TensorBoard: %s", run_dir, e.strerror or e)
