"""In-memory datasets indexed a batch at a time, wrappers, and the loader that serves both.

:class:`TensorImageDataset` keeps a whole split as one tensor and applies a
:class:`~guided_nc.data.transforms.BatchTransform` to a batch of indices in one go. Feed it a
*batch sampler* through ``DataLoader(dataset, sampler=batch_sampler, batch_size=None)`` - which
:func:`build_loader` does - so every step costs one indexing and a few tensor operations
instead of B calls of a PIL pipeline.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from guided_nc.data.transforms import BatchTransform

__all__ = ["EpochLoader", "RelabeledDataset", "TensorImageDataset", "build_loader", "epoch_seed"]


def epoch_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys (e.g. seed, epoch, rank) by numpy's SeedSequence.

    Different key tuples give statistically independent seeds; the same tuple the same seed.
    """
    if any(int(key) < 0 for key in keys):
        raise ValueError(f"seed keys {keys} must be non-negative integers")
    state = np.random.SeedSequence([int(key) for key in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class TensorImageDataset(Dataset):
    """A split held as tensors, transformed a batch at a time.

    ``dataset[i]`` (an int) gives one example ``(x, y)``; ``dataset[indices]`` (a list, 1-D
    tensor, numpy array or slice) gives a whole batch ``(X, Y)`` with X of shape (B, ...). The
    transform's random draws come from ``self.generator``; save and restore it with
    :meth:`state_dict` / :meth:`load_state_dict` to resume a run exactly. Use it with
    ``num_workers=0``: workers would copy the generator and repeat the same augmentations.

    Args:
        data: (N, C, H, W) uint8/float images or (N, L) float vectors.
        labels: (N,) int64.
        transform: applied to every batch; None returns ``data`` rows unchanged.
        seed: seed of the CPU generator that drives random augmentation.

    Attributes:
        supports_batched_indexing: True; :func:`build_loader` checks it.
    """

    supports_batched_indexing = True

    def __init__(
        self,
        data: torch.Tensor,
        labels: torch.Tensor,
        transform: BatchTransform | None = None,
        seed: int = 0,
    ) -> None:
        if data.shape[0] != labels.shape[0]:
            raise ValueError(
                f"data has {data.shape[0]} rows but labels has {labels.shape[0]}; they must match"
            )
        if labels.ndim != 1:
            raise ValueError(f"labels must be one-dimensional, got shape {tuple(labels.shape)}")
        self.data = data
        self.labels = labels.long()
        self.transform = transform
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index):
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        index = torch.as_tensor(index, dtype=torch.long)
        if index.ndim == 0:
            images, labels = self._batch(index.view(1))
            return images[0], labels[0]
        return self._batch(index)

    def _batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = index.to(self.data.device)
        images = self.data[index]
        if self.transform is not None:
            images = self.transform(images, self.generator)
        return images, self.labels[index]

    def set_epoch(self, epoch: int, *keys: int) -> None:
        """Reseed the augmentation generator from ``(seed, epoch, *keys)`` (e.g. the rank).

        Makes an epoch's augmentations a function of the seed and the epoch alone, so a run
        resumed at an epoch boundary repeats them exactly. :class:`EpochLoader` calls it.
        """
        self.generator.manual_seed(epoch_seed(self.seed, epoch, *keys))

    def with_transform(self, transform: BatchTransform | None) -> TensorImageDataset:
        """A dataset over the same tensors (not copied) with another transform and generator."""
        return TensorImageDataset(self.data, self.labels, transform, self.seed)

    def to(self, device: torch.device | str) -> TensorImageDataset:
        """The same dataset with its tensors on ``device`` (e.g. a GPU: no host-device copies).

        The generator stays on the CPU, so the augmentations do not depend on the device.
        """
        moved = TensorImageDataset(self.data.to(device), self.labels.to(device), self.transform)
        moved.seed = self.seed
        moved.generator = self.generator
        return moved

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The augmentation generator's state (a uint8 tensor), for checkpoints."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the augmentation generator saved by :meth:`state_dict`."""
        self.generator.set_state(state["generator"])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={len(self)}, shape={tuple(self.data.shape[1:])}, "
            f"dtype={self.data.dtype}, transform={self.transform})"
        )


