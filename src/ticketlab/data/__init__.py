"""Datasets in memory, seeded batch order and batch augmentation; map-style datasets and
image folders read while training."""

from . import structure
from .augment import augment_crop_flip
from .batching import BatchSampler, batch_indices
from .dataset import Dataset, from_tensors
from .noise import noisy_labels, with_label_noise
from .registry import DATASETS, STREAMED, describe_datasets, load
from .streaming import StreamingData, from_datasets

__all__ = [
    "DATASETS",
    "STREAMED",
    "BatchSampler",
    "Dataset",
    "StreamingData",
    "augment_crop_flip",
    "batch_indices",
    "describe_datasets",
    "from_datasets",
    "from_tensors",
    "load",
    "noisy_labels",
    "structure",
    "with_label_noise",
]
