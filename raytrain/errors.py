"""The one exception family a user can cause, and the exit codes.

A UserError's message is one sentence naming the bad value and what would be right; the command
line prints it as ``raytrain: error: ...`` without a traceback and exits with EXIT_USAGE. Anything
else is a bug and keeps its traceback.
"""

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UserError(Exception):
    """Bad input, an unusable cluster or storage, a bad checkpoint."""


class TrainingStopped(Exception):
    """Training that stopped itself because it cannot go on (a loss that became NaN or
    infinite): reported in one line with what to try, exit code EXIT_FAILED."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type's name if it has none), for one-line
    reports of errors raised by libraries."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def one_line(error: BaseException, limit: int = 400) -> str:
    """An exception's whole message on one line (an AWS error spreads its reason over several),
    cut at ``limit`` characters; its type's name if it has none."""
    text = " ".join(str(error).split())
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return text or type(error).__name__
