"""Errors the command line turns into exit codes."""


class UsageError(Exception):
    """Bad input: an unknown name, an impossible value, missing or corrupt data.

    The command line prints the message on one line and exits with code 2,
    having written nothing.
    """


class DataError(UsageError):
    """A dataset that is missing, corrupt or unsafe to read."""


class RunInterrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after writing a checkpoint (exit code 130)."""
