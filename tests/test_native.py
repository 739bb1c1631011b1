"""The native (C++) training step: the same gradients, losses and dropout masks as autograd, the networks it takes
and refuses, training through it end to end, and what happens where it cannot be built."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dnnlab.fast import flat_adam, native
from dnnlab.errors import DnnlabError
from dnnlab.model import build_mlp
from dnnlab.train import train
from dnnlab.transfer import Frozen
from tests.conftest import HANG_S

pytestmark = pytest.mark.skipif(native.available() != "", reason=f"native step unavailable: {native.available()}")

ACTIVATIONS = {
    "elu": lambda: nn.ELU(0.7), "selu": nn.SELU, "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU("tanh"),
    "silu": nn.SiLU, "mish": nn.Mish, "softplus": lambda: nn.Softplus(2.0, 10.0)}


def mlp(act=nn.ELU, dropout: float = 0.0, input_dropout: float = 0.0, widths=(784, 40, 30, 7), seed: int = 0):
    """dnnlab's block layout: input (Flatten [, Dropout]), hiddenN (Linear, act [, Dropout]), output Linear."""
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.Flatten(), *([nn.Dropout(input_dropout)] if input_dropout else []))]
    for n_in, n_out in zip(widths[:-2], widths[1:-1]):
        blocks.append(nn.Sequential(nn.Linear(n_in, n_out), act(), *([nn.Dropout(dropout)] if dropout else [])))
    blocks.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*blocks)


def data(n=300, classes=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 784, generator=g), torch.randint(0, classes, (n,), generator=g)


def autograd_step(net, x, y):
    for p in net.parameters():
        p.grad = None
    logits = net(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    return loss.item(), int((logits.argmax(1) == y).sum())


def assert_same_grads(a: nn.Module, b: nn.Module, rtol=1e-5):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is None:
            assert pb.grad is None, name
            continue
        scale = pa.grad.abs().max().item() + 1e-12
        assert (pa.grad - pb.grad).abs().max().item() <= rtol * scale, name


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_step_computes_what_autograd_computes(name, dropout):
    x_all, y_all = data()
    ref, net = (mlp(ACTIVATIONS[name], dropout, dropout / 2) for _ in range(2))
    plan, why = native.plan(net)
    assert plan and not why
    loss_sum, correct = torch.zeros(()), torch.zeros((), dtype=torch.long)
    step = native.NativeStep(plan, x_all, y_all, loss_sum, correct)
    expected_sum, expected_hits = 0.0, 0
    for k in range(3):
        idx = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(k))[:32]
        torch.manual_seed(10 + k)  # dropout draws from the global generator: the same masks in both
        loss, hits = autograd_step(ref, x_all[idx], y_all[idx])
        torch.manual_seed(10 + k)
        assert step(idx) == (pytest.approx(loss, rel=1e-6), False)  # (no optimizer: no update)
        assert_same_grads(ref, net)
        expected_sum, expected_hits = expected_sum + loss * 32, expected_hits + hits
    assert loss_sum.item() == pytest.approx(expected_sum, rel=1e-6) and correct.item() == expected_hits


def test_weights_stored_transposed_take_atens_products_and_give_the_same_gradients():
    """The step calls MKL's sgemm directly on contiguous tensors; other layouts go through ATen's mm."""
    x_all, y_all = data()
    ref, net = mlp(dropout=0.2), mlp(dropout=0.2)
    for lin in (m for m in net.modules() if isinstance(m, nn.Linear)):
        lin.weight = nn.Parameter(lin.weight.detach().t().contiguous().t())  # same values, (1, out) strides
        assert not lin.weight.is_contiguous()
    plan, _ = native.plan(net)
    step = native.NativeStep(plan, x_all, y_all, torch.zeros(()), torch.zeros((), dtype=torch.long))
    idx = torch.arange(40)
    torch.manual_seed(3)
    loss, _ = autograd_step(ref, x_all[idx], y_all[idx])
    torch.manual_seed(3)
    assert step(idx)[0] == pytest.approx(loss, rel=1e-6)
    assert_same_grads(ref, net)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("adam,kwargs", [(torch.optim.Adam, {}), (torch.optim.Adam, {"weight_decay": 0.01}),
                                         (torch.optim.AdamW, {"weight_decay": 0.01}),
                                         (torch.optim.Adam, {"maximize": True})])