class RelabeledDataset(Dataset):
    """A subset of a per-sample dataset with replacement labels (long-tail, label noise).

    ``dataset[indices[i]]`` is loaded and its label replaced by ``labels[i]``.

    Args:
        dataset: any map-style dataset returning (x, y).
        indices: (N,) int64 positions in ``dataset``.
        labels: (N,) int64 labels to return.
    """

    def __init__(self, dataset: Dataset, indices: torch.Tensor, labels: torch.Tensor) -> None:
        if indices.shape != labels.shape:
            raise ValueError(
                f"indices shape {tuple(indices.shape)} and labels shape {tuple(labels.shape)} "
                "must be equal"
            )
        self.dataset = dataset
        self.indices = indices.long()
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.indices.shape[0]

    def __getitem__(self, index: int):
        sample, _ = self.dataset[int(self.indices[index])]
        return sample, int(self.labels[index])


def build_loader(
    dataset: Dataset,
    batch_size: int | None = None,
    *,
    shuffle: bool = False,
    drop_last: bool = False,
    sampler: Sampler | Iterable[int] | None = None,
    batch_sampler: Sampler[Sequence[int]] | Iterable[Sequence[int]] | None = None,
    generator: torch.Generator | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A ``DataLoader`` yielding ``(images, labels)`` batches from either kind of dataset.

    Give exactly one of ``batch_size`` (with ``shuffle``/``drop_last``, or with a per-example
    ``sampler`` such as ``DistributedSampler``) or ``batch_sampler`` (e.g.
    ``StratifiedBatchSampler``, which yields lists of indices).

    * :class:`TensorImageDataset`: the batches of indices go to the dataset whole
      (``batch_size=None`` in the DataLoader), in the main process (``num_workers`` is ignored).
    * Other datasets: an ordinary DataLoader with ``num_workers`` workers and default collation.

    ``generator`` drives the shuffling of ``shuffle=True`` (and seeds the workers).
    """
    if (batch_size is None) == (batch_sampler is None):
        raise ValueError(
            f"give exactly one of batch_size={batch_size} and batch_sampler={batch_sampler}"
        )
    if batch_sampler is not None and (sampler is not None or shuffle or drop_last):
        raise ValueError("batch_sampler excludes sampler, shuffle and drop_last; set them in it")
    if sampler is not None and shuffle:
        raise ValueError("sampler excludes shuffle=True; shuffle inside the sampler")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be a positive integer")
    if batch_sampler is None:
        if sampler is None:
            sampler = (
                RandomSampler(dataset, generator=generator)
                if shuffle
                else SequentialSampler(dataset)
            )
        batch_sampler = BatchSampler(sampler, batch_size, drop_last)
    if getattr(dataset, "supports_batched_indexing", False):
        # Each item of the outer sampler is a whole batch of indices; the dataset indexes it
        # at once, and default_convert passes the (images, labels) tensors through unchanged.
        return DataLoader(dataset, sampler=batch_sampler, batch_size=None, pin_memory=pin_memory)
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=generator,
    )


class EpochLoader:
    """The training loader: a :func:`build_loader` loader whose randomness is reseeded per epoch.

    At the start of every iteration the epoch is read from ``batch_sampler.epoch`` (set by
    ``StratifiedBatchSampler.set_epoch``), or counted when the sampler has none, and

    * a :class:`TensorImageDataset`'s augmentation generator is reseeded from
      ``(dataset seed, sampler seed, epoch, sampler rank)``;
    * the DataLoader's generator (which seeds the workers of per-sample datasets, and through them
      torchvision's random transforms) is reseeded from the same keys.

    So the augmentations of an epoch depend only on the seeds, the epoch and the rank: a run
    resumed at an epoch boundary sees the same batches, augmented the same way.

    Args:
        dataset: the training split (``DataSplits.train``).
        batch_sampler: yields lists of indices, e.g. ``StratifiedBatchSampler``.
        num_workers: worker processes for per-sample datasets (ignored for in-memory ones).
        pin_memory: pin batches for faster host-to-GPU copies.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_sampler: Sampler[Sequence[int]] | Iterable[Sequence[int]],
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.generator = torch.Generator()
        self.loader = build_loader(
            dataset,
            batch_sampler=batch_sampler,
            generator=self.generator,
            num_workers=num_workers,
            pin_memory=pin_memory,
        )
        self.iterations = 0

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        epoch = int(getattr(self.batch_sampler, "epoch", self.iterations))
        sampler_seed = int(getattr(self.batch_sampler, "seed", 0))
        rank = int(getattr(self.batch_sampler, "rank", 0))
        self.iterations += 1
        dataset_seed = int(getattr(self.dataset, "seed", 0))
        if isinstance(self.dataset, TensorImageDataset):
            self.dataset.set_epoch(epoch, sampler_seed, rank)
        self.generator.manual_seed(epoch_seed(dataset_seed, epoch, sampler_seed, rank))
        return iter(self.loader)
