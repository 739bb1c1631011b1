"""The native training step: a plain MLP's forward, loss and backward pass in one C++ call (csrc/mlp_step.cpp).

At batch 32 the arithmetic of the default network takes about a quarter of an autograd step on the CPU; the rest
is autograd's graph and Python's per-operation overhead. The C++ step runs autograd's activation kernels and
MKL's matrix products without either (and without ATen's overhead per product), which halves a default epoch. It is built once per machine and torch version by torch.utils.cpp_extension (about
10 s; `dnnlab.native` run as a script builds it ahead, as scripts/install.sh does) and is used where it computes
what autograd would: see `plan` for the networks it takes. Elsewhere, or where no C++ compiler is available,
training takes the autograd path. The same library holds the step of a stacked sweep (dnnlab::stack_step, used by
dnnlab/stacked.py): every job's step in one call, the jobs spread over the threads.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dnnlab import optim
from dnnlab.errors import DnnlabError
from dnnlab.transfer import Frozen

log = logging.getLogger("dnnlab")

SOURCE = Path(__file__).parent / "csrc" / "mlp_step.cpp"
# -fopenmp: at::parallel_for (the stacked step) is inlined into this library; torch's own libgomp serves it at run time
CFLAGS, LDFLAGS = ("-O3", "-fopenmp"), ("-fopenmp",)
STALE_LOCK_SECONDS = 600  # an unheld build lock this old was left by a killed build (see clear_stale_lock)
SELU = (1.6732632423543772848170429916717, 1.0507009873554804934193349852946)  # torch's alpha and scale


def activation_spec(m: nn.Module) -> tuple[str, list[float]] | None:
    """(kernel name, arguments) of an activation module the C++ step implements, else None."""
    if type(m) is nn.ELU:
        return "elu", [float(m.alpha), 1.0, 1.0]
    if type(m) is nn.SELU:
        return "elu", [SELU[0], SELU[1], 1.0]
    if type(m) is nn.LeakyReLU:
        return "leaky_relu", [float(m.negative_slope)]
    if type(m) is nn.Softplus:
        return "softplus", [float(m.beta), float(m.threshold)]
    if type(m) is nn.GELU:
        return ("gelu_tanh" if m.approximate == "tanh" else "gelu"), []
    names = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SiLU: "silu", nn.Mish: "mish"}
    return (names[type(m)], []) if type(m) in names else None


@dataclass
class Plan:
    """The network as the C++ step sees it."""
    linears: list[nn.Linear]
    activation: str
    act_args: list[float]
    dropout: list[float]  # the rate applied to each Linear's input
    first_trainable: int


def plan(net: nn.Module) -> tuple[Plan | None, str]:
    """(plan, "") when the C++ step computes exactly what autograd computes for `net` in training mode, else
    (None, why not). It takes [Flatten] [Dropout] (Linear -> activation [-> Dropout])* -> Linear with one of the
    activations above, float32 on the CPU, biases everywhere, frozen layers only at the bottom, and no hooks."""
    linears, acts, dropout, pending = [], [], [], 0.0
    for m in net.modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return None, "a module has hooks"
        if m._modules:
            if type(m) not in (nn.Sequential, Frozen):
                return None, f"{type(m).__name__} is not a plain container"
            continue
        if isinstance(m, nn.Flatten) and not linears:
            continue
        if type(m) is nn.Dropout:
            if m.training and m.p > 0:
                if pending or m.inplace:
                    return None, "two dropout layers in a row, or in-place dropout"
                pending = float(m.p)
            continue
        if type(m) is nn.Linear:
            if len(linears) != len(acts):
                return None, "two Linear layers without an activation between them"
            linears.append(m)
            dropout.append(pending)
            pending = 0.0
            continue
        spec = activation_spec(m)
        if spec is None:
            return None, f"{type(m).__name__} layers"
        if len(acts) != len(linears) - 1 or pending:
            return None, f"{type(m).__name__} where a Linear layer was expected"
        acts.append(spec)
    if not linears or len(acts) != len(linears) - 1 or pending:
        return None, "the network does not end in a Linear layer"
    if len(set(map(repr, acts))) > 1:
        return None, "different activations in different layers"
    if any(lin.bias is None for lin in linears):
        return None, "a Linear layer without bias"
    params = [p for lin in linears for p in (lin.weight, lin.bias)]
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in params):
        return None, "parameters are not float32 on the CPU"
    trainable = [lin.weight.requires_grad for lin in linears]
    if any(lin.bias.requires_grad != t for lin, t in zip(linears, trainable)) or not any(trainable):
        return None, "a layer whose weight and bias differ in being frozen, or nothing to train"
    first = trainable.index(True)
    if not all(trainable[first:]):
        return None, "frozen layers above trainable ones"
    name, args = acts[0] if acts else ("relu", [])
    return Plan(linears, name, args, dropout, first), ""


def build_directory() -> Path:
    """Where the compiled library is kept: per torch version and source, under torch's extension cache
    ($TORCH_EXTENSIONS_DIR, as torch itself reads it, else torch's default)."""
    from torch.utils.cpp_extension import get_default_build_root

    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + repr(CFLAGS + LDFLAGS).encode())
    digest = digest.hexdigest()[:12]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / f"dnnlab_native_{digest}"