def test_the_update_in_the_step_is_torchs_fused_update_bit_for_bit(adam, kwargs, threads):
    """The C++ step's Adam/AdamW update against torch's fused kernel on the same flat tensors (flat_adam.DirectStep),
    with what schedules and momentum cycling change between steps (beta1 once below 0.5), 32,847 parameters (not a whole number of
    16-float vectors) and the update on one thread or two: the same parameters, moments and step counts."""
    x_all, y_all = data()
    runs = []
    for in_step in (False, True):
        net = mlp(dropout=0.2)
        params = list(net.parameters())
        flat_adam.pack_parameters_(params)
        opt = adam(params, lr=0.01, eps=1e-7, fused=True, **kwargs)
        direct = flat_adam.DirectStep(opt, SimpleNamespace(current=threads, before=lambda j: None,
                                                        after=lambda j, elapsed=None: None))
        step = native.NativeStep(native.plan(net)[0], x_all, y_all, torch.zeros(()), torch.zeros((), dtype=torch.long),
                                 direct if in_step else None)
        updated = []
        for k in range(5):
            beta1 = 0.3 if k == 3 else 0.9 - 0.01 * k  # (torch's lerp takes another formula below 0.5)
            opt.param_groups[0]["lr"], opt.param_groups[0]["betas"] = 0.01 / (k + 1), (beta1, 0.999)
            torch.manual_seed(k)  # the same dropout masks
            loss, done = step(torch.randperm(len(x_all), generator=torch.Generator().manual_seed(k))[:32])
            if not done:
                direct()
            updated.append(done)
        assert updated == [False] + [in_step] * 4  # torch's own first step creates the state
        state = opt.state_dict()["state"]
        runs.append([p.detach() for p in params] + [state[i][k] for i in state for k in ("step", "exp_avg", "exp_avg_sq")])
    assert sum(p.numel() for p in params) % 16 and all(torch.equal(a, b) for a, b in zip(*runs))


def stack_of(nets):
    """The jobs' layers as dnnlab.stacked keeps them: (jobs x in x out) weights, (jobs x out) biases, and gradients."""
    layers = list(zip(*([m for m in net.modules() if isinstance(m, nn.Linear)] for net in nets)))
    weights = [torch.stack([lin.weight.detach().t() for lin in layer]).contiguous() for layer in layers]
    biases = [torch.stack([lin.bias.detach() for lin in layer]) for layer in layers]
    return weights, biases, [torch.zeros_like(w) for w in weights], [torch.zeros_like(b) for b in biases]


