"""The run store: one directory per spec hash, atomic writes, a lock, results.csv.

Every file is written to a temporary name in the same directory and renamed,
so a crash leaves either the old file or the new one. Tensors are safetensors,
metadata JSON; nothing is unpickled from disk. The weights of a pruned network are
stored compactly, as kept values plus a bit-packed mask or CSR indices
(:func:`save_state`), and :func:`load_state` reads every version.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import socket
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ._version import __version__
from .errors import DataError, UsageError

RESULT_COLUMNS = [
    "method",
    "replicate",
    "level",
    "variant",
    "density",
    "density_all",
    "compression_ratio",
    "flops_speedup",
    "effective_density",
    "test_accuracy",
    "test_loss",
    "test_accuracy_at_best_val",
    "val_accuracy",
    "val_loss",
    "best_val_step",
    "train_loss",
    "train_accuracy",
    "steps",
    "train_seconds",
    "status",
]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary file name beside ``path``; rename it over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is corrupt (not valid JSON: {exc})") from None


def write_csv(path: str | os.PathLike, rows: list[dict], columns: list[str]) -> None:
    extra = sorted({k for r in rows for k in r} - set(columns))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns + extra, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(v) for k, v in r.items()})


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def read_csv(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock file holding ``host pid``.

    A lock whose process is gone (same host, pid not alive) is stale and is
    taken over; a live one makes the second process refuse.
    """

    def __init__(self, directory: Path):
        self.path = Path(directory) / "lock"
        self.held = False

    def acquire(self) -> None:
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    host, pid = self.path.read_text().split()
                    pid = int(pid)
                except (FileNotFoundError, ValueError):
                    host, pid = socket.gethostname(), -1
                if host == socket.gethostname() and (pid <= 0 or not _pid_alive(pid)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)  # stale: its process is gone
                    continue
                raise UsageError(
                    f"run {self.path.parent} is locked by process {pid} on {host}; "
                    f"if that process is gone, delete {self.path}"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return
        raise UsageError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def write_spec(
    run_dir: str | os.PathLike, identity: dict, hash: str, spec: dict, steps_per_epoch: int
) -> None:
    """``spec.json``: the run's identity and hash, its resolved spec and the package version."""
    write_json(
        Path(run_dir) / "spec.json",
        {
            "identity": identity,
            "hash": hash,
            "spec": spec,
            "steps_per_epoch": steps_per_epoch,
            "version": __version__,
        },
    )


def diff_specs(stored: dict, current: dict) -> list[str]:
    keys = sorted(set(stored) | set(current))
    return [
        f"{k}: stored {stored.get(k)!r}, now {current.get(k)!r}"
        for k in keys
        if stored.get(k) != current.get(k)
    ]


def open_run(
    runs_dir: str | os.PathLike,
    method: str,
    digest: str,
    identity: dict,
    resolved: dict,
    not_hashed=frozenset(),
) -> Path:
    """The run directory for a spec; refuse if a stored spec means something else.

    Both the hashed identity and every resolved field must agree, so a changed
    default never silently changes a run's meaning. A field the stored spec does
    not have (a knob added later) is not compared.
    """
    directory = Path(runs_dir) / f"{method}-{digest}"
    spec_path = directory / "spec.json"
    if spec_path.exists():
        stored_all = read_json(spec_path)
        stored = stored_all.get("identity", {})
        diff = diff_specs(stored, identity)
        old = stored_all.get("spec", {})
        diff += [
            f"{k}: stored {old[k]!r}, now {v!r}"
            for k, v in resolved.items()
            if k in old and k not in not_hashed and k not in identity and old[k] != v
        ]
        if diff:
            raise UsageError(
                f"run {directory} holds a different experiment ({'; '.join(diff)}); "
                "use another --runs-dir"
            )
    return directory


# tensors on disk ----------------------------------------------------------------
#
# A weight file of a pruned network holds mostly zeros. ``save_state`` with a mask
# stores such a tensor compactly, as the better of
#
#   bitmask: the kept places as bits (1 bit per entry) and the kept values;
#   csr:     per row of the tensor viewed as (shape[0], -1), the kept column indices
#            (int16 where the rows are at most 32768 long) and the kept values;
#
# and every other tensor as it is. The file stays plain safetensors: the compact
# tensors' parts are stored under ``<name>::values`` (``::bits``, ``::indptr``,
# ``::indices``) and the ``compact`` entry of the metadata (see :func:`file_layout`)
# says how to rebuild them.
# Values are copied as bits, never computed on, so they come back bit for bit.

COMPACT_FORMAT = "ticketlab-compact/1"
_SEP = "::"
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_MIN_COMPACT = 64  # smaller tensors (biases of small layers, scalars) stay dense
# safetensors' names of the torch dtypes a layout names, and their bytes per element
_ST_NAMES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16",
    "float16": "F16", "bfloat16": "BF16", "int32": "I32", "uint32": "U32", "float32": "F32",
    "int64": "I64", "uint64": "U64", "float64": "F64",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}  # fmt: skip
