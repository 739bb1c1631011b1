"""`dnnlab export RUN --format safetensors|torchscript|onnx [--out PATH] [--checkpoint best|last]`: a trained
network in a standard format, checked against dnnlab's own predictions before it is kept.

The network is rebuilt from the run as `dnnlab eval` rebuilds it (dnnlab.trained.load_trained: weights_only
loading, the saved config read as data), on the CPU, then written as
- safetensors: the state dict's tensors (metadata: the run's saved config and classes); checked by loading the
  tensors into a fresh network built from the run's saved config;
- torchscript: torch.jit.script (torch.jit.trace where scripting fails); checked through torch.jit.load;
- onnx: torch.onnx.export's exporter (dynamo=True, through torch.export; the opset it picks, 20 with torch 2.14),
  a dynamic batch dimension, input "input" (n, 784) float32, output "logits" (n, classes); checked through
  onnxruntime's CPUExecutionProvider. RReLU is exported as its inference-time LeakyReLU (slope: the range's mean).

The check runs the file as written on the run's test split: every argmax must equal dnnlab's and the largest
|logit difference| must be within ATOL * max(1, largest |logit|). The file is first written (atomically) to a
temporary name beside --out and renamed into place only once it passed, so a failed export or check leaves
nothing behind (and an earlier export at --out as it was). Exit status: 0 passed, 1 the export or check failed,
2 bad input (no such run, unknown format, a missing optional package).
"""
from __future__ import annotations

import copy
import io
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dnnlab import checkpoint, extras
from dnnlab.errors import ArgumentParser, DnnlabError, bad_value, nearest
from dnnlab.model import IN_FEATURES
from dnnlab.trained import Trained, load_trained, logits_of, network
from dnnlab.ui import console, error

FORMATS = {"safetensors": ".safetensors", "torchscript": ".torchscript.pt", "onnx": ".onnx"}
CHECKPOINTS = ("best", "last")
ATOL = 1e-4  # on logits of order 1..10, float32 kernels of another library differ by ~1e-6
FOLDER = "export"  # RUN/export/ holds the exports by default


class CheckFailed(Exception):
    """The export or its check failed: one line, exit 1 (not the user's input, which is a DnnlabError)."""


@dataclass
class Check:
    n: int
    differ: int  # examples whose argmax differs
    max_diff: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.differ == 0 and self.max_diff <= self.tolerance

    def describe(self) -> str:
        same = "identical" if not self.differ else f"{self.differ} of {self.n} differ"
        return (f"{self.n} test examples compared, predictions {same}, max |logit difference| {self.max_diff:.2e} "
                f"(tolerance {self.tolerance:.1e})")


def check_format(name: str) -> str:
    if name not in FORMATS:
        close = nearest(name, FORMATS)
        raise bad_value("--format", name, f"{', '.join(FORMATS)}" + (f"; did you mean {close}?" if close else ""))
    if name in extras.EXPORT_FORMATS:  # before the run is loaded: the one line names the extra
        extras.need(f"--format={name}", *extras.EXPORT_FORMATS[name])
    return name


def checkpoint_of(run: str | Path, which: str | None) -> Path:
    """The checkpoint to export: RUN/checkpoints/{which}.pt of a run folder (best by default), or the file given."""
    found = Path(run).expanduser()
    if not found.is_dir():
        if which is not None:
            raise DnnlabError(f"--checkpoint={which} chooses a checkpoint of a run folder; {run} is not a folder")
        return checkpoint.find(run)
    if which is not None and which not in CHECKPOINTS:
        close = nearest(which, CHECKPOINTS)
        raise bad_value("--checkpoint", which, " or ".join(CHECKPOINTS) + (f"; did you mean {close}?" if close else ""))
    path = found / "checkpoints" / f"{which or 'best'}.pt"
    if not path.is_file():
        other = "last" if (which or "best") == "best" else "best"
        hint = f" (--checkpoint {other} for {other}.pt)" if (found / "checkpoints" / f"{other}.pt").is_file() else ""
        raise bad_value("run", str(run), f"a run folder with checkpoints/{path.name}; this one has none{hint}")
    return path


def target(out: Path | None, run: Trained, fmt: str) -> Path:
    """--out (a file, or an existing folder to write the default name into), else RUN/export/NAME; never the
    checkpoint itself."""
    name = run.path.stem + FORMATS[fmt]
    path = run.run_dir / FOLDER / name if out is None else Path(out).expanduser()
    if path.is_dir():
        path = path / name
    if not path.parent.is_dir() and out is not None:
        raise bad_value("--out", str(out), "a file in an existing folder, or an existing folder")
    if path.exists() and path.resolve() == run.path.resolve():
        raise bad_value("--out", str(out), f"another file than the checkpoint {run.path} itself")
    return path


def inference_copy(model: nn.Module) -> nn.Module:
    """The network as it computes at inference, for the exporters: RReLU's eval-mode slope is fixed at the mean of
    its range, i.e. a LeakyReLU (the ONNX exporter has no random-slope op)."""
    model = copy.deepcopy(model).eval()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.RReLU):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, nn.LeakyReLU((module.lower + module.upper) / 2))
    return model


def to_safetensors(run: Trained) -> bytes:
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()}
    metadata = {"format": "dnnlab-export/1", "config": run.state["config"], "classes": json.dumps(run.classes),
                "checkpoint": run.path.name}
    return save(tensors, metadata=metadata)


