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


class Diverged(Exception):
    """A training phase whose loss became non-finite (exit code 1).

    ``step`` is the step index whose loss was not finite, ``label`` names the
    phase, ``workdir`` is where it trained (or None) and ``metrics`` holds the
    last finite evaluation (its ``step`` included), empty if there was none.
    """

    def __init__(
        self, label: str, step: int, workdir=None, metrics: dict | None = None, note: str = ""
    ):
        self.label, self.step, self.workdir, self.note = label, step, workdir, note
        self.metrics = dict(metrics or {})
        text = f"{label} diverged: the training loss became non-finite at step {step}"
        super().__init__(f"{text} ({note})" if note else text)

    def __reduce__(self):  # crosses from a worker process to the parent
        return (type(self), (self.label, self.step, self.workdir, self.metrics, self.note))


class WorkFailed(Exception):
    """Some of the independent work (replicates in worker processes) failed (exit code 1);
    what finished is stored, and the same command resumes the rest."""
