"""The `dnnlab` command: `dnnlab train [overrides]` and friends."""
from __future__ import annotations

import atexit
import gc
import importlib
import os
import re
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
    "export": ("dnnlab.export", "main", None,
               "RUN --format safetensors|torchscript|onnx: the network in a standard format, checked on the test split"),
    "report": ("dnnlab.report", "main", None, "DIR: a table (CSV, Markdown, PNG plots) of a run or a sweep"),
    "reproduce": ("dnnlab.reproduce", "main", None,
                  "rerun every number chapter 11's notebooks print, beside the book's (--list, --only, --seeds)"),
    "bench": ("dnnlab.bench", "main", None,
              "time dnnlab against a DataLoader loop and Keras, stacked sweeps, cached transfer (--help)"),
    "data": ("dnnlab.cli", "data_command", None, "[NAME]: find (or download) mnist or fashion_mnist, print where"),
    "completion": ("dnnlab.completion", "main", None,
                   'bash|zsh|fish: tab completion of commands, groups, options and keys: eval "$(dnnlab completion '
                   'bash)"'),
}
SHELL_COMPLETION = ("-sc", "--shell-completion")  # Hydra's flag, which --hydra-help tells to run as `dnnlab -sc ...`


def usage() -> str:
    lines = [f"  {name:<10} {text}" for name, (*_, text) in COMMANDS.items()]
    return "usage: dnnlab COMMAND [args]\n\ncommands:\n" + "\n".join(lines) + "\n"


def data_command(args: list[str]) -> None:
    from dnnlab.data import locate

    for name in args or ["fashion_mnist"]:
        print(f"{name}: {locate(name)}")


def one_line(error: Exception) -> str:
    """Hydra's multi-line composition errors on one line: its sentences joined as sentences, options listed with
    commas, the search path dropped; a parse error names the override it could not parse."""
    text = str(error).split("\nConfig search path:")[0]
    if text.startswith("Error merging override") and error.__cause__ is not None:  # what was wrong with it
        text += ": " + str(error.__cause__).splitlines()[0]
    override = getattr(error, "override", None)  # OverrideParseException's
    if override is not None:
        text = f"cannot parse {override!r}: " + re.sub(r"^LexerNoViableAltException: .*\n *\^", "unexpected text",
                                                     text)
    head, *rest = [line for line in text.splitlines() if line.strip()]
    options = [line.strip() for line in rest if line.startswith("\t")]
    for note in (line.strip() for line in rest if not line.startswith("\t")):
        # a line that ends a sentence is followed by a space; one that does not, by a full stop or a semicolon
        head += " " if head.endswith((".", ":", "!", "?")) else ". " if note[:1].isupper() else "; "
        head += note
    return head + (" " + ", ".join(options) if options else "")


def main() -> None:
    args = sys.argv[1:]
    command = args[0] if args else None
    if command in (None, "-h", "--help"):
        print(usage())
        return
    if command not in COMMANDS and command not in SHELL_COMPLETION:
        from dnnlab.errors import nearest

        close = nearest(command, COMMANDS)
        hint = f"; did you mean {close}?" if close else ""
        print(f"error: unknown command {command!r}: one of {', '.join(COMMANDS)}{hint} (dnnlab --help)",
              file=sys.stderr)
        sys.exit(2)
    try:
        start(command, args[1:])
    except Exception as e:
        message = refusal(e)
        if message is None:
            raise
        from dnnlab.ui import error

        error(message)
        sys.exit(2)


def start(command: str, args: list[str]) -> None:
    hydra_app = COMMANDS[command][2] if command in COMMANDS else None
    if command in SHELL_COMPLETION or (hydra_app and set(SHELL_COMPLETION) & set(args)):
        from dnnlab.completion import shell_completion

        shell_completion(args, hydra_app)  # before the command's module: tab completion imports no torch
        return
    module, function, *_ = COMMANDS[command]
    # At exit, the interpreter's garbage collections walk every object torch and Hydra created (about 0.8 s of
    # each command here) only to free memory the process gives back anyway. A frozen heap is skipped; the other
    # exit handlers (logging's) still run after this one, and dnnlab closes its files and writers itself.
    atexit.register(gc.freeze)
    run = getattr(importlib.import_module(module), function)
    # The same objects (torch's and Hydra's modules, a few hundred thousand) live as long as the process: frozen, the
    # collections that allocations trigger while it runs skip them (drawing one learning-curves PNG went from 1.9 s
    # to well under a second here, most of it in collections of that heap).
    gc.freeze()
    if hydra_app:
        from dnnlab.hydra_guard import check_command_line

        ordered = check_command_line(hydra_app, args)  # what Hydra builds before the task can check it
        sys.argv = [sys.argv[0]] + ordered  # Hydra parses the rest of the command line
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # composition errors reach us, to be told on one line
        run()
    else:
        run(args)


def refusal(e: Exception) -> str | None:
    """The one line that refuses a command line, for the errors that say what is wrong with it; None for the
    others (a bug, whose traceback is shown)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from dnnlab.errors import DnnlabError

    if isinstance(e, DnnlabError):
        return str(e)
    if isinstance(e, (HydraException, OmegaConfBaseException)):
        return one_line(e)
    if isinstance(e, OSError):  # e.g. a hydra.run.dir that cannot be created
        return f"{e.strerror or e}: {e.filename}" if e.filename else str(e)
    return None
