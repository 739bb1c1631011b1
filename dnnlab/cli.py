"""The `dnnlab` command: `dnnlab train [overrides]` and friends."""
import sys

USAGE = """usage: dnnlab COMMAND [args]

commands:
  train [overrides]   train a network; a full Hydra app (-m for sweeps, --help lists every group and option)
  pretrain [overrides] pretrain the hidden layers: pretrain=autoencoder (unlabeled) or pretrain=same_digit
  report DIR          a table (and CSV, Markdown, PNG plots) of a run or a sweep directory
  data [NAME]         find (or download) a dataset and print where it is: mnist, fashion_mnist
"""


def data_command(args: list[str]) -> None:
    from dnnlab.data import locate
    from dnnlab.errors import DnnlabError
    from dnnlab.ui import error

    try:
        for name in args or ["fashion_mnist"]:
            print(f"{name}: {locate(name)}")
    except DnnlabError as e:
        error(str(e))
        sys.exit(2)


def main() -> None:
    args = sys.argv[1:]
    command = args[0] if args else None
    if command == "train":
        from dnnlab.train import main as train_main

        sys.argv = [sys.argv[0]] + args[1:]  # Hydra parses the rest of the command line
        train_main()
    elif command == "pretrain":
        from dnnlab.pretrain import main as pretrain_main

        sys.argv = [sys.argv[0]] + args[1:]
        pretrain_main()
    elif command == "report":
        from dnnlab.report import main as report_main

        report_main(args[1:])
    elif command == "data":
        data_command(args[1:])
    elif command in (None, "-h", "--help"):
        print(USAGE)
    else:
        print(f"dnnlab: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
