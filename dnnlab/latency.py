"""`dnnlab latency RUN_OR_CHECKPOINT`: inference latency of a trained network on the current device, and what lower
precision does to speed, size and accuracy.

Variants: fp32 (as trained); bf16 (weights and inputs in bfloat16, CPU or CUDA); fp16 (CUDA only); int8 (CPU only,
the optional extra dnnlab[int8]: torchao's dynamic quantisation of the Linear layers, int8 weights per output
channel, activations quantised per row on the fly). For each: the median time and its interquartile range of one
single-image forward pass and of one batch of --batch-size images, the throughput, the serialized size of the
weights, and the test accuracy with its change against fp32. torch.utils.benchmark times the calls
(Timer.blocked_autorange, at least --min-time seconds each, after its own warm-up), under torch.inference_mode,
with `torch.get_num_threads()` threads (--threads to choose); on CUDA the clock waits for the device.

Written to --out (default RUN/latency/): latency.csv/.md, latency.json.
"""
from __future__ import annotations

import copy
import importlib.util
import io
import logging
import math
import re
import sys
import timeit
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from rich import box
from rich.table import Table
from torch import nn

from dnnlab import checkpoint, extras, validate
from dnnlab.errors import ArgumentParser, DnnlabError, at_least
from dnnlab.prepare import pick_device
from dnnlab.record import write_json
from dnnlab.runs import write_table
from dnnlab.trained import load_trained, logits_of
from dnnlab.ui import console, error

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
NEEDS_TORCHAO = extras.needs("int8", "torchao")


