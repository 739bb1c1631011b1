"""The one exception type that the command line turns into a single line on stderr (no traceback)."""
import argparse
import difflib
import re
import sys


class DnnlabError(Exception):
    """A problem the user can fix: bad config value, missing data file, wrong checkpoint..."""


def bad_value(key: str, value, allowed: str) -> DnnlabError:
    return DnnlabError(f"{key}={value!r} is not allowed: {allowed}")


def nearest(word: str, choices) -> str | None:
    """The known name closest to a misspelt one, for every "did you mean" dnnlab prints; None if none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return close[0] if close else None


class Pruned(Exception):
    """A sweeper's pruner stopped this trial early (not an error: the run is recorded as pruned)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for dnnlab's plain commands: a bad argument is one line on stderr and exit 2 (key=value, what is
    allowed), not the usage text followed by the error."""

    def error(self, message: str):
        from dnnlab.ui import error

        message = re.sub(r"^argument (\S+): (\S+) is not allowed", r"\1=\2 is not allowed", message)
        error(f"{message} ({self.prog} --help)")
        sys.exit(2)


def at_least(lo: int):
    """An argparse type: an integer >= lo, named in the error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{value} is not allowed: an integer >= {lo}")
        return value
    parse.__name__ = f"integer >= {lo}"
    return parse