def clear_stale_lock(lock: Path) -> None:
    """Remove a build lock left by a killed build: torch before 2.14 waits for as long as the file exists (2.14 holds
    an advisory lock on it instead, which the kernel drops with the process; a file still locked is never removed)."""
    if not lock.exists() or time.time() - lock.stat().st_mtime <= STALE_LOCK_SECONDS:
        return
    with open(lock, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # a build is running
        lock.unlink(missing_ok=True)


@functools.cache
def available() -> str:
    """Build (first time) and load the C++ step; "" when it is ready, else why it is not (no compiler, ...)."""
    if hasattr(torch.ops.dnnlab, "mlp_step"):
        return ""
    # importing torch.utils.cpp_extension warns about a missing CUDA toolkit, which this CPU-only code never needs
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.cpp_extension import load

    folder = build_directory()
    folder.mkdir(parents=True, exist_ok=True)
    clear_stale_lock(folder / "lock")
    built = any(folder.glob("*.so"))
    if not built:
        log.info("building dnnlab's native training step (once per machine and torch version, about 10 s)")
    try:
        load("dnnlab_native", [str(SOURCE)], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),  # (it appends)
             build_directory=str(folder), is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no ninja, a failed build: the autograd path still trains
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"it could not be built ({first})"
    return ""


class NativeStep:
    """`step(idx)`: forward, loss and backward of the batch `x_all[idx]`, the gradients left in the parameters'
    .grad (allocated here as views of one flat tensor; overwritten every step), the batch's loss and hits added to
    loss_sum and correct. Returns the batch's mean loss and whether the step also took the optimizer's update.
    With `update` (an optim.DirectStep whose flat tensors are ready, from the step after torch's first), the C++
    step takes Adam's update as well, with the arithmetic of torch's fused kernel, bit for bit: a separate update
    call's Python and dispatch cost about 5 % of a default step. The caller leaves `update` out where anything
    must change the gradients between the backward pass and the update (penalties, clipping)."""

    def __init__(self, p: Plan, x_all: torch.Tensor, y_all: torch.Tensor, loss_sum: torch.Tensor,
                 correct: torch.Tensor, update: optim.DirectStep | None = None):
        trainable = p.linears[p.first_trainable:]
        params = [param for lin in trainable for param in (lin.weight, lin.bias)]
        if (any(q.grad is None or q.grad.shape != q.shape for q in params)
                or optim.span([q.grad for q in params]) is None):
            for q, grad in zip(params, optim.pack([torch.zeros_like(q) for q in params])):
                q.grad = grad
        self.args = (x_all, y_all, [lin.weight.detach() for lin in p.linears], [lin.bias.detach() for lin in p.linears],
                     [lin.weight.grad for lin in trainable], [lin.bias.grad for lin in trainable], p.first_trainable,
                     p.activation, p.act_args, p.dropout, loss_sum, correct)
        self.update = update
        self.op = torch.ops.dnnlab.mlp_step.default

    def __call__(self, idx: torch.Tensor) -> tuple[float, bool]:
        x_all, y_all, *rest = self.args
        flat = self.update.flat() if self.update else None
        if flat is None:
            return self.op(x_all, y_all, idx, *rest, [], [], 1)[0], False
        loss, seconds = self.op(x_all, y_all, idx, *rest, flat, self.update.hyperparameters(), self.update.threads())
        self.update.done(seconds)
        return loss, True


def choose(setting, net: nn.Module, device: torch.device, reasons_off: list[str]) -> Plan | None:
    """The plan for `trainer.native` (auto, true or false), or None for the autograd path. `reasons_off` are the
    run's settings that need autograd (diagnostics, compile, bf16). With true, anything that rules the C++ step
    out is an error."""
    if setting is False:
        return None
    why = ", ".join(reasons_off) if reasons_off else ("it runs on the CPU only" if device.type != "cpu" else "")
    p = None
    if not why:
        p, why = plan(net)
    if not why:
        why = available()
    if why:
        if setting is True:
            raise DnnlabError(f"trainer.native=true is not possible here: {why} (use trainer.native=auto)")
        log.debug("training step: autograd (native step not used: %s)", why)
        return None
    return p


if __name__ == "__main__":  # python -m dnnlab.native: build ahead of the first run, and say where it stands
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    reason = available()
    print(f"dnnlab native training step: {'ready in ' + str(build_directory()) if not reason else reason}")
    raise SystemExit(1 if reason else 0)
