"""CIFAR-10 batches: the binary format, and the Python format through a restricted unpickler.

The Python batches are pickles; only the array, bytes, list and dict types those
files hold are admitted, and a file that asks for anything else is rejected as
unsafe without running it.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ticketlab.errors import DataError

from .formats import read_bytes

CIFAR_RECORD = 1 + 3 * 32 * 32  # label byte, then R, G, B planes of 32x32


def read_cifar_bin(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10 binary batch: images (N, 3, 32, 32) uint8 and labels (N,) uint8."""
    path = Path(path)
    data = read_bytes(path)
    if not data or len(data) % CIFAR_RECORD:
        raise DataError(
            f"{path} is corrupt: {len(data)} bytes is not a whole number of "
            f"{CIFAR_RECORD}-byte CIFAR-10 records"
        )
    records = np.frombuffer(bytearray(data), dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].copy()


class SafeUnpickler(pickle.Unpickler):
    """Admits only what CIFAR-10 python batches contain: numpy arrays (and their dtype),
    dicts, lists, bytes and numbers. Anything else could run code while unpickling."""

    def __init__(self, file, path: str | Path, **kwargs):
        super().__init__(file, **kwargs)
        self.path = path

    def find_class(self, module: str, name: str):
        found = _allowed_globals().get((module, name))
        if found is None:
            raise DataError(
                f"{self.path} asks for {module}.{name}: refusing to unpickle unsafe content"
            )
        return found


def _allowed_globals() -> dict:
    import _codecs

    try:  # numpy >= 2 moved the implementation to numpy._core
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    # Files pickled by numpy 1.x (the official ones) name numpy.core, newer ones numpy._core;
    # both resolve to the same functions without importing the deprecated alias.
    allowed = {}
    for pkg in ("numpy.core", "numpy._core"):
        allowed[(f"{pkg}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{pkg}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    # Protocol-2 pickles written by Python 3 encode bytes through _codecs.encode.
    allowed[("_codecs", "encode")] = _codecs.encode
    return allowed


def read_cifar_py(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10 python batch (pickled dict with b'data' and b'labels'), read through
    SafeUnpickler: images (N, 3, 32, 32) uint8 and labels (N,) int64."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            batch = SafeUnpickler(f, path, encoding="bytes").load()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except DataError:
        raise
    except Exception as e:  # any unpickling failure means a damaged file
        raise DataError(f"{path} is corrupt: cannot unpickle ({type(e).__name__})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path} is corrupt: not a CIFAR-10 batch (no b'data'/b'labels')")
    data, labels = batch[b"data"], batch[b"labels"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != CIFAR_RECORD - 1
    ):
        raise DataError(f"{path} is corrupt: b'data' is not a uint8 array of shape (N, 3072)")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{path} is corrupt: b'labels' is not a list of integers") from None
    if labels.shape != (len(data),):
        raise DataError(f"{path} is corrupt: {len(data)} images but {labels.size} labels")
    return data.reshape(-1, 3, 32, 32), labels