_ST_SIZES = {
    **dict.fromkeys(("BOOL", "U8", "I8", "F8_E4M3", "F8_E5M2"), 1),
    **dict.fromkeys(("I16", "U16", "F16", "BF16"), 2),
    **dict.fromkeys(("I32", "U32", "F32"), 4),
    **dict.fromkeys(("I64", "U64", "F64"), 8),
}


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    """The same bytes as integers (the bit patterns of floats, so -0.0 and NaN payloads
    are kept)."""
    return t.view(_INT_VIEW[t.element_size()])


def _encode(t: torch.Tensor, keep: torch.Tensor | None):
    """``(encoding, parts)`` for a compact copy of ``t``, or None where dense is smaller.

    The kept places are the entries whose bits are not all zero, and, with a ``keep``
    mask, only those the mask keeps or whose value is not zero: a pruned weight is
    +0.0 or -0.0, and reads back as +0.0. (A bool tensor keeps its True entries.)
    """
    if t.numel() < _MIN_COMPACT or t.is_complex() or t.element_size() not in _INT_VIEW:
        return None
    bits = _as_bits(t).reshape(-1)
    if keep is not None and t.dtype != torch.bool:
        keep = keep.detach().to("cpu", torch.bool).reshape(-1)
        if keep.numel() != bits.numel():
            return None
        kept = keep | (t.reshape(-1) != 0)
    else:
        kept = bits != 0
    n, nnz, size = bits.numel(), int(kept.sum()), t.element_size()
    rows = t.shape[0] if t.dim() >= 2 else 1
    cols = n // rows
    index_dtype = torch.int16 if cols <= 32768 else torch.int32
    ptr_dtype = torch.int32 if n < 2**31 else torch.int64
    value_size = 0 if t.dtype == torch.bool else size  # a kept bool is True
    dense = n * size
    bitmask = (n + 7) // 8 + nnz * value_size
    csr = (rows + 1) * ptr_dtype.itemsize + nnz * (value_size + index_dtype.itemsize)
    if min(bitmask, csr) >= dense:
        return None
    parts = {}
    if value_size:
        parts["values"] = bits[kept].view(t.dtype)
    if bitmask <= csr:
        packed = np.packbits(kept.numpy(), bitorder="little")
        parts["bits"] = torch.from_numpy(packed)
        return "bitmask", parts
    grid = kept.view(rows, cols)
    indptr = torch.zeros(rows + 1, dtype=torch.int64)
    torch.cumsum(grid.sum(1), 0, out=indptr[1:])
    parts["indptr"] = indptr.to(ptr_dtype)
    parts["indices"] = grid.nonzero()[:, 1].to(index_dtype)
    return "csr", parts


