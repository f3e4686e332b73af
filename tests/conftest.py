"""Test-wide settings.

The tests train tiny networks, for which one thread is as fast as two and does
not collapse when the machine is shared: OpenMP threads that wait on a busy core
can slow a run twentyfold. Set before torch is imported; subprocesses inherit it.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def run_cli(capsys, *args):
    """Run the command line in-process: (exit code, stdout, stderr)."""
    from ticketlab.cli import main

    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    """The single ``ticketlab: error:`` line a refused command prints."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("ticketlab: error: "), lines[0]
    return lines[0]


@pytest.fixture
def tiny_images(monkeypatch):
    """Tiny 1x12x12 two-class image data that every run loads instead of its dataset."""
    import ticketlab.experiment as experiment_mod
    from ticketlab.data import from_tensors

    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 1, 12, 12, generator=g)
    y = (x[:, 0, :6].mean((1, 2)) > 0).long()
    data = from_tensors(x[:256], y[:256], x[256:], y[256:], val_size=32, name="tiny")
    monkeypatch.setattr(experiment_mod, "load_data", lambda *a, **k: data)
    return data
