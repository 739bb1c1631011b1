"""The one exception type that the command line turns into a single line on stderr (no traceback)."""


class DnnlabError(Exception):
    """A problem the user can fix: bad config value, missing data file, wrong checkpoint..."""


def bad_value(key: str, value, allowed: str) -> DnnlabError:
    return DnnlabError(f"{key}={value!r} is not allowed: {allowed}")


class Pruned(Exception):
    """A sweeper's pruner stopped this trial early (not an error: the run is recorded as pruned)."""
