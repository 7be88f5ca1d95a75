"""Datasets, transforms, long-tailed subsets and label noise.

:func:`build_datasets` is the entry point; :func:`build_loader` turns any of its splits into
batches (the in-memory fast path or an ordinary DataLoader). See ``docs/data.md``.
"""

from guided_nc.data.datasets import (
    DATASET_NAMES,
    DEFAULT_ROOT_VARIABLE,
    SYSTEM_FASHION_MNIST,
    DataSplits,
    build_datasets,
    default_root,
    read_idx,
)
from guided_nc.data.imbalance import (
    LABEL_NOISE_MODES,
    LONG_TAIL_PROFILES,
    add_label_noise,
    long_tail_counts,
    long_tail_indices,
)
from guided_nc.data.memory import (
    EpochLoader,
    RelabeledDataset,
    TensorImageDataset,
    build_loader,
    epoch_seed,
)
from guided_nc.data.transforms import (
    AUGMENTATIONS,
    NORMALIZATION,
    BatchTransform,
    imagenet_transforms,
)

__all__ = [
    "AUGMENTATIONS",
    "DATASET_NAMES",
    "DEFAULT_ROOT_VARIABLE",
    "LABEL_NOISE_MODES",
    "LONG_TAIL_PROFILES",
    "NORMALIZATION",
    "SYSTEM_FASHION_MNIST",
    "BatchTransform",
    "DataSplits",
    "EpochLoader",
    "RelabeledDataset",
    "TensorImageDataset",
    "add_label_noise",
    "build_datasets",
    "build_loader",
    "default_root",
    "epoch_seed",
    "imagenet_transforms",
    "long_tail_counts",
    "long_tail_indices",
    "read_idx",
]