@pytest.mark.parametrize("name", ["elu", "selu", "relu", "tanh", "gelu", "softplus"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_stack_step_computes_what_autograd_computes_for_every_job(name, dropout):
    """dnnlab::stack_step: job k trains on its own rows with its own weights and dropout masks; each job's
    gradients, loss and hits equal autograd's for that job alone, on one thread or two (bit for bit)."""
    x_all, y_all = data()
    nets = [mlp(ACTIVATIONS[name], seed=k) for k in range(3)]
    weights, biases, grad_w, grad_b = stack_of(nets)
    kernel = native.activation_spec(ACTIVATIONS[name]())
    g = torch.Generator().manual_seed(5)
    idx = torch.stack([torch.randperm(len(x_all), generator=g)[:32] for _ in nets])
    masks = [None] * len(weights)
    if dropout:  # the input's and the second hidden layer's, for jobs 0 and 2 (job 1 keeps everything: ones)
        for layer in (0, 2):
            m = torch.ones(3, 32, weights[layer].shape[1])
            m[0].bernoulli_(1 - dropout, generator=g).div_(1 - dropout)
            m[2].bernoulli_(1 - dropout, generator=g).div_(1 - dropout)
            masks[layer] = m
    results = []
    # the first rounds warm up: a fresh OpenMP worker's first MKL products may round differently, on a busy machine
    # up to the second time the pool grows (2, 1, 2 under load: measured); the last two are compared
    for threads in (2, 1, 2, 1, 2):
        torch.set_num_threads(threads)
        loss_sum, correct = torch.zeros(3), torch.zeros(3, dtype=torch.long)
        losses = torch.ops.dnnlab.stack_step(x_all, y_all, idx, weights, biases, grad_w, grad_b, *kernel, masks,
                                             loss_sum, correct, [], [])  # (no update)
        results.append((losses, loss_sum.clone(), correct.clone(), [t.clone() for t in grad_w + grad_b]))
    torch.set_num_threads(1)
    assert results[3][0] == results[4][0] and all(torch.equal(a, b) for a, b in zip(results[3][3], results[4][3]))
    losses, loss_sum, correct, _ = results[3]
    for k, net in enumerate(nets):
        h, act = x_all[idx[k]], ACTIVATIONS[name]()
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        for layer, lin in enumerate(linears):
            h = h * masks[layer][k] if masks[layer] is not None else h
            h = lin(h) if layer == len(linears) - 1 else act(lin(h))
        loss = F.cross_entropy(h, y_all[idx[k]])
        loss.backward()
        assert losses[k] == pytest.approx(loss.item(), rel=1e-6)
        assert loss_sum[k].item() == pytest.approx(32 * loss.item(), rel=1e-6)
        assert correct[k].item() == int((h.argmax(1) == y_all[idx[k]]).sum())
        for layer, lin in enumerate(linears):
            scale = lin.weight.grad.abs().max().item() + 1e-12
            assert (grad_w[layer][k].t() - lin.weight.grad).abs().max().item() <= 1e-5 * scale
            assert (grad_b[layer][k] - lin.bias.grad).abs().max().item() <= 1e-5 * (lin.bias.grad.abs().max() + 1e-12)


def test_plan_reads_dnnlabs_networks(make_cfg):
    model = build_mlp(make_cfg("regularizer=dropout", "regularizer.dropout.input=true", "activation=selu"), 10)
    plan, why = native.plan(model)
    assert not why and plan.activation == "elu" and plan.act_args == [*native.SELU, 1.0]
    assert plan.dropout == [0.2] * 6 and plan.first_trainable == 0 and len(plan.linears) == 6
    model.eval()  # dropout off in inference mode: no rates
    assert native.plan(model)[0].dropout == [0.0] * 6


@pytest.mark.parametrize("overrides,why", [
    (["norm=batchnorm"], "BatchNorm1d"), (["norm=layernorm"], "LayerNorm"), (["activation=prelu"], "PReLU"),
    (["activation=rrelu"], "RReLU"), (["regularizer=alpha_dropout"], "AlphaDropout")])
def test_plan_refuses_what_it_does_not_implement(make_cfg, overrides, why):
    plan, reason = native.plan(build_mlp(make_cfg(*overrides), 10))
    assert plan is None and why in reason


def test_plan_refuses_hooks_frozen_tops_mixed_activations_and_other_dtypes():
    net = mlp()
    net[1].register_forward_hook(lambda *a: None)
    assert native.plan(net) == (None, "a module has hooks")
    net = mlp()
    net[-1].requires_grad_(False)
    assert native.plan(net)[1] == "frozen layers above trainable ones"
    net = mlp()
    net[2][1] = nn.ReLU()
    assert native.plan(net)[1] == "different activations in different layers"
    assert native.plan(mlp().double())[1] == "parameters are not float32 on the CPU"
    assert native.plan(nn.Sequential(nn.Linear(4, 4, bias=False)))[1] == "a Linear layer without bias"
    assert native.plan(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))[0] is None


def test_frozen_bottom_layers_get_no_gradient_and_no_backward_pass():
    x_all, y_all = data()
    ref, net = mlp(widths=(784, 20, 20, 20, 7)), mlp(widths=(784, 20, 20, 20, 7))
    for m in (ref, net):
        m[1] = Frozen(m[1])
        m[2] = Frozen(m[2])
    plan, why = native.plan(net)
    assert not why and plan.first_trainable == 2
    native.NativeStep(plan, x_all, y_all, torch.zeros(()), torch.zeros((), dtype=torch.long))(torch.arange(32))
    autograd_step(ref, x_all[:32], y_all[:32])
    assert net[1][0].weight.grad is None and net[2][0].bias.grad is None
    assert_same_grads(ref, net)


def test_choose_explains_and_refuses(make_cfg):
    model = build_mlp(make_cfg(), 10)
    cpu = torch.device("cpu")
    assert native.choose("auto", model, cpu, []) is not None
    assert native.choose(False, model, cpu, []) is None
    assert native.choose("auto", model, cpu, ["trainer.compile"]) is None
    with pytest.raises(DnnlabError, match=r"trainer.native=true is not possible here: trainer.compile"):
        native.choose(True, model, cpu, ["trainer.compile"])
    with pytest.raises(DnnlabError, match="BatchNorm1d"):
        native.choose(True, build_mlp(make_cfg("norm=batchnorm"), 10), cpu, [])


def rows(run_dir):
    return [line.split(",") for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]]


