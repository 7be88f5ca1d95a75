"""Stratified batches: every batch holds every class (B >= K), in proportion to its frequency.

The implicit ETF head needs the class means of every batch (method.md section 3), so it is
trained on stratified batches. :class:`StratifiedBatchSampler` replaces the release's
scikit-learn ``StratifiedKFold`` trick (which fails when classes are smaller than the number of
batches, and makes batches of varying size) with systematic sampling of classes:

1. Quotas (once): with ``C = m B`` points per *cycle* of ``m = ceil(K/B)`` batches (m = 1 when
   B >= K), class k's share is ``e_k = C n_k / N``. It gets ``q_k = max(1, floor(e_k))`` slots
   (reduced by one, largest surplus first, if the minimum of one slot overfills the cycle);
   the ``C - sum q`` remaining slots are shared in proportion to the remainders ``e_k - q_k``,
   giving an arc length ``a_k = q_k + w_k`` with ``0 <= w_k < 1`` and ``sum a_k = C``.
2. Each cycle: the classes are laid on ``[0, C)`` in a random order with arc lengths ``a_k``, and
   the C points ``u, u + 1, ..., u + C - 1`` (u uniform in [0, 1)) pick the classes: class k gets
   ``q_k`` or ``q_k + 1`` points, ``E[count] = a_k`` (systematic sampling). Point j goes to batch
   ``j mod m`` of the cycle, so every batch has exactly B points and every class appears at
   least once in every cycle of m consecutive batches.
3. Indices: each class's indices are drawn in a random order without replacement; a class that
   runs out during the epoch (small classes whose quota was raised to 1) is reshuffled and
   cycled. The pools restart every epoch.

Everything is drawn from ``numpy.random.default_rng([seed, epoch])``: fixed by the seed and the
epoch (:meth:`set_epoch`, as ``DistributedSampler``). With ``num_replicas`` R, every rank draws
the same global batch and takes the strided slice ``batch[rank::R]`` of it (B must be divisible
by R); the batch is ordered by class, so the slices are stratified too.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, Sampler

__all__ = ["StratifiedBatchSampler"]


def _as_labels(labels) -> np.ndarray:
    if isinstance(labels, Sampler):
        raise TypeError(
            f"labels is a {type(labels).__name__}, not class labels: Lightning re-creates batch "
            "samplers under DDP; build the StratifiedBatchSampler inside train_dataloader() (it "
            "then takes the rank from Lightning's sampler), or pass "
            "Trainer(use_distributed_sampler=False) and num_replicas=trainer.world_size, "
            "rank=trainer.global_rank"
        )
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(
            f"labels must be a non-empty 1-D sequence of class indices, got shape {array.shape}"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(
            f"labels must be integers (class indices), got dtype {array.dtype}; convert them "
            f"with e.g. numpy.asarray(labels, dtype=int)"
        )
    if array.min() < 0:
        raise ValueError(f"labels must be >= 0, got a label {int(array.min())}")
    return array.astype(np.int64)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return int(value)


def _cycle_arcs(counts: np.ndarray, cycle_size: int) -> np.ndarray:
    """Arc lengths a_k (sum = cycle_size): at least 1, then proportional to the class sizes."""
    share = cycle_size * counts / counts.sum()
    quota = np.maximum(1, np.floor(share)).astype(np.int64)
    while quota.sum() > cycle_size:  # the minimum of 1 overfilled the cycle: trim the largest
        surplus = np.where(quota > 1, quota - share, -np.inf)
        quota[int(np.argmax(surplus))] -= 1
    remaining = cycle_size - int(quota.sum())
    residual = np.maximum(share - quota, 0.0)
    extra = residual * (remaining / residual.sum()) if remaining > 0 else np.zeros_like(share)
    return quota + extra


class StratifiedBatchSampler(BatchSampler):
    """Batch sampler yielding lists of dataset indices, stratified by class (see module doc).

    Use as ``DataLoader(dataset, batch_sampler=StratifiedBatchSampler(labels, 256, seed))`` and
    call :meth:`set_epoch` at the start of every epoch.

    PyTorch Lightning: under DDP Lightning re-creates a batch sampler with its own
    ``DistributedSampler`` as ``sampler=``. A StratifiedBatchSampler built inside
    ``train_dataloader()`` survives that: it keeps its labels, batch size and seed and takes
    ``num_replicas`` and ``rank`` from Lightning's sampler (whose order it does not use: the
    batches are the same global batches, sliced per rank). One built elsewhere cannot be
    re-created (Lightning no longer knows its labels): that is a one-line error naming
    ``Trainer(use_distributed_sampler=False)``. It subclasses ``BatchSampler`` for this
    (Lightning records the arguments of ``BatchSampler`` subclasses only).

    Args:
        labels: (N,) integer class labels of the dataset (tensor, array or sequence).
        batch_size: B, the global batch size (over all replicas).
        seed: fixes every draw, together with the epoch.
        num_replicas: number of ranks R sharing each global batch; R must divide B.
        rank: this process's rank in [0, R).
        drop_last: ``len = N // B`` batches per epoch if True, ``ceil(N / B)`` otherwise. Every
            batch has exactly B indices either way (small classes are resampled, never padded).
        sampler: a distributed sampler (what Lightning injects): ``num_replicas`` and ``rank``
            are taken from it (given ones must agree); its order is not used.

    Each yielded list has B / R indices (this rank's share of the global batch).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        batch_size: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = True,
        sampler: Sampler | None = None,
    ) -> None:
        self.labels = _as_labels(labels)
        self.sampler = sampler
        if sampler is not None and hasattr(sampler, "num_replicas"):
            given = (num_replicas, rank)
            num_replicas, rank = int(sampler.num_replicas), int(sampler.rank)
            if given != (1, 0) and given != (num_replicas, rank):
                raise ValueError(
                    f"num_replicas={given[0]}, rank={given[1]} disagree with the sampler's "
                    f"num_replicas={num_replicas}, rank={rank}; pass one or the other"
                )
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self.num_replicas = _check_int("num_replicas", num_replicas, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.num_replicas:
            raise ValueError(f"rank={rank} must be < num_replicas={num_replicas}")
        if self.batch_size % self.num_replicas:
            raise ValueError(
                f"batch_size={batch_size} is not divisible by num_replicas={num_replicas}; every "
                f"rank takes batch_size / num_replicas indices, so use a multiple of "
                f"{num_replicas} (e.g. {self.num_replicas * max(1, batch_size // num_replicas)})"
            )
        num_samples = len(self.labels)
        if self.batch_size > num_samples:
            raise ValueError(
                f"batch_size={batch_size} exceeds the number of samples {num_samples}; use a "
                f"batch size of at most {num_samples}"
            )
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.classes, inverse, class_sizes = np.unique(
            self.labels, return_inverse=True, return_counts=True
        )
        self._class_members = [np.flatnonzero(inverse == k) for k in range(len(self.classes))]
        #: m, the number of consecutive batches in which every class appears at least once.
        self.batches_per_cycle = math.ceil(len(self.classes) / self.batch_size)
        self._arcs = _cycle_arcs(class_sizes, self.batches_per_cycle * self.batch_size)

    def __len__(self) -> int:
        """Number of batches per epoch (the same on every rank)."""
        num_samples = len(self.labels)
        if self.drop_last:
            return num_samples // self.batch_size
        return math.ceil(num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch, which (with the seed) fixes the batches of the next iteration."""
        self.epoch = _check_int("epoch", epoch, 0)

    def global_batches(self) -> np.ndarray:
        """All global batches of the current epoch, shape (len(self), B), int64 indices."""
        rng = np.random.default_rng([self.seed, self.epoch])
        num_classes = len(self.classes)
        cycle_batches = self.batches_per_cycle
        cycle_size = cycle_batches * self.batch_size
        num_cycles = math.ceil(len(self) / cycle_batches)
        # Class of every point, cycle by cycle (systematic sampling on a random class order).
        points = np.arange(cycle_size, dtype=np.float64)
        cycles = []
        for _ in range(num_cycles):
            order = rng.permutation(num_classes)
            edges = np.cumsum(self._arcs[order])
            slots = np.searchsorted(edges, points + rng.random(), side="right")
            sequence = order[np.minimum(slots, num_classes - 1)]
            # Point j -> batch j mod m: (C,) -> (m, B).
            cycles.append(sequence.reshape(self.batch_size, cycle_batches).T)
        classes = np.concatenate(cycles, axis=0)[: len(self)]
        # Indices: each class's members in random order, reshuffled and cycled when exhausted.
        batches = np.empty(classes.shape, dtype=np.int64)
        for k in range(num_classes):
            mask = classes == k
            needed = int(mask.sum())
            if needed == 0:
                continue
            members = self._class_members[k]
            rounds = math.ceil(needed / len(members))
            stream = np.concatenate([rng.permutation(members) for _ in range(rounds)])
            batches[mask] = stream[:needed]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield batch[self.rank :: self.num_replicas].tolist()

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "seed"}``: enough to regenerate the epoch's batches."""
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Restore the epoch; the seed must match the one this sampler was built with."""
        missing = {"epoch", "seed"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict is missing {sorted(missing)}; pass sampler.state_dict()")
        if int(state_dict["seed"]) != self.seed:
            raise ValueError(
                f"state_dict seed={state_dict['seed']} differs from this sampler's seed="
                f"{self.seed}; build the sampler with seed={state_dict['seed']} to resume"
            )
        self.set_epoch(int(state_dict["epoch"]))
