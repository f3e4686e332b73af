"""Reader for the IDX format of the MNIST family, gzipped or not."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from ticketlab.errors import DataError

IDX_UBYTE = 0x08


def read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path} is corrupt: cannot decompress ({e})") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """An unsigned-byte IDX file (plain or .gz) as a uint8 array of the dimensions its header
    declares. The header is checked and the file must hold exactly that much data."""
    path = Path(path)
    data = read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is corrupt: not an IDX file (bad magic number)")
    if data[2] != IDX_UBYTE:
        raise DataError(
            f"{path}: unsupported IDX element type 0x{data[2]:02x} (expected 0x08, unsigned byte)"
        )
    dims_n = data[3]
    if ndim is not None and dims_n != ndim:
        raise DataError(f"{path} is corrupt: {dims_n} dimensions in header, expected {ndim}")
    header = 4 + 4 * dims_n
    if len(data) < header:
        raise DataError(f"{path} is corrupt: truncated header")
    dims = struct.unpack(f">{dims_n}I", data[4:header])
    size = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != size:
        raise DataError(
            f"{path} is corrupt: header declares {size} bytes of data for shape {dims}, "
            f"file holds {len(data) - header} (truncated or wrong file)"
        )
    # bytearray makes the array writable, which torch.from_numpy wants.
    return np.frombuffer(bytearray(data[header:]), dtype=np.uint8).reshape(dims)
