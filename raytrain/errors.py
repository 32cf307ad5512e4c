"""The one exception family a user can cause: its message is one sentence naming the bad value
and what would be right, shown without a traceback, exit code 2. Anything else is a bug."""


class UserError(Exception):
    """Bad input, an unusable cluster or storage, a bad checkpoint."""
