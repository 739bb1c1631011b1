"""The native training step: a plain MLP's forward, loss and backward pass in one C++ call (csrc/mlp_step.cpp).

At batch 32 the arithmetic of the default network takes about a quarter of an autograd step on the CPU; the rest
is autograd's graph and Python's per-operation overhead. The C++ step runs autograd's activation kernels and
MKL's matrix products without either (and without ATen's overhead per product), which halves a default epoch. It is
used where it computes what autograd would: see `plan` for the networks it takes. Elsewhere, or where no C++ compiler
is available, training takes the autograd path. The same library holds the step of a stacked sweep
(dnnlab::stack_step, called by dnnlab/stack.py): every job's step in one call, the jobs spread over the threads.
The step also takes Adam's update where that gives torch's own numbers on this torch (`update_in_step`).

The library is built once per machine, source text and torch version (about 10 s; `python -m dnnlab.fast.native` builds
it ahead, as scripts/install.sh does), by torch.utils.cpp_extension, and shared by every install of dnnlab there:
checkouts, venvs, the wheel. Torch's build files name absolute paths (the source's, the venv's torch headers), and
torch runs ninja on every load, so two installs sharing one build folder rebuilt it in turn, each run waiting on
the other's build. Keying the folder by the install's path instead would still cost a build per checkout and per
temporary venv (the wheel test's), and leave a folder behind for each. So ninja runs only to make the library the
first time: `build_directory` is named by what the binary depends on (the source text, torch's version and ABI,
the flags), never by a path; the build runs in a private folder, under an flock (which dies with its holder), and
its library is moved into place complete; from then on every process of every install loads that file directly,
with no ninja, lock or wait, and nothing any install does can invalidate it.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dnnlab import activations
from dnnlab.fast import flat_adam
from dnnlab.fast.forward import has_hooks
from dnnlab.errors import DnnlabError
from dnnlab.transfer import Frozen

log = logging.getLogger("dnnlab")

SOURCE = Path(__file__).parent / "csrc" / "mlp_step.cpp"
# -fopenmp: at::parallel_for (the stacked step) is inlined into this library; torch's own libgomp serves it at run time
CFLAGS, LDFLAGS = ("-O3", "-fopenmp"), ("-fopenmp",)
LIBRARY = "dnnlab_native.so"  # the finished library in build_directory()
LAYOUT = 2  # of the build folder: the folders of dnnlab versions that ran ninja on every load are never shared
SELU = activations.SELU  # torch's alpha and scale (callers and tests read native.SELU)


def activation_spec(m: nn.Module) -> tuple[str, list[float]] | None:
    """(kernel name, arguments) of an activation module the C++ step implements, else None (dnnlab.activations)."""
    row = activations.of(m)
    return row.native_spec(m) if row else None


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
    (None, why not). It takes [Flatten] [Dropout] (Linear -> activation [-> Dropout])* -> Linear with an activation
    that has a kernel (dnnlab.activations), float32 on the CPU, biases everywhere, frozen layers only at the bottom,
    and no hooks."""
    if has_hooks(net):
        return None, "a module has hooks"
    linears, acts, dropout, pending = [], [], [], 0.0
    for m in net.modules():
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
    """Where the compiled library is kept: one folder per source text, torch build and flags (not per install),
    under torch's extension cache ($TORCH_EXTENSIONS_DIR, as torch itself reads it, else torch's default)."""
    # importing torch.utils.cpp_extension warns about a missing CUDA toolkit, which this CPU-only code never needs
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.cpp_extension import get_default_build_root

    key = repr((LAYOUT, torch.__version__, torch.compiled_with_cxx11_abi(), platform.machine(), CFLAGS, LDFLAGS))
    digest = hashlib.sha256(_source() + key.encode()).hexdigest()[:12]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / f"dnnlab_native_{digest}"


@functools.cache
def _source() -> bytes:
    """The C++ source as this process first read it: the text hashed into the folder's name is the text compiled,
    even where the file is edited meanwhile."""
    return SOURCE.read_bytes()


