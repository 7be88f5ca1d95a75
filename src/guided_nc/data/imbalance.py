"""Long-tailed subsets and label noise for a training split.

Both use their own ``numpy.random.Generator`` built from a seed; neither touches numpy's or
torch's global random state (the release reseeds numpy's global RNG; reference-release.md
defect 23).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "LABEL_NOISE_MODES",
    "LONG_TAIL_PROFILES",
    "add_label_noise",
    "long_tail_counts",
    "long_tail_indices",
]

#: Class-size profiles of :func:`long_tail_counts`.
LONG_TAIL_PROFILES = ("exp", "step")

#: How :func:`add_label_noise` draws a corrupted label.
LABEL_NOISE_MODES = ("other", "uniform")


def long_tail_counts(
    num_classes: int, max_count: int, imbalance_factor: float, profile: str = "exp"
) -> list[int]:
    """Number of training examples kept for each class of a long-tailed split.

    * ``"exp"``: ``n_c = int(max_count * imbalance_factor ** (c / (K - 1)))`` for c = 0..K-1,
      so class 0 keeps ``max_count`` and class K-1 keeps ``int(max_count * imbalance_factor)``.
    * ``"step"``: classes ``c < K // 2`` keep ``max_count``, the others
      ``int(max_count * imbalance_factor)``.

    ``imbalance_factor`` is the ratio of the smallest to the largest class (0.01 is "100:1").

    Returns: a list of K ints.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be >= 2 for a long-tailed split")
    if max_count < 1:
        raise ValueError(f"max_count={max_count} must be >= 1")
    _check_imbalance_factor(imbalance_factor)
    if profile not in LONG_TAIL_PROFILES:
        raise ValueError(
            f"unknown long_tail={profile!r}; choose one of {', '.join(LONG_TAIL_PROFILES)}"
        )
    if profile == "exp":
        return [
            int(max_count * imbalance_factor ** (c / (num_classes - 1))) for c in range(num_classes)
        ]
    half = num_classes // 2
    return [
        max_count if c < half else int(max_count * imbalance_factor) for c in range(num_classes)
    ]


def long_tail_indices(
    labels: torch.Tensor,
    num_classes: int,
    imbalance_factor: float,
    profile: str = "exp",
    seed: int = 0,
) -> torch.Tensor:
    """Indices of a long-tailed subset of a training split, in increasing order.

    ``max_count`` of :func:`long_tail_counts` is the size of the smallest class of ``labels``
    (all classes are equal in CIFAR: 5000 or 500), so every class has enough examples. Which
    examples of class c are kept is a uniformly random subset drawn with
    ``numpy.random.default_rng(seed)``.

    Shape: labels (N,) int64 -> indices (sum of the counts,) int64.
    """
    labels_np = _labels_numpy(labels)
    present = np.bincount(labels_np, minlength=num_classes)
    if present.min() < 1:
        missing = np.flatnonzero(present == 0).tolist()
        raise ValueError(
            f"classes {missing} have no examples; a long-tailed split needs every class"
        )
    counts = long_tail_counts(num_classes, int(present.min()), imbalance_factor, profile)
    rng = np.random.default_rng(seed)
    kept = [
        rng.choice(np.flatnonzero(labels_np == c), size=count, replace=False)
        for c, count in enumerate(counts)
    ]
    return torch.from_numpy(np.sort(np.concatenate(kept))).long()


def add_label_noise(
    labels: torch.Tensor,
    num_classes: int,
    rate: float,
    seed: int = 0,
    mode: str = "other",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt the labels of ``floor(N * rate)`` examples chosen uniformly without replacement.

    * ``mode="other"`` (default): each chosen label is replaced by one of the K-1 *other*
      classes, uniformly, so exactly ``floor(N * rate)`` labels change.
    * ``mode="uniform"``: the new label is uniform over all K classes and may equal the true one
      (the release's rule; the expected fraction of changed labels is ``rate * (K-1)/K``).

    Randomness: ``numpy.random.default_rng(seed)`` only.

    Returns: (noisy labels (N,) int64, indices of the chosen examples (floor(N*rate),) int64,
    sorted). ``labels`` is not modified.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"label_noise={rate} must be in [0, 1] (a fraction of the training set)")
    if mode not in LABEL_NOISE_MODES:
        raise ValueError(
            f"unknown label_noise_mode={mode!r}; choose one of {', '.join(LABEL_NOISE_MODES)}"
        )
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be >= 2 for label noise")
    labels_np = _labels_numpy(labels)
    rng = np.random.default_rng(seed)
    count = math.floor(len(labels_np) * rate)
    chosen = np.sort(rng.choice(len(labels_np), size=count, replace=False))
    noisy = labels_np.copy()
    if mode == "other":
        shift = rng.integers(1, num_classes, size=count)
        noisy[chosen] = (labels_np[chosen] + shift) % num_classes
    else:
        noisy[chosen] = rng.integers(0, num_classes, size=count)
    return torch.from_numpy(noisy).long(), torch.from_numpy(chosen).long()


def _check_imbalance_factor(imbalance_factor: float) -> None:
    if not 0.0 < imbalance_factor <= 1.0:
        raise ValueError(
            f"imbalance_factor={imbalance_factor} must be in (0, 1]: the ratio of the smallest to "
            "the largest class, e.g. 0.01 for a 100:1 long tail"
        )


def _labels_numpy(labels: torch.Tensor) -> np.ndarray:
    labels_np = torch.as_tensor(labels).cpu().numpy().astype(np.int64, copy=False)
    if labels_np.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels_np.shape}")
    return labels_np
