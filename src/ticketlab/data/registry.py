"""The named datasets and `load`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ticketlab.errors import DataError, UsageError

from . import generated, sources
from .dataset import build
from .noise import with_label_noise


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    input_shape: tuple
    num_classes: int
    n_train: int  # before the validation split
    n_test: int
    val_size: int  # default validation split, held out of the n_train examples
    augment: bool  # crop/flip augmentation on by default
    source: str
    # (data_dir, hint) -> (x_train, y_train, x_test, y_test), raw (uint8 images or floats)
    read: Callable
    scale: float = 1.0  # raw inputs are divided by this before normalising


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "cifar10",
            "32x32 colour photos in 10 classes",
            (3, 32, 32),
            10,
            50_000,
            10_000,
            5_000,
            True,
            "files: cifar-10-batches-bin or cifar-10-batches-py",
            sources.read_cifar10,
            255.0,
        ),
        DatasetInfo(
            "fashion_mnist",
            "28x28 greyscale clothing images in 10 classes",
            (1, 28, 28),
            10,
            60_000,
            10_000,
            5_000,
            False,
            "files: IDX (Debian package dataset-fashion-mnist)",
            lambda data_dir, hint: sources.read_idx_dataset("fashion_mnist", data_dir, hint),
            255.0,
        ),
        DatasetInfo(
            "mnist",
            "28x28 greyscale handwritten digits in 10 classes",
            (1, 28, 28),
            10,
            60_000,
            10_000,
            5_000,
            False,
            "files: IDX",
            lambda data_dir, hint: sources.read_idx_dataset("mnist", data_dir, hint),
            255.0,
        ),
        DatasetInfo(
            "mnist1d",
            "MNIST-1D: digits as length-40 signals in 10 classes",
            (1, 40),
            10,
            4_000,
            1_000,
            500,
            False,
            "generated (mnist1d package templates)",
            lambda data_dir, hint: generated.mnist1d(),
        ),
        DatasetInfo(
            "xor",
            "2-D points in [-1,1]^2 labelled by the XOR of their signs",
            (2,),
            2,
            generated.XOR_SIZES[0],
            generated.XOR_SIZES[1],
            500,
            False,
            "generated (fixed seed)",
            lambda data_dir, hint: generated.xor(),
        ),
    )
}


# read while training from --data-dir (ticketlab.data.folder), not held in memory
STREAMED = ("imagefolder",)


def get_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        names = ", ".join(sorted([*DATASETS, *STREAMED]))
        raise DataError(f"unknown dataset '{name}'; choose from: {names}")
    return DATASETS[name]


def load(
    name: str,
    data_dir: str | None = None,
    val_size: int | None = None,
    split_seed: int = 0,
    augment: bool | None = None,
    download_hint: bool = True,
    *,
    workers: int = 0,
    bad_files: str = "fail",
    image_size: int | None = None,
    label_noise: float = 0.0,
    noise_seed: int = 0,
):
    """Load a named dataset into memory, hold out `val_size` training examples (the dataset's
    default when None) by `split_seed`, and normalise with training-split statistics.

    `augment` None uses the dataset's default; True turns on crop/flip (image datasets only).
    `download_hint` adds how to obtain missing files to the not-found error.

    ``imagefolder`` reads ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*``
    while training (a :class:`~ticketlab.data.streaming.StreamingData`), with ``workers``
    DataLoader processes, ``bad_files`` ``fail`` or ``skip`` and ``image_size``.
    `label_noise` p changes a fraction p of the training labels (after the split; the
    validation and test labels stay clean) to other classes, chosen by `noise_seed`.
    """
    if name == "imagefolder":
        from .folder import image_folder

        if label_noise:
            raise UsageError("--label-noise needs a dataset in memory; imagefolder is streamed")

        return image_folder(
            data_dir,
            val_size=val_size,
            split_seed=split_seed,
            augment=augment,
            workers=workers,
            bad_files=bad_files,
            image_size=image_size,
        )
    info = get_info(name)
    x_train, y_train, x_test, y_test = info.read(data_dir, download_hint)
    if augment is None:
        augment = info.augment
    data = build(
        name,
        x_train,
        y_train,
        x_test,
        y_test,
        num_classes=info.num_classes,
        val_size=info.val_size if val_size is None else val_size,
        split_seed=split_seed,
        scale=info.scale,
        augment="crop_flip" if augment else None,
    )
    return with_label_noise(data, label_noise, noise_seed)


def describe_datasets() -> list[dict]:
    """One row per dataset, for listing."""
    return [
        {
            "name": i.name,
            "shape": i.input_shape,
            "classes": i.num_classes,
            "train": i.n_train - i.val_size,
            "val": i.val_size,
            "test": i.n_test,
            "augment": "crop_flip" if i.augment else None,
            "source": i.source,
            "description": i.description,
        }
        for i in DATASETS.values()
    ]
