"""The `dnnlab` command: `dnnlab train [overrides]` and friends."""
from __future__ import annotations

import atexit
import gc
import importlib
import os
import sys

# command: (module, function, the config of a Hydra app (None: plain arguments), one line of help)
COMMANDS = {
    "train": ("dnnlab.train", "main", "train",
              "train a network; a full Hydra app (-m for sweeps, --help lists every group and option)"),
    "pretrain": ("dnnlab.pretrain", "main", "pretrain_app",
                 "pretrain the hidden layers: pretrain=autoencoder (unlabeled) or pretrain=same_digit"),
    "diagnose": ("dnnlab.diagnose", "main", "diagnose_app",
                 "per-layer activations and gradients at initialisation and after a few hundred steps (PNG plots)"),
    "lr-find": ("dnnlab.lr_find", "main", "lr_find_app",
                "learning-rate range test: loss against an exponentially growing rate (PNG), a suggested rate"),
    "eval": ("dnnlab.evaluation", "main", None,
             "RUN: test accuracy, confusion matrix, per-class accuracy; --mc-samples N for MC dropout"),
    "prune": ("dnnlab.sparsity", "main", None, "RUN: weight sparsity, and accuracy against magnitude pruning (PNG)"),
    "latency": ("dnnlab.latency", "main", None,
                "RUN: single-image and batched inference latency in fp32, bf16, int8 (fp16 on CUDA)"),
    "report": ("dnnlab.report", "main", None, "DIR: a table (CSV, Markdown, PNG plots) of a run or a sweep"),
    "reproduce": ("dnnlab.reproduce", "main", None,
                  "rerun every number chapter 11's notebooks print, beside the book's (--list, --only, --seeds)"),
    "bench": ("dnnlab.bench", "main", None,
              "time dnnlab against a DataLoader loop and Keras, stacked sweeps, cached transfer (--help)"),
    "data": ("dnnlab.cli", "data_command", None, "[NAME]: find (or download) mnist or fashion_mnist, print where"),
}


def usage() -> str:
    lines = [f"  {name:<10} {text}" for name, (*_, text) in COMMANDS.items()]
    return "usage: dnnlab COMMAND [args]\n\ncommands:\n" + "\n".join(lines) + "\n"


def data_command(args: list[str]) -> None:
    from dnnlab.data import locate

    for name in args or ["fashion_mnist"]:
        print(f"{name}: {locate(name)}")


def one_line(error: Exception) -> str:
    """Hydra's multi-line composition errors on one line (options listed with commas, search path dropped)."""
    head, *rest = [line for line in str(error).split("\nConfig search path:")[0].splitlines() if line.strip()]
    options = [line.strip() for line in rest if line.startswith("\t")]
    notes = [line.strip() for line in rest if not line.startswith("\t")]
    return "; ".join([head, *notes]) + (" " + ", ".join(options) if options else "")


def main() -> None:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from dnnlab.errors import DnnlabError
    from dnnlab.ui import error

    args = sys.argv[1:]
    command = args[0] if args else None
    if command in (None, "-h", "--help"):
        print(usage())
        return
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        print(f"error: unknown command {command!r}: one of {', '.join(COMMANDS)}{hint} (dnnlab --help)",
              file=sys.stderr)
        sys.exit(2)
    module, function, hydra_app, _ = COMMANDS[command]
    # At exit, the interpreter's garbage collections walk every object torch and Hydra created (about 0.8 s of
    # each command here) only to free memory the process gives back anyway. A frozen heap is skipped; the other
    # exit handlers (logging's) still run after this one, and dnnlab closes its files and writers itself.
    atexit.register(gc.freeze)
    run = getattr(importlib.import_module(module), function)
    try:
        if hydra_app:
            from dnnlab.hydra_guard import check_command_line

            ordered = check_command_line(hydra_app, args[1:])  # what Hydra builds before the task can check it
            sys.argv = [sys.argv[0]] + ordered  # Hydra parses the rest of the command line
            os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # composition errors reach us, to be told on one line
            run()
        else:
            run(args[1:])
    except DnnlabError as e:
        error(str(e))
        sys.exit(2)
    except (HydraException, OmegaConfBaseException) as e:
        error(one_line(e))
        sys.exit(2)
    except OSError as e:  # e.g. a hydra.run.dir that cannot be created
        error(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))
        sys.exit(2)
