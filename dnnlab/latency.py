"""`dnnlab latency RUN_OR_CHECKPOINT`: inference latency of a trained network on the current device, and what lower
precision does to speed, size and accuracy.

Variants: fp32 (as trained); bf16 (weights and inputs in bfloat16, CPU or CUDA); fp16 (CUDA only); int8 (CPU only:
dynamic quantisation of the Linear layers, torch.ao.quantization.quantize_dynamic: int8 weights, activations
quantised on the fly). For each: the median (and 90th percentile) time of one single-image forward pass, of one
batch of --batch-size images and the throughput, the serialized size of the weights, and the test accuracy with
its change against fp32. The timings are wall-clock, after a warm-up, under torch.inference_mode, with
`torch.get_num_threads()` threads (--threads to choose); on CUDA every call is synchronised.

Written to --out (default RUN/latency/): latency.csv/.md, latency.json.
"""
from __future__ import annotations

import copy
import io
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from rich import box
from rich.table import Table
from torch import nn

from dnnlab import checkpoint, validate
from dnnlab.errors import ArgumentParser, DnnlabError, at_least
from dnnlab.record import write_json
from dnnlab.runs import write_table
from dnnlab.train import pick_device
from dnnlab.trained import load_trained, logits_of
from dnnlab.ui import console, error

PRECISIONS = ("fp32", "bf16", "fp16", "int8")


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantisation of every Linear layer (CPU)."""
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:  # removed from torch in favour of torchao
        raise RuntimeError("torch.ao.quantization.quantize_dynamic is not in this torch (torchao has it)") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in recent torch releases, still working
        return quantize_dynamic(copy.deepcopy(model).cpu(), {nn.Linear}, dtype=torch.qint8)


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(model.state_dict(), buffer)
    return buffer.tell()


@torch.inference_mode()
def timings(model: nn.Module, inputs: list[torch.Tensor], repeats: int, warmup: int) -> list[float]:
    """Seconds per call of model(input), cycling through `inputs`."""
    cuda = inputs[0].device.type == "cuda"
    for i in range(warmup):
        model(inputs[i % len(inputs)])
    if cuda:
        torch.cuda.synchronize()
    times = []
    for i in range(repeats):
        x = inputs[i % len(inputs)]
        start = time.perf_counter()
        model(x)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(path, out: Path | None = None, batch_size: int = 256, repeats: int = 300, warmup: int = 30,
            precisions=PRECISIONS, threads: int | None = None, data_root: str | None = None,
            device: str = "auto") -> dict:
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise DnnlabError("--batch-size and --repeats must be >= 1, --warmup >= 0")
    if threads is not None:
        if threads < 1:
            raise DnnlabError(f"--threads={threads} is not allowed: an integer >= 1")
        torch.set_num_threads(threads)
    validate.check_device(device, "--device")
    dev = pick_device(device)
    run = load_trained(path, dev, data_root)
    out = Path(out) if out is not None else run.run_dir / "latency"
    out.mkdir(parents=True, exist_ok=True)
    x, y = run.data.x_test, run.data.y_test
    rows, skipped, base_acc = [], {}, None
    for precision in precisions:
        try:
            model, dtype = variant(run.model, precision, dev)
            model.eval()
            xd = x.to(dtype) if dtype is not None else x
            logits = logits_of(model, xd)
        except RuntimeError as e:  # not on this device / in this torch
            skipped[precision] = str(e).splitlines()[0][:160]
            continue
        acc = (logits.argmax(1) == y).float().mean().item()
        loss = F.cross_entropy(logits, y).item()
        base_acc = acc if precision == "fp32" else base_acc
        singles = [xd[i:i + 1] for i in range(min(256, len(xd)))]
        batches = [xd[i:i + batch_size] for i in range(0, max(1, min(len(xd), 4 * batch_size) - batch_size + 1),
                                                         batch_size)] or [xd[:batch_size]]
        one = timings(model, singles, repeats, warmup)
        many = timings(model, batches, max(10, repeats // 10), max(3, warmup // 10))
        n_batch = len(batches[0])
        rows.append({
            "precision": precision, "single_us": round(statistics.median(one) * 1e6, 1),
            "single_p90_us": round(percentile(one, 0.9) * 1e6, 1),
            f"batch{n_batch}_ms": round(statistics.median(many) * 1e3, 3),
            "images_per_s": round(n_batch / statistics.median(many)),
            "size_kb": round(size_bytes(model) / 1024, 1),
            "test_acc": round(acc, 4), "test_loss": round(loss, 4),
            "acc_change_pp": round((acc - base_acc) * 100, 2) if base_acc is not None else None,
        })
    if not rows:
        raise DnnlabError(f"no precision could run on {dev}: {skipped}")
    title = f"inference latency on {dev} ({torch.get_num_threads()} threads), {run.path}"
    with console.capture():  # the files get every column; the terminal a narrower table
        write_table(rows, out / "latency", title)
    print_table(rows, title, batch_size)
    for precision, why in skipped.items():
        console.print(f"{precision}: skipped ({why})", highlight=False)
    result = {"checkpoint": str(run.path), "device": str(dev), "threads": torch.get_num_threads(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability() if dev.type == "cpu" else None,
              "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
              "batch_size": batch_size, "repeats": repeats, "rows": rows, "skipped": skipped}
    write_json(out / "latency.json", result)
    console.print(f"written to {out}", highlight=False)
    return result


def print_table(rows: list[dict], title: str, batch_size: int) -> None:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    heads = ("precision", "1 image µs", "p90 µs", f"batch {batch_size} ms", "images/s", "size KB", "test acc",
             "Δ pp")
    for h in heads:
        table.add_column(h, justify="left" if h == "precision" else "right")
    for r in rows:
        batch = next(v for k, v in r.items() if k.startswith("batch"))
        table.add_row(r["precision"], f"{r['single_us']:.1f}", f"{r['single_p90_us']:.1f}", f"{batch:.3f}",
                      f"{r['images_per_s']:,}", f"{r['size_kb']:.0f}", f"{r['test_acc']:.4f}",
                      f"{r['acc_change_pp']:+.2f}")
    console.print(table)


def main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="dnnlab latency", description="Single-image and batched inference "
                                     "latency of a trained network, in fp32 and lower precisions.")
    parser.add_argument("run", help=checkpoint.RUN_HELP)
    parser.add_argument("--batch-size", type=at_least(1), default=256, help="images per batched call (256)")
    parser.add_argument("--repeats", type=at_least(1), default=300, help="timed single-image calls (batched: a tenth)")
    parser.add_argument("--warmup", type=at_least(0), default=30, help="untimed calls first")
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
        measure(args.run, args.out, args.batch_size, args.repeats, args.warmup, precisions, args.threads,
                args.data_root, args.device)
    except DnnlabError as e:
        error(str(e))
        sys.exit(2)