@contextlib.contextmanager
def _build_lock(folder: Path):
    """Held while a process builds into `folder`: an flock, which the kernel drops when its holder dies, so a build
    killed halfway never blocks the next one. (Torch's own lock, in versions that use FileBaton, is a file whose mere
    existence makes every later build wait forever; it only ever lives in a build's private folder here.)"""
    with open(folder / "build.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # waits only for a live build of this same library
        yield  # closing the file releases the lock


def _build(folder: Path) -> None:
    """Compile and load the library in a private folder, then move it into `folder`: only a complete library ever
    appears under its name there. The caller holds the build lock, so the private folders of earlier builds were
    left by killed ones and go first."""
    from torch.utils.cpp_extension import load

    for left in folder.glob("build-*"):
        shutil.rmtree(left, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=folder))
    try:
        source = work / SOURCE.name
        source.write_bytes(_source())
        built = load("dnnlab_native", [str(source)], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                     build_directory=str(work), is_python_module=False, verbose=False)  # (it appends to the lists)
        built = built or work / "dnnlab_native.so"  # (torch 2.4 returns None; the library has this name)
        os.replace(built, folder / LIBRARY)  # (this process keeps the library it loaded: the same inode)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _identity(library: Path) -> tuple[int, int] | None:
    """Which file stands at `library` (inode, modification time), or None: a replaced library is another file."""
    try:
        st = library.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _loads(library: Path) -> bool:
    """Load a library built before; False, with a warning, where it cannot be (then it is built again)."""
    try:
        torch.ops.load_library(str(library))
    except OSError as e:
        log.warning("dnnlab's native training step in %s could not be loaded (%s): building it again", library, e)
        return False
    return True


@functools.cache
def available() -> str:
    """Load the C++ step, building it the first time; "" when it is ready, else why it is not (no compiler, ...).
    A library built before, by any install, loads without ninja and without a lock: nothing waits."""
    if hasattr(torch.ops.dnnlab, "mlp_step"):
        return ""
    try:
        folder = build_directory()
        folder.mkdir(parents=True, exist_ok=True)
        library = folder / LIBRARY
        before = _identity(library)
        if before and _loads(library):
            return ""
        with _build_lock(folder):
            now = _identity(library)  # another process built (or rebuilt a broken) one while this one waited
            if now and now != before and _loads(library):
                return ""
            log.info("building dnnlab's native training step (once per machine and torch version, about 10 s)")
            _build(folder)
    except Exception as e:  # no compiler, no ninja, a failed build: the autograd path still trains
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"it could not be built ({first})"
    return ""


class NativeStep:
    """`step(idx)`: forward, loss and backward of the batch `x_all[idx]`, the gradients left in the parameters'
    .grad (allocated here as views of one flat tensor; overwritten every step), the batch's loss and hits added to
    loss_sum and correct. Returns the batch's mean loss and whether the step also took the optimizer's update.
    With `update` (an flat_adam.DirectStep whose flat tensors are ready, from the step after torch's first), the C++
    step takes Adam's update as well, with the arithmetic of torch's fused kernel, bit for bit: a separate update
    call's Python and dispatch cost about 5 % of a default step. The caller leaves `update` out where anything
    must change the gradients between the backward pass and the update (penalties, clipping), and where this
    torch's kernel computes otherwise (update_in_step)."""

    def __init__(self, p: Plan, x_all: torch.Tensor, y_all: torch.Tensor, loss_sum: torch.Tensor,
                 correct: torch.Tensor, update: flat_adam.DirectStep | None = None):
        trainable = p.linears[p.first_trainable:]
        params = [param for lin in trainable for param in (lin.weight, lin.bias)]
        if (any(q.grad is None or q.grad.shape != q.shape for q in params)
                or flat_adam.span([q.grad for q in params]) is None):
            for q, grad in zip(params, flat_adam.pack([torch.zeros_like(q) for q in params])):
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


# The variants of fused Adam the trainer hands the C++ step: plain, L2 weight decay with maximize, and AdamW.
UPDATE_CHECKS = ((torch.optim.Adam, {}), (torch.optim.Adam, {"weight_decay": 0.01, "maximize": True}),
                 (torch.optim.AdamW, {"weight_decay": 0.01}))


