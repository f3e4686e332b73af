"""Finding dataset files on disk and reading them into raw (uint8) arrays."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ticketlab.errors import DataError

from .cifar import read_cifar_bin, read_cifar_py
from .formats import read_idx

ENV_VAR = "TICKETLAB_DATA"

# Other directory names a dataset commonly goes by.
ALIASES = {"fashion_mnist": ("fashion-mnist",)}
SYSTEM_DIRS = {
    # Installed by the Debian package dataset-fashion-mnist (the four .gz IDX files).
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist",),
    "mnist": ("/usr/share/datasets/mnist",),
}
_PASS_DIR = f"and pass --data-dir DIR or set {ENV_VAR}"
HOW_TO_GET = {
    "fashion_mnist": "install it with 'apt-get install dataset-fashion-mnist', or put the four "
    f"Fashion-MNIST IDX files (.gz or plain) in a directory {_PASS_DIR}",
    "mnist": "put the four IDX files from the MNIST site (train-images-idx3-ubyte.gz etc.) in "
    f"a directory {_PASS_DIR}",
    "cifar10": "unpack the 'CIFAR-10 binary version' or 'CIFAR-10 python version' archive from "
    f"the CIFAR site {_PASS_DIR}",
}

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"


def search_dirs(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    """Where to look, in order: data_dir (itself, then data_dir/<name>), $TICKETLAB_DATA/<name>
    (then $TICKETLAB_DATA itself), then the system locations."""
    names = (name, *ALIASES.get(name, ()))
    dirs: list[Path] = []
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        dirs += [root, *(root / n for n in names)]
    env = os.environ.get(ENV_VAR)
    if env:
        root = Path(env).expanduser()
        dirs += [*(root / n for n in names), root]
    dirs += [Path(d) for d in SYSTEM_DIRS.get(name, ())]
    return list(dict.fromkeys(dirs))


def not_found(name: str, dirs: list[Path], hint: bool) -> DataError:
    where = ", ".join(map(str, dirs)) if dirs else f"nowhere (no --data-dir, {ENV_VAR} unset)"
    msg = f"dataset '{name}' not found; looked in: {where}"
    if hint:
        msg += f"; {HOW_TO_GET[name]}"
    return DataError(msg)


def _idx_path(d: Path, stem: str) -> Path | None:
    for p in (d / stem, d / f"{stem}.gz"):
        if p.is_file():
            return p
    return None


def _idx_split(images: Path, labels: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images, ndim=3), read_idx(labels, ndim=1)
    if x.shape[1:] != (28, 28):
        raise DataError(f"{images}: images are {x.shape[1]}x{x.shape[2]}, expected 28x28")
    if len(x) != len(y):
        raise DataError(f"{images} holds {len(x)} images but {labels} {len(y)} labels")
    if len(y) and int(y.max()) >= num_classes:
        raise DataError(f"{labels} is corrupt: label {int(y.max())} >= {num_classes} classes")
    return x[:, None], y


def read_idx_dataset(name: str, data_dir, hint: bool = True) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test) as uint8 tensors, images (N, 1, 28, 28)."""
    dirs = search_dirs(name, data_dir)
    for d in dirs:
        paths = [_idx_path(d, stem) for stem in IDX_FILES]
        if not any(paths):
            continue
        if not all(paths):
            missing = [s for s, p in zip(IDX_FILES, paths) if p is None]
            raise DataError(
                f"dataset '{name}' in {d} is incomplete: missing {', '.join(missing)} (or .gz)"
            )
        train = _idx_split(paths[0], paths[1], 10)
        test = _idx_split(paths[2], paths[3], 10)
        return tuple(torch.from_numpy(a) for a in (*train, *test))
    raise not_found(name, dirs, hint)


def _cifar_layout(d: Path) -> tuple[str, Path] | None:
    """('bin'|'py', batches directory) if d is, or contains, a CIFAR-10 batches directory."""
    for fmt, sub, first in (
        ("bin", "cifar-10-batches-bin", "data_batch_1.bin"),
        ("py", "cifar-10-batches-py", "data_batch_1"),
    ):
        for batches in (d / sub, d):
            if (batches / first).is_file():
                return fmt, batches
    return None


def read_cifar10(data_dir, hint: bool = True) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test) as tensors, images uint8 (N, 3, 32, 32)."""
    dirs = search_dirs("cifar10", data_dir)
    for d in dirs:
        layout = _cifar_layout(d)
        if layout is None:
            continue
        fmt, batches = layout
        ext, read = (".bin", read_cifar_bin) if fmt == "bin" else ("", read_cifar_py)
        files = [batches / f"{stem}{ext}" for stem in (*CIFAR_TRAIN, CIFAR_TEST)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise DataError(
                f"dataset 'cifar10' in {batches} is incomplete: missing {', '.join(missing)}"
            )
        parts = [read(f) for f in files]
        for f, (_, y) in zip(files, parts):
            if len(y) and int(y.max()) >= 10:
                raise DataError(f"{f} is corrupt: label {int(y.max())} >= 10 classes")
        x_train = np.concatenate([x for x, _ in parts[:-1]])
        y_train = np.concatenate([y for _, y in parts[:-1]]).astype(np.int64)
        x_test, y_test = parts[-1][0], parts[-1][1].astype(np.int64)
        return tuple(
            torch.from_numpy(np.ascontiguousarray(a)) for a in (x_train, y_train, x_test, y_test)
        )
    raise not_found("cifar10", dirs, hint)