@pytest.mark.parametrize("overrides", [[], ["regularizer=dropout", "optimizer=nesterov", "schedule=1cycle"],
                                       ["regularizer=l1_l2", "+regularizer.max_norm=1.0", "trainer.clip_norm=1.0"]])
def test_training_natively_matches_autograd(make_cfg, tmp_path, overrides):
    fast = train(make_cfg(*overrides), tmp_path / "native")
    slow = train(make_cfg(*overrides, "trainer.native=false"), tmp_path / "autograd")
    assert fast["training_step"] == "native" and slow["training_step"] == "autograd"
    for a, b in zip(rows(tmp_path / "native"), rows(tmp_path / "autograd"), strict=True):
        for column in (1, 2, 3, 4):  # train_loss, train_acc, val_loss, val_acc
            assert float(a[column]) == pytest.approx(float(b[column]), rel=1e-4, abs=1e-5)
    assert fast["test_acc"] == pytest.approx(slow["test_acc"], abs=1e-3)


class _Alternating:
    """Stands in for ThreadTuner: the update on two threads at even steps, on one at odd steps. Keeps the seconds
    that an update timed itself (the C++ step's) reports."""

    def __init__(self, many, steps, apply):
        assert apply is None
        self.many, self.current, self.timed = many, 1, []

    def before(self, j):
        self.current = 2 if j % 2 == 0 else 1

    def after(self, j, elapsed=None):
        if elapsed is not None:
            self.timed.append(elapsed)


@pytest.mark.parametrize("overrides,in_cpp", [
    # (torch 2.4's AdamW is no Adam subclass: not fused through flat_adam.DirectStep, so not in the C++ step either)
    (["+regularizer.max_norm=1.0", "optimizer=adamw", "optimizer.weight_decay=0.01"],
     issubclass(torch.optim.AdamW, torch.optim.Adam)),
    (["regularizer=l1_l2", "+regularizer.max_norm=1.0", "trainer.clip_norm=1.0"], False)])
def test_the_update_threads_change_no_metric(make_cfg, tmp_path, monkeypatch, overrides, in_cpp):
    """The optimizer's update of the flat parameters may switch between the job's cores and one thread from step to
    step (threads=auto), or run on the one thread asked for; the metrics are the same, the matrix products keep
    one thread and the summary records both counts. The update runs in the C++ step, which times it, unless
    penalties or clipping change the gradients first."""
    import dnnlab.fast
    import dnnlab.trainer

    tuners = []
    monkeypatch.setattr(dnnlab.trainer, "core_share", lambda parallel_jobs=1: 2)
    monkeypatch.setattr(dnnlab.fast, "ThreadTuner", lambda *a, **k: tuners.append(_Alternating(*a, **k)) or tuners[-1])
    auto = train(make_cfg(*overrides, "trainer.batch_size=8", "trainer.threads=auto"), tmp_path / "auto")
    one = train(make_cfg(*overrides, "trainer.batch_size=8", "trainer.threads=1"), tmp_path / "one")
    assert (auto["threads"], auto["update_threads"], one["threads"], one["update_threads"]) == (1, 2, 1, 1)
    assert [r[:5] for r in rows(tmp_path / "auto")] == [r[:5] for r in rows(tmp_path / "one")]
    assert len(tuners) == 1 and bool(tuners[0].timed) == in_cpp and all(t > 0 for t in tuners[0].timed)


