"""CUDA paths (run only where a GPU is present): data and metrics stay on the device and the host reads them once
per epoch; trainer.compile (torch.compile, CUDA graphs) trains the same network; a stack trains on the GPU."""
from __future__ import annotations

import math
import threading
import warnings
from contextlib import nullcontext

import pytest
import torch

from dnnlab.data import load
from dnnlab.model import build_mlp
from dnnlab.optim import GradientRules, build_optimizer
from dnnlab.schedule import build_schedule
from dnnlab.stacked import train_group
from dnnlab.trainer import train, train_epoch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class _NoProgress:
    def step(self, i):
        pass


def _syncs(fn) -> int:
    """How many times `fn` makes the host wait for the GPU (torch's sync debug mode warns at each)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_training_on_cuda_matches_the_cpu(make_cfg, tmp_path):
    cpu = train(make_cfg("trainer.device=cpu"), tmp_path / "cpu")
    gpu = train(make_cfg("trainer.device=cuda"), tmp_path / "gpu")
    assert gpu["device"].startswith("cuda") and gpu["status"] == "completed"
    assert gpu["test_loss"] == pytest.approx(cpu["test_loss"], rel=2e-2, abs=1e-3)


def test_an_epoch_on_cuda_reads_the_metrics_once(make_cfg):
    cfg = make_cfg("trainer.device=cuda")
    device = torch.device("cuda")
    data = load(cfg.data, device)
    torch.manual_seed(0)
    model = build_mlp(cfg, data.n_classes).to(device)
    optimizer = build_optimizer(cfg.optimizer, list(model.parameters()), device)
    rules = GradientRules(model, cfg.regularizer, cfg.trainer)
    steps = len(data.x_train) // 32
    schedule = build_schedule(cfg.schedule, cfg.optimizer.lr, steps, steps)
    generator = torch.Generator(device=device).manual_seed(0)
    args = (model, data.x_train, data.y_train, steps, 32, optimizer, rules, schedule, 0, generator, nullcontext(),
            _NoProgress(), threading.Event())
    train_epoch(*args)  # warm-up: lazy CUDA initialisation syncs
    assert _syncs(lambda: train_epoch(*args)) <= 3  # the epoch's mean loss and accuracy, not one per step


def test_a_stack_reads_its_metrics_once_per_epoch(make_cfg, tmp_path):
    cfgs = [make_cfg("trainer.device=cuda", f"trainer.seed={s}", "trainer.epochs=1") for s in (1, 2)]
    n_syncs = _syncs(lambda: train_group(cfgs, [tmp_path / "a", tmp_path / "b"], progress=False))
    steps = math.ceil(500 / 32)
    assert n_syncs < steps  # per epoch and per checkpoint, never per step


@pytest.mark.parametrize("extra", [[], ["regularizer=dropout"]])
def test_compiled_training_on_cuda(make_cfg, tmp_path, extra):
    cfg = make_cfg("trainer.device=cuda", *extra)
    if "compile" not in cfg.trainer:
        pytest.skip("trainer.compile is not in this version of conf/trainer/default.yaml")
    plain = train(cfg, tmp_path / "plain")
    compiled = train(make_cfg("trainer.device=cuda", "trainer.compile=true", *extra), tmp_path / "compiled")
    assert compiled["status"] == "completed" and compiled["epochs"] == plain["epochs"]
    if not extra:  # without dropout the compiled network computes the same function
        assert compiled["test_loss"] == pytest.approx(plain["test_loss"], rel=5e-2, abs=1e-3)