@contextmanager
def quiet(logger: str):
    """Only errors from this logger for a while: torch's warnings, on importing a module, that the user can do
    nothing about."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def quantize_int8(model: nn.Module) -> nn.Module:
    """A CPU copy of the model with every Linear layer in int8 (torchao's dynamic quantisation)."""
    try:
        with quiet("torch.utils._pytree"):  # torch 2.14 logs a deprecation of torchao (0.18)'s own code
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
            from torchao.utils import should_reduce_range
    except ImportError as e:
        if importlib.util.find_spec("torchao") is None:
            raise RuntimeError(NEEDS_TORCHAO) from None
        raise RuntimeError(f"torchao does not import with torch {torch.__version__}: {e}") from None
    cpu = torch.device("cpu")
    # set_inductor_config=False: nothing here is compiled, so torch._inductor's global settings stay as they are;
    # reduce_range: CPUs without VNNI saturate int8 products at full range
    config = Int8DynamicActivationInt8WeightConfig(set_inductor_config=False, reduce_range=should_reduce_range(cpu))
    quantized = copy.deepcopy(model).to(cpu)
    quantize_(quantized, config)
    return quantized


def variant(model: nn.Module, precision: str, device: torch.device) -> tuple[nn.Module, torch.dtype | None]:
    """(the model in this precision, the input dtype); RuntimeError if it does not exist on this device."""
    if precision == "fp32":
        return model, None
    if precision == "bf16":
        return copy.deepcopy(model).to(torch.bfloat16), torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise RuntimeError("fp16 only on CUDA (CPUs compute it slowly or not at all)")
        return copy.deepcopy(model).half(), torch.float16
    if precision == "int8":
        if device.type != "cpu":
            raise RuntimeError("int8 dynamic quantisation runs on the CPU only")
        return quantize_int8(model), None
    raise DnnlabError(f"unknown precision {precision!r}: {', '.join(PRECISIONS)}")


def size_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def clock(device: torch.device):
    """The Timer's clock: on CUDA it first waits for this device's queued kernels, so that a block of calls is
    timed to its end; a CPU measurement has nothing to wait for."""
    if device.type != "cuda":
        return timeit.default_timer

    def synchronised() -> float:
        torch.cuda.synchronize(device)
        return timeit.default_timer()

    return synchronised


def timing(model: nn.Module, x: torch.Tensor, threads: int, min_time: float) -> tuple[float, float]:
    """(median, interquartile range) of the seconds one call model(x) takes."""
    with quiet("torch.utils.cpp_extension"):  # imported by the benchmark: warns about a CUDA toolkit without a GPU
        from torch.utils import benchmark
    timer = benchmark.Timer("model(x)", globals={"model": model, "x": x}, num_threads=threads, timer=clock(x.device))
    with torch.inference_mode():  # the Timer runs the calls in this thread, so they run without autograd
        measurement = timer.blocked_autorange(min_run_time=min_time)
    return measurement.median, measurement.iqr


def latency(model: nn.Module, x: torch.Tensor, batch_size: int, threads: int, min_time: float) -> dict:
    """The timing columns of one variant (x in its input dtype): one image and one batch, median and IQR."""
    single, single_iqr = timing(model, x[:1], threads, min_time)
    batch = x[:batch_size]
    many, many_iqr = timing(model, batch, threads, min_time)
    n = len(batch)
    return {"single_us": round(single * 1e6, 1), "single_iqr_us": round(single_iqr * 1e6, 1),
            f"batch{n}_ms": round(many * 1e3, 3), f"batch{n}_iqr_ms": round(many_iqr * 1e3, 3),
            "images_per_s": round(n / many)}


def measure(path, out: Path | None = None, batch_size: int = 256, min_time: float = 0.2, precisions=PRECISIONS,
            threads: int | None = None, data_root: str | None = None, device: str = "auto") -> dict:
    if batch_size < 1:
        raise DnnlabError(f"--batch-size={batch_size} is not allowed: an integer >= 1")
    if not 0 < min_time < math.inf:
        raise DnnlabError(f"--min-time={min_time} is not allowed: a finite number of seconds > 0")
    if threads is not None and threads < 1:
        raise DnnlabError(f"--threads={threads} is not allowed: an integer >= 1")
    threads = threads or torch.get_num_threads()
    validate.check_device(device, "--device")
    dev = pick_device(device)
    run = load_trained(path, dev, data_root)
    out = Path(out) if out is not None else run.run_dir / "latency"
    out.mkdir(parents=True, exist_ok=True)
    rows, skipped, base_acc = [], {}, None
    for precision in precisions:
        try:
            model, dtype = variant(run.model, precision, dev)
            model.eval()
            x, y = (run.data.x_test.to(dtype) if dtype is not None else run.data.x_test), run.data.y_test
            logits = logits_of(model, x)
        except RuntimeError as e:  # not on this device, in this torch, or without the optional package
            skipped[precision] = str(e).splitlines()[0][:160]
            continue
        acc = (logits.argmax(1) == y).float().mean().item()
        base_acc = acc if precision == "fp32" else base_acc
        rows.append({
            "precision": precision, **latency(model, x, batch_size, threads, min_time),
            "size_kb": round(size_bytes(model) / 1024, 1), "test_acc": round(acc, 4),
            "test_loss": round(F.cross_entropy(logits, y).item(), 4),
            "acc_change_pp": round((acc - base_acc) * 100, 2) if base_acc is not None else None,
        })
    if not rows:
        raise DnnlabError(f"no precision could run on {dev}: {skipped}")
    title = f"inference latency on {dev} ({threads} threads), {run.path}"
    with console.capture():  # the files get every column; the terminal a narrower table
        write_table(rows, out / "latency", title)
    print_table(rows, title)
    for precision, why in skipped.items():
        # plain text: rich would take the [int8] of pip's extra for markup; one line even on a narrow terminal
        console.print(f"{precision}: skipped ({why})", markup=False, highlight=False, soft_wrap=True)
    result = {"checkpoint": str(run.path), "device": str(dev), "threads": threads,
              "cpu_capability": torch.backends.cpu.get_cpu_capability() if dev.type == "cpu" else None,
              "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
              "batch_size": batch_size, "min_time_s": min_time, "rows": rows, "skipped": skipped}
    write_json(out / "latency.json", result)
    console.print(f"written to {out}", highlight=False)
    return result


def print_table(rows: list[dict], title: str) -> None:
    # the batch's size from its column: smaller than --batch-size when the test set is
    n = next(m.group(1) for k in rows[0] if (m := re.fullmatch(r"batch(\d+)_ms", k)))
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    heads = ("precision", "1 image µs", "IQR µs", f"batch {n} ms", "IQR ms", "images/s", "size KB", "test acc", "Δ pp")
    for h in heads:
        table.add_column(h, justify="left" if h == "precision" else "right")
    for r in rows:
        table.add_row(r["precision"], f"{r['single_us']:.1f}", f"{r['single_iqr_us']:.1f}",
                      f"{r[f'batch{n}_ms']:.3f}", f"{r[f'batch{n}_iqr_ms']:.3f}", f"{r['images_per_s']:,}",
                      f"{r['size_kb']:.0f}", f"{r['test_acc']:.4f}", f"{r['acc_change_pp']:+.2f}")
    console.print(table)


def main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="dnnlab latency", description="Single-image and batched inference "
                                     "latency of a trained network, in fp32 and lower precisions.")
    parser.add_argument("run", help=checkpoint.RUN_HELP)
    parser.add_argument("--batch-size", type=at_least(1), default=256, help="images per batched call (256)")
    parser.add_argument("--min-time", type=float, default=0.2, metavar="SECONDS",
                        help="timed seconds at least per measurement, after the warm-up (0.2)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help="comma-separated subset of fp32,bf16,fp16,int8 (the ones this device lacks are skipped)")
    parser.add_argument("--threads", type=at_least(1), help="CPU threads (default: torch's, all cores)")
    parser.add_argument("--out", type=Path, help="output folder (default RUN/latency)")
    parser.add_argument("--data-root", help="where the dataset is, if not where the run found it")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
        unknown = [p for p in precisions if p not in PRECISIONS]
        if unknown or not precisions:
            raise DnnlabError(f"--precisions={args.precisions} is not allowed: a comma-separated subset of "
                              f"{','.join(PRECISIONS)}")
        precisions = ["fp32"] + [p for p in precisions if p != "fp32"]  # the reference for the accuracy change
        measure(args.run, args.out, args.batch_size, args.min_time, precisions, args.threads, args.data_root,
                args.device)
    except DnnlabError as e:
        error(str(e))
        sys.exit(2)