def test_native_training_is_reproducible(make_cfg, tmp_path):
    train(make_cfg("regularizer=dropout"), tmp_path / "a")
    train(make_cfg("regularizer=dropout"), tmp_path / "b")
    assert [r[:6] for r in rows(tmp_path / "a")] == [r[:6] for r in rows(tmp_path / "b")]


def test_settings_that_need_autograd_fall_back_or_are_refused(make_cfg, tmp_path):
    assert train(make_cfg("norm=batchnorm"), tmp_path / "bn")["training_step"] == "autograd"
    assert train(make_cfg("diagnostics=on"), tmp_path / "diag")["training_step"] == "autograd"
    with pytest.raises(DnnlabError, match="diagnostics=on"):
        train(make_cfg("diagnostics=on", "trainer.native=true"), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()  # refused before anything was written


def test_falling_back_to_autograd_is_told_at_info_once_per_run(make_cfg, tmp_path, caplog):
    """trainer.native=auto with an activation the C++ step has no kernel for: one INFO line with the reason, also
    where the trainer asks again (each training phase asks, with its part of the same network)."""
    caplog.set_level(logging.INFO, logger="dnnlab")
    told = "training step: autograd (native step not used: PReLU layers)"
    summary = train(make_cfg("activation=prelu", "trainer.native=auto"), tmp_path / "prelu")
    assert summary["training_step"] == "autograd"
    assert [r.levelno for r in caplog.records if r.getMessage() == told] == [logging.INFO]
    caplog.clear()
    model, cpu = build_mlp(make_cfg("activation=prelu"), 10), torch.device("cpu")
    top = nn.Sequential(*list(model.children())[2:])  # a fine-tuning phase's net above cached frozen layers
    assert [native.choose("auto", net, cpu, []) for net in (model, model, top)] == [None] * 3
    assert [r.getMessage() for r in caplog.records] == [told]
    native.choose("auto", model, cpu, ["diagnostics=on"])  # another reason is news
    native.choose("auto", build_mlp(make_cfg("activation=prelu"), 10), cpu, [])  # and so is another run
    assert [r.getMessage() for r in caplog.records] == [told, told.replace("PReLU layers", "diagnostics=on"), told]


def test_cached_transfer_trains_natively(make_cfg, tmp_path):
    train(make_cfg("data.classes=[0,1,2,3,4]"), tmp_path / "source")
    summary = train(make_cfg("data.classes=[5,6,7,8,9]", "transfer=reuse",
                             f"transfer.source={tmp_path / 'source'}"), tmp_path / "target")
    assert summary["status"] == "completed" and summary["training_step"] == "native"


def test_where_the_native_step_is_required_a_failed_build_fails_the_test_run(tmp_path):
    """DNNLAB_REQUIRE_NATIVE=1 (CI) and no working compiler: pytest stops before any test, saying why."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache"), "CXX": "/bin/false",
           "DNNLAB_REQUIRE_NATIVE": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
                           str(Path(__file__).parent / "test_ftrl.py")], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).parents[1], timeout=HANG_S)
    assert done.returncode != 0
    assert "DNNLAB_REQUIRE_NATIVE is set but the native step is unavailable: it could not be built" in \
        done.stdout + done.stderr


def test_a_failed_build_leaves_the_autograd_path(tmp_path, data_root):
    """No working compiler: available() says why, auto trains with autograd, true is a one-line refusal."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache"), "CXX": "/bin/false"}
    code = ("from dnnlab.fast import native; import torch; r = native.available(); print(r); "
            "print(native.choose('auto', torch.nn.Sequential(torch.nn.Linear(3, 2)), torch.device('cpu'), []))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=HANG_S)
    assert done.returncode == 0, done.stderr
    reason, chosen = done.stdout.splitlines()[-2:]
    assert reason.startswith("it could not be built") and chosen == "None"
    assert native.build_directory().parent != tmp_path / "cache"  # the failed build stayed out of the real cache
    assert list((tmp_path / "cache").glob("dnnlab_native_*"))
    cli = subprocess.run([sys.executable, "-m", "dnnlab", "train", f"data.root={data_root}", "data.val_size=100", "trainer.native=true",
                          f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env, timeout=HANG_S)
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert "trainer.native=true is not possible here: it could not be built" in cli.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_summary_records_the_step(make_cfg, tmp_path):
    train(make_cfg(), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["training_step"] == "native" and summary["phases"][0]["training_step"] == "native"


def test_the_library_in_use_is_the_finished_one_in_the_build_folder():
    """(The build itself, shared by installs and never held up by a killed build's lock: test_native_build.py.)"""
    folder = native.build_directory()
    assert native.available() == "" and (folder / native.LIBRARY).is_file()


@pytest.fixture
def update_check():
    """update_in_step's answer is kept per process: each test asks afresh, and leaves no answer of its own behind."""
    native.update_in_step.cache_clear()
    yield
    native.update_in_step.cache_clear()


def test_the_update_check_passes_on_this_torch_and_changes_no_global_state(update_check):
    torch.manual_seed(7)
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    assert native.update_differs() == "" and native.update_in_step()
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads  # the run's own


def one_ulp_off(monkeypatch):
    """Make torch's side of the update check differ from the C++ step's in one bit of one parameter."""
    real = native._adam_run

    def run(adam, settings, in_step):
        tensors, taken = real(adam, settings, in_step)
        if not in_step:
            first = tensors[0].clone().view(-1)
            first[0] = torch.nextafter(first[0], torch.tensor(float("inf")))
            tensors[0] = first
        return tensors, taken

    monkeypatch.setattr(native, "_adam_run", run)


def spy_updates(monkeypatch) -> list:
    """The `update` handed to every NativeStep the trainer makes from now on."""
    handed = []

    class Spy(native.NativeStep):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            handed.append(self.update)

    monkeypatch.setattr(native, "NativeStep", Spy)
    return handed


def test_where_the_update_differs_torch_takes_it_and_the_run_is_the_same(make_cfg, tmp_path, monkeypatch, caplog,
                                                                         update_check):
    """One bit off in the check: the trainer hands the C++ step no update (torch's kernel takes it after the C++
    backward pass), says why in a debug line, and trains to the very numbers of the run with the C++ update."""
    assert native.update_in_step()
    handed = spy_updates(monkeypatch)
    train(make_cfg(), tmp_path / "in_step")
    assert handed and all(u is not None for u in handed)
    native.update_in_step.cache_clear()
    one_ulp_off(monkeypatch)
    caplog.set_level(logging.DEBUG, logger="dnnlab")
    assert not native.update_in_step()  # (asked before the spy's next run: the check makes NativeSteps of its own)
    assert "its own update is not used: Adam differs from torch" in caplog.text
    handed.clear()
    summary = train(make_cfg(), tmp_path / "by_torch")
    assert handed and all(u is None for u in handed)
    assert summary["status"] == "completed" and summary["training_step"] == "native"
    assert [r[:5] for r in rows(tmp_path / "by_torch")] == [r[:5] for r in rows(tmp_path / "in_step")]


def test_where_the_update_differs_a_stacked_sweep_leaves_it_to_torch(make_cfg, tmp_path, monkeypatch, update_check):
    """The C++ stack step takes every job's update (after torch's first) unless the check fails."""
    from dnnlab.stack import Stack
    from dnnlab.stacked import train_group

    handed, real = [], Stack.native_step

    def native_step(self, *args):
        handed.append(args[-1])  # update
        return real(self, *args)

    monkeypatch.setattr(Stack, "native_step", native_step)
    cfgs = [make_cfg(f"trainer.seed={seed}") for seed in (1, 2)]
    for differs in (False, True):
        if differs:
            one_ulp_off(monkeypatch)
            native.update_in_step.cache_clear()
        handed.clear()
        summaries = train_group(cfgs, [tmp_path / f"{differs}{k}" for k in range(2)], progress=False)
        assert handed and all(u is None for u in handed) == differs and handed[0] is None  # (torch's first step)
        assert {s["status"] for s in summaries} == {"completed"} and summaries[0]["training_step"] == "stacked native"