def _adam_run(adam: type, settings: dict, in_step: bool) -> tuple[list[torch.Tensor], int]:
    """Four steps of fused `adam` on a small network through the C++ step, the update taken there (in_step) or by
    torch's fused kernel through flat_adam.DirectStep, as the trainer does without it: (the parameters and optimizer
    state after, the updates the C++ step took). Uses the global generator: the caller keeps its state."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(24, 13), nn.ELU(), nn.Linear(13, 3))  # 367 parameters: vectors and a scalar tail
    params = list(net.parameters())
    flat_adam.pack_parameters_(params)
    opt = adam(params, lr=0.01, eps=1e-7, fused=True, **settings)
    direct = flat_adam.DirectStep(opt)
    x, y = torch.randn(64, 24), torch.randint(0, 3, (64,))
    step = NativeStep(plan(net)[0], x, y, torch.zeros(()), torch.zeros((), dtype=torch.long),
                      direct if in_step else None)
    taken = 0
    for k in range(4):
        beta1 = 0.3 if k == 2 else 0.9  # (torch's lerp takes another formula below 0.5)
        opt.param_groups[0]["lr"], opt.param_groups[0]["betas"] = 0.01 / (k + 1), (beta1, 0.999)
        _, done = step(torch.arange(16 * k, 16 * (k + 1)))
        if not done:
            direct()  # torch's own first step creates the state
        taken += done
    state = opt.state_dict()["state"]
    return [p.detach() for p in params] + [state[i][n] for i in state for n in ("step", "exp_avg", "exp_avg_sq")], taken


def update_differs() -> str:
    """"" where the C++ step's Adam/AdamW update gives torch's fused kernel's numbers on this torch and CPU, bit for
    bit, else how it does not. Its arithmetic copies torch 2.14's kernel operation for operation, which another torch
    version may change."""
    # One thread: both updates work element by element, so the count changes no number (test_native), while on a
    # busy machine waking a second thread costs 20 times the check itself.
    why = available()
    if why:
        return f"the C++ step is not available ({why})"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # the run's random numbers stay as they were
            for adam, settings in UPDATE_CHECKS:
                (ours, taken), (torchs, _) = _adam_run(adam, settings, True), _adam_run(adam, settings, False)
                if not taken:
                    return "the C++ step took no update in the check"
                if len(ours) != len(torchs) or not all(map(torch.equal, ours, torchs)):
                    return f"{adam.__name__}{settings or ''} differs from torch {torch.__version__}'s fused kernel"
    except Exception as e:  # the op or torch's optimizer changed: torch's kernel is the safe choice
        return f"the check failed ({type(e).__name__}: {e})"
    finally:
        torch.set_num_threads(threads)
    return ""


@functools.cache
def update_in_step() -> bool:
    """Whether the C++ step may take Adam's update itself (NativeStep's `update`, stack_step's): checked once per
    process (update_differs), and only when a run would hand it the update. Elsewhere the C++ step still runs the
    forward and backward pass and torch's kernel takes the update: the same numbers, a little slower."""
    why = update_differs()
    if why:
        log.debug("optimizer update: torch's fused kernel after the C++ step (its own update is not used: %s)", why)
    return not why


# {a run's output layer: the fallback reasons told}; weak, so that it keeps no finished run's network alive
_told: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


def _tell_fallback(net: nn.Module, why: str) -> None:
    """Say at INFO why a run trains with autograd: it is slower, and a setting that rules the C++ step out (an
    activation without a kernel, diagnostics) should not cost that unseen. Once per run and reason, though the
    trainer asks again for each training phase: a run's phases share its output layer (the last module of `net`),
    and a new run builds a new one."""
    told = _told.setdefault(list(net.modules())[-1], set())
    if why not in told:
        told.add(why)
        log.info("training step: autograd (native step not used: %s)", why)


def choose(setting, net: nn.Module, device: torch.device, reasons_off: list[str]) -> Plan | None:
    """The plan for `trainer.native` (auto, true or false), or None for the autograd path. `reasons_off` are the
    run's settings that need autograd (diagnostics, compile, bf16). With auto, the reason for autograd is logged
    at INFO; with true, anything that rules the C++ step out is an error."""
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
        _tell_fallback(net, why)
        return None
    return p


if __name__ == "__main__":  # python -m dnnlab.fast.native: build ahead of the first run, and say where it stands
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    reason = available()
    print(f"dnnlab native training step: {'ready in ' + str(build_directory()) if not reason else reason}")
    raise SystemExit(1 if reason else 0)