def _decode(name: str, info: dict, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    dtype = getattr(torch, info["dtype"])
    shape = [int(s) for s in info["shape"]]
    n = math.prod(shape)
    ints = _INT_VIEW[dtype.itemsize]
    out = torch.zeros(n, dtype=ints)
    if info["encoding"] == "bitmask":
        bits = parts["bits"].numpy()
        if bits.size != (n + 7) // 8:
            raise ValueError(f"{name}: {bits.size} mask bytes for {n} entries")
        where = torch.from_numpy(np.unpackbits(bits, count=n, bitorder="little").view(bool))
    elif info["encoding"] == "csr":
        indptr, indices = parts["indptr"].long(), parts["indices"].long()
        rows = indptr.numel() - 1
        cols = n // rows if rows > 0 else 0
        counts = indptr.diff()
        if rows <= 0 or int(indptr[-1]) != indices.numel() or bool((counts < 0).any()):
            raise ValueError(f"{name}: inconsistent row pointers")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= cols):
            raise ValueError(f"{name}: column index out of range")
        row = torch.repeat_interleave(torch.arange(rows), counts)
        where = row * cols + indices
    else:
        raise ValueError(f"{name}: unknown encoding {info['encoding']!r}")
    if dtype == torch.bool:
        out[where] = 1
    else:
        values = parts["values"]
        if values.dtype != dtype:
            raise ValueError(f"{name}: values of {values.dtype}, expected {dtype}")
        places = int(where.sum()) if where.dtype == torch.bool else where.numel()
        if places != values.numel():
            raise ValueError(f"{name}: {values.numel()} values for {places} places")
        out[where] = _as_bits(values.reshape(-1))
    return out.view(dtype).view(shape)


