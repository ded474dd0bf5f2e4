"""The two kinds of failure every command reports in one line (no traceback).

`UsageError`: bad input - a config key, a path, a file's line, a tensor's shape, a model name. Every
input error of the project derives from it; the CLI prints `error: <message>` and exits with
status 2.
`RunFailed`: the inputs were fine but the run could not go on (a non-finite loss); exit status 1.
"""


class UsageError(ValueError):
    """Bad input, named in the message with what to do about it."""


class RunFailed(RuntimeError):
    """A run stopped on a condition of its own (the message says where it left its state)."""