def to_torchscript(run: Trained) -> bytes:
    model = inference_copy(run.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates torch.jit, which is still the format
        try:
            scripted = torch.jit.script(model)
        except Exception:  # a module TorchScript cannot compile: an MLP has no control flow, so a trace is exact
            scripted = torch.jit.trace(model, torch.zeros(2, IN_FEATURES))
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
    return buffer.getvalue()


def to_onnx(run: Trained) -> bytes:
    model = inference_copy(run.model)
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        program = torch.onnx.export(model, (torch.zeros(2, IN_FEATURES),), dynamo=True, input_names=["input"],
                                    output_names=["logits"], dynamic_shapes=({0: batch},), verbose=False)
    return program.model_proto.SerializeToString()  # weights inside: an MLP is far below protobuf's 2 GB


WRITERS = {"safetensors": to_safetensors, "torchscript": to_torchscript, "onnx": to_onnx}


def logits_from_file(path: Path, fmt: str, run: Trained, x: torch.Tensor) -> torch.Tensor:
    """The exported file's logits for x, read back by that format's own reader."""
    if fmt == "safetensors":
        from safetensors.torch import load_file

        fresh = network(run.cfg, {"model": load_file(str(path))}, len(run.classes), path).eval()
        return logits_of(fresh, x)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            loaded = torch.jit.load(str(path), map_location="cpu")
        return logits_of(loaded.eval(), x)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = [torch.from_numpy(session.run(None, {name: x[i:i + 8192].numpy()})[0]) for i in range(0, len(x), 8192)]
    return torch.cat(out).float() if out else torch.zeros(0, len(run.classes))


def compare(expected: torch.Tensor, got: torch.Tensor) -> Check:
    n = len(expected)
    if got.shape != expected.shape:
        raise CheckFailed(f"the exported model gives logits of shape {tuple(got.shape)}, dnnlab "
                          f"{tuple(expected.shape)}")
    # NaN counts as an infinite difference
    diff = torch.nan_to_num((got - expected).abs(), nan=float("inf"))
    max_diff = float(diff.max()) if diff.numel() else 0.0
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    differ = int((got.argmax(1) != expected.argmax(1)).sum()) if n else 0
    return Check(n, differ, max_diff, ATOL * max(1.0, scale))


def check_file(path: Path, fmt: str, run: Trained) -> Check:
    x = run.data.x_test.cpu()
    expected = logits_of(run.model, x)
    try:
        got = logits_from_file(path, fmt, run, x)
    except DnnlabError as e:  # safetensors: tensors that do not fit the run's network
        raise CheckFailed(f"the exported tensors do not load into the run's network ({e})") from None
    except Exception as e:  # each reader fails its own way on a damaged file
        raise CheckFailed(f"the exported file does not load with {fmt}'s reader ({type(e).__name__}: "
                          f"{first_line(e)})") from None
    return compare(expected, got)


def first_line(e: Exception) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), "")[:160]


def export_run(run_path: str | Path, fmt: str, out: Path | None = None, which: str | None = None,
               data_root: str | None = None, quiet: bool = False) -> tuple[Path, Check]:
    """Exports, checks and keeps the file; returns (its path, the check). DnnlabError for bad input, CheckFailed
    when the export or its check fails (nothing is then left behind)."""
    fmt = check_format(fmt)
    run = load_trained(checkpoint_of(run_path, which), "cpu", data_root)
    path = target(out, run, fmt)
    made = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.export.tmp{os.getpid()}")  # checkpoint.TEMPORARY: cleaned if killed
    kept = False
    try:
        try:
            data = WRITERS[fmt](run)
        except Exception as e:  # a layer the format cannot express
            raise CheckFailed(f"cannot export {run.path} to {fmt}: {type(e).__name__}: {first_line(e)}") from None
        checkpoint.atomic_write(staged, data)
        try:
            result = check_file(staged, fmt, run)
        except CheckFailed as e:
            raise CheckFailed(f"check failed, {path} not written: {e}") from None
        if not result.passed:
            raise CheckFailed(f"check failed, {path} not written: {result.describe()}")
        os.replace(staged, path)
        kept = True
    finally:
        if not kept:
            staged.unlink(missing_ok=True)
            if made:
                try:
                    path.parent.rmdir()  # the RUN/export folder this call created
                except OSError:
                    pass
    if not quiet:
        console.print(f"{path}: {fmt}, {size_text(path.stat().st_size)}; check passed: {result.describe()}",
                      highlight=False, soft_wrap=True)
    return path, result


def size_text(n: int) -> str:
    return f"{n:,} bytes" if n < 1024 else f"{n / 1024:,.1f} KiB" if n < 1024 ** 2 else f"{n / 1024 ** 2:,.2f} MiB"


def main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="dnnlab export", description="A trained network in a standard format "
                                     "(safetensors, TorchScript, ONNX), checked against dnnlab's predictions on the "
                                     "run's test split.")
    parser.add_argument("run", help="a run directory (its checkpoints/best.pt, or --checkpoint) or a .pt file")
    parser.add_argument("--format", required=True, help="safetensors, torchscript or onnx")
    parser.add_argument("--out", type=Path, help="the file to write, or a folder (default RUN/export/CKPT.EXT)")
    parser.add_argument("--checkpoint", help="best (the default) or last, of a run directory")
    parser.add_argument("--data-root", help="where the dataset is, if not where the run found it")
    args = parser.parse_args(argv)
    try:
        export_run(args.run, args.format, args.out, args.checkpoint, args.data_root)
    except DnnlabError as e:
        error(str(e))
        sys.exit(2)
    except CheckFailed as e:
        error(str(e))
        sys.exit(1)
