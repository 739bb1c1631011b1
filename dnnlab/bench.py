"""`dnnlab bench`: how fast dnnlab trains chapter 11's networks, against what users write instead.

    dnnlab bench [--epochs 4] [--rounds 2] [--jobs 8] [--out DIR] [--keras-python PATH | --no-keras] [--quick]

Four tables, printed and written to OUT/bench.json and OUT/bench.md (and one CSV/Markdown pair per table):

1. Training speed on Fashion-MNIST digits 0-4 (the training split's 27,5xx images of those classes, validated on
   the 2,5xx of the validation split) with the default network (5 x 100 ELU, He init, Adam lr 0.001, batch 32).
   Contenders, each in its own process, run alternately (round after round) in this one invocation:
   - dnnlab: `dnnlab train` through its normal code path (dnnlab.runs.run), early stopping off;
   - the loop most PyTorch tutorials write: torchvision's FashionMNIST with ToTensor, a shuffling DataLoader of
     batch 32, the same nn.Sequential network, torch.optim.Adam, and a validation pass each epoch;
   - Keras' model.fit with the same network, when a Python with Keras is given (--keras-python, or
     $DNNLAB_KERAS_PYTHON, or /tmp/dnnlab-keras/bin/python when it exists; it need not have torch or dnnlab).
   Each reports the seconds of every epoch (training plus validation); the table has the median of the epochs
   after the first (warm-up), images per second, peak resident memory, the ratio to dnnlab, and the arithmetic
   floor: the epoch's floating-point operations divided by the matrix-multiply rate measured here (the best of
   all cores and one core, at the start and after every round, so a busy spell does not lower the floor).
2. Stacked sweeps: one job alone (`dnnlab train`), then --jobs jobs of the same network (learning rates and seeds)
   with `dnnlab train -m hydra/launcher=stacked hydra.launcher.cpu=stack`: wall time of the whole command, seconds
   per epoch, and the ratio to the single job.
3. Launchers: one sweep of 8 jobs (4 learning rates x 2 seeds, the default network, all of Fashion-MNIST, early
   stopping off) through the basic launcher, Hydra's joblib launcher (every core), `hydra/launcher=stacked` as it
   is (on a CPU with 2+ cores it hands the sweep to joblib) and with `hydra.launcher.cpu=stack` (one stack),
   alternately: wall time of each command, and each job's distance in validation accuracy from the same job run
   alone.
4. Transfer learning with cached frozen layers (exercise 9: a digits 0-4 network reused for 5-9 with 100 images per
   digit): training seconds with the frozen layers recomputed every step against computed once.

--quick runs everything for 1 measured epoch on whatever data $DNNLAB_DATA (or --data-root) holds, small splits
included (the tests use it on tiny generated files).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from dnnlab.bench_report import markdown, rss_mb, targets
from dnnlab.bench_speed import DEFAULT_KERAS_PYTHON, matmul_rate, speed_section
from dnnlab.bench_sweeps import launcher_section, stacked_section
from dnnlab.bench_transfer import transfer_section
from dnnlab.bench_workers import fashion_folder, worker_main
from dnnlab.errors import ArgumentParser, at_least, bad_value


def check_paths(root: Path, keras: str | None) -> None:
    """The data and the Keras Python the user named are there: refused before anything is written."""
    fashion_folder(root)
    if keras and not (os.path.isfile(keras) and os.access(keras, os.X_OK)):
        raise bad_value("--keras-python", keras, "a Python interpreter that exists and can run")


def machine() -> dict:
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": model, "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "loadavg_at_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--worker" in argv:  # a contender's process, started by spawn()
        return worker_main(argv)
    args = parse_args(argv)
    root = find_data_root(args)
    check_paths(root, args.keras_python)
    os.environ["DNNLAB_DATA"] = str(root)  # where dnnlab's runs, here and in the workers, find their data
    out = args.out or Path("outputs/bench") / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    info, rates = measure_machine()
    report = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    md = markdown_header(args, info)
    with tempfile.TemporaryDirectory() as tmp_name:
        for name, run_section in sections(args, root, Path(tmp_name), out, info, rates):
            if name not in args.skip:
                entries, lines = run_section()
                report.update(entries)
                md += lines
    # a skipped section's targets read as not measured
    checks = targets(report.get("speed", {}).get("rows", []), report.get("stacked", {}).get("rows", []),
                     rss_mb(report.get("default_run")))
    report["targets"] = checks
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    md += [markdown("Targets", checks)]
    md += [f"Load average at the end: {report['machine']['loadavg_at_end'][0]:.2f} (other processes on the machine "
           "slow every contender down; compare ratios from one invocation)."]
    (out / "bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "bench.md").write_text("\n".join(md) + "\n")
    for c in checks:
        print(f"  {'met' if c['met'] else 'NOT met' if c['met'] is False else 'n/a':8} {c['target']}: {c['measured']}")
    print(f"written: {out / 'bench.json'}, {out / 'bench.md'}")


def argument_parser():
    parser = ArgumentParser(prog="dnnlab bench", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, help="holds FashionMNIST/raw and MNIST/raw (default: $DNNLAB_DATA)")
    parser.add_argument("--epochs", type=at_least(1), default=4,
                        help="measured epochs per run, after one warm-up epoch")
    parser.add_argument("--rounds", type=at_least(1), default=2, help="times each contender runs, alternately")
    parser.add_argument("--jobs", type=at_least(1), default=8, help="jobs in the stacked sweep")
    parser.add_argument("--val-size", type=at_least(1), default=5000)
    parser.add_argument("--keras-python", help="a Python that can import keras (default: $DNNLAB_KERAS_PYTHON, "
                                               f"{DEFAULT_KERAS_PYTHON})")
    parser.add_argument("--no-keras", action="store_true")
    parser.add_argument("--dataloader-one-thread", action="store_true",
                        help="also time the DataLoader loop with torch.set_num_threads(1)")
    parser.add_argument("--dataloader-workers", type=at_least(0), default=0,
                        help="also time the DataLoader loop with this many worker processes (PyTorch's CIFAR-10 "
                             "tutorial uses 2)")
    parser.add_argument("--sequential", action="store_true", help="also time the sweep with the basic launcher")
    parser.add_argument("--transfer-seeds", type=at_least(1), default=3)
    parser.add_argument("--skip", action="append", default=[], choices=["speed", "stacked", "launchers", "transfer"])
    parser.add_argument("-o", "--override", action="append", default=[], help="extra override for dnnlab's runs")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="1 measured epoch, 1 round, 2 stacked jobs, 1 seed; "
                                                             "for tiny data (tests)")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = argument_parser().parse_args(argv)
    if args.quick:
        args.epochs, args.rounds, args.transfer_seeds = 1, 1, 1
        args.jobs = min(args.jobs, 2)
        if args.val_size == 5000:
            args.val_size = 100
    return args


def find_data_root(args) -> Path:
    """--data-root, else $DNNLAB_DATA, else the folder above where dnnlab finds Fashion-MNIST; absolute."""
    root = args.data_root or (Path(os.environ["DNNLAB_DATA"]) if os.environ.get("DNNLAB_DATA") else None)
    if root is None:
        from dnnlab.data import locate

        root = locate("fashion_mnist").parent.parent
    return Path(root).resolve()


def measure_machine() -> tuple[dict, list[float]]:
    """machine() with the matrix-product rates on all cores and on one (printed); also the rates, the first the
    arithmetic floor chooses from."""
    info = machine()
    rate_all, rate_one = matmul_rate(info["nproc"]), matmul_rate(1)
    info.update({"matmul_gflops_all_cores": round(rate_all / 1e9, 1), "matmul_gflops_1_thread": round(rate_one / 1e9, 1)})
    print(f"dnnlab bench: {info['nproc']} cores ({info['cpu']}), torch {info['torch']}, matrix products "
          f"{info['matmul_gflops_all_cores']} GFLOP/s on all cores, {info['matmul_gflops_1_thread']} on one; "
          f"load average {info['loadavg_at_start'][0]:.2f}", flush=True)
    return info, [rate_all, rate_one]


def markdown_header(args, info: dict) -> list[str]:
    return [f"# dnnlab bench, {time.strftime('%Y-%m-%d %H:%M')}", "",
            f"Machine: {info['nproc']} cores ({info['cpu']}), torch {info['torch']}, CUDA: {info['cuda'] or 'none'}; "
            f"float32 matrix products {info['matmul_gflops_all_cores']} GFLOP/s on all cores "
            f"({info['matmul_gflops_1_thread']} on one); load average at start "
            f"{info['loadavg_at_start'][0]:.2f}. {args.epochs} measured epochs after 1 warm-up, "
            f"{args.rounds} round(s).", ""]


def sections(args, root: Path, tmp: Path, out: Path, info: dict, rates: list[float]
             ) -> list[tuple[str, Callable[[], tuple[dict, list[str]]]]]:
    """The benchmark's sections, in the order they run and appear in bench.json and bench.md: (the name --skip
    takes, a function that runs the section, writes its CSV/Markdown table and returns its entries of bench.json
    and its lines of bench.md). A new section is one more entry here, with its name among --skip's choices."""
    return [("speed", partial(speed_section, args, root, tmp, out, info, rates)),
            ("stacked", partial(stacked_section, args, root, tmp, out, info["nproc"])),
            ("launchers", partial(launcher_section, args, root, tmp, out, info["nproc"])),
            ("transfer", partial(transfer_section, args, tmp, out))]


if __name__ == "__main__":
    main()