def pack_state(
    state: dict[str, torch.Tensor], mask=None, prefix: str = ""
) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, layout)`` to write for ``state``: compact where ``mask`` (a
    :class:`~ticketlab.masks.Mask` or a dict of bool tensors, keyed like ``state``)
    prunes enough of a tensor for that to be smaller, the rest as it is. Keys get
    ``prefix`` (the mask's do not).
    ``layout`` (JSON; empty when nothing is compact) says how to rebuild the compact
    tensors; it goes in the file's metadata, as :func:`save_state` does, and
    :func:`unpack_state` reads it."""
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict] = {}
    taken = {prefix + k for k in state}
    for name, value in state.items():
        t = value.detach().cpu().contiguous()
        key = prefix + name
        enc = None
        if mask is not None and name in mask:
            enc = _encode(t, mask[name])
        if enc is not None and not any(f"{key}{_SEP}{p}" in taken for p in enc[1]):
            kind, parts = enc
            layout[key] = {
                "encoding": kind,
                "shape": list(t.shape),
                "dtype": str(t.dtype).removeprefix("torch."),
            }
            tensors.update({f"{key}{_SEP}{p}": v.contiguous() for p, v in parts.items()})
        else:
            tensors[key] = t
    if not layout:
        return tensors, {}
    order = [prefix + k for k in state]
    return tensors, {"format": COMPACT_FORMAT, "tensors": layout, "order": order}


def unpack_state(tensors: dict[str, torch.Tensor], layout: dict | None) -> dict:
    """The state :func:`pack_state` packed into ``tensors`` and ``layout``; without a
    layout (a file written before compact storage, or with nothing compact) the tensors
    as they are. Raises ValueError when the parts do not fit together."""
    if not layout:
        return dict(tensors)
    if layout.get("format") != COMPACT_FORMAT:
        raise ValueError(f"unknown storage format {layout.get('format')!r}")
    compact = layout["tensors"]
    out = {}
    grouped: dict[str, dict[str, torch.Tensor]] = {k: {} for k in compact}
    for key, t in tensors.items():
        base, _, part = key.rpartition(_SEP)
        if base in compact:
            grouped[base][part] = t
        else:
            out[key] = t
    for key, info in compact.items():
        out[key] = _decode(key, info, grouped[key])
    order = layout.get("order", [])
    if sorted(order) == sorted(out):
        out = {k: out[k] for k in order}
    return out


def file_layout(metadata: dict | None) -> dict:
    """The compact layout a file's safetensors metadata holds ({} for none): ticketlab
    keeps one metadata key, ``ticketlab``, a JSON object whose ``compact`` entry it is
    (one key, because safetensors writes several in no fixed order)."""
    try:
        meta = json.loads((metadata or {}).get("ticketlab", "{}"))
    except ValueError:
        return {}
    return (meta.get("compact") or {}) if isinstance(meta, dict) else {}


def read_state_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors (compact ones rebuilt) and its metadata."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return unpack_state(tensors, file_layout(metadata)), metadata


def save_state(path: str | os.PathLike, state: dict[str, torch.Tensor], mask=None) -> None:
    """Write ``state`` as safetensors, atomically. With ``mask`` (the network's
    :class:`~ticketlab.masks.Mask`), a masked tensor that is mostly pruned is stored as
    its kept values and where they are (see :func:`pack_state`): every kept value
    reads back bit for bit, a pruned one as +0.0. Without a mask, or with nothing to
    gain, the file is the plain safetensors of ``state``."""
    tensors, layout = pack_state(state, mask)
    metadata = {"ticketlab": json.dumps({"compact": layout}, sort_keys=True)} if layout else None
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state :func:`save_state` wrote, compact or not (files of every version load)."""
    try:
        return read_state_file(path)[0]
    except Exception as exc:
        raise DataError(f"weights file {path} is corrupt: {exc}") from None


def file_bytes(path: str | os.PathLike) -> tuple[int, int]:
    """``(bytes on disk, dense-equivalent bytes)`` of a safetensors file: the second is
    the size of the file holding the same tensors densely (equal to the first for a file
    without compact tensors), worked out from the header alone."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None) or {}
        layout = file_layout(meta).get("tensors", {})
    except (OSError, ValueError):
        return size, size
    if not layout:
        return size, size
    # the dense file's header: the same entries with the compact ones whole again
    entries = {k: (v["dtype"], v["shape"]) for k, v in header.items()}
    entries = {k: v for k, v in entries.items() if k.rpartition(_SEP)[0] not in layout}
    for key, info in layout.items():
        entries[key] = (_ST_NAMES[info["dtype"]], info["shape"])
    dense_header, offset = {}, 0
    for key, (dtype, shape) in sorted(entries.items()):
        nbytes = math.prod(shape) * _ST_SIZES.get(dtype, 4)
        span = [offset, offset + nbytes]
        dense_header[key] = {"dtype": dtype, "shape": shape, "data_offsets": span}
        offset += nbytes
    rest = json.loads(meta["ticketlab"])
    rest.pop("compact")
    if rest or len(meta) > 1:  # a checkpoint's own metadata stays
        dense_header["__metadata__"] = {**meta, "ticketlab": json.dumps(rest)}
    text = len(json.dumps(dense_header, separators=(",", ":")))
    return size, 8 + (text + 7) // 8 * 8 + offset


def disk_usage(run_dir: str | os.PathLike) -> list[dict]:
    """Bytes of a run's tensor files per level (summed over replicates and variants):
    rows of ``level`` (``"shared"`` for files beside the levels, e.g. a rewind point),
    ``files``, ``bytes``, ``dense_bytes`` and ``weight_bytes``/``weight_dense_bytes``
    (the ``weights_*`` files alone)."""
    rows: dict[str, dict] = {}
    for path in sorted(Path(run_dir).rglob("*.safetensors")):
        rel = path.relative_to(run_dir).parts
        level = next((p.removeprefix("level-") for p in rel if p.startswith("level-")), "shared")
        if level not in rows:
            counts = ("files", "bytes", "dense_bytes", "weight_bytes", "weight_dense_bytes")
            rows[level] = {"level": level, **dict.fromkeys(counts, 0)}
        row = rows[level]
        size, dense = file_bytes(path)
        row["files"] += 1
        row["bytes"] += size
        row["dense_bytes"] += dense
        if path.name.startswith("weights_"):
            row["weight_bytes"] += size
            row["weight_dense_bytes"] += dense

    def order(level: str):
        return (0, int(level)) if level.isdigit() else (1, 0)

    return [rows[k] for k in sorted(rows, key=order)]
