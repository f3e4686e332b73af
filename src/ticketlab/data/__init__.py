"""Datasets in memory, seeded batch order and batch augmentation."""

from .augment import augment_crop_flip
from .batching import BatchSampler, batch_indices
from .dataset import Dataset, from_tensors
from .noise import noisy_labels, with_label_noise
from .registry import DATASETS, describe_datasets, load

__all__ = [
    "DATASETS",
    "BatchSampler",
    "Dataset",
    "augment_crop_flip",
    "batch_indices",
    "describe_datasets",
    "from_tensors",
    "load",
    "noisy_labels",
    "with_label_noise",
]
