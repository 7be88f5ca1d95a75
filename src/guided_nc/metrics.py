"""Neural-collapse metrics: one streaming, float64, distributed-aware implementation.

Every measure the paper plots (method.md section 6; definitions, sources and differences from the
authors' code in ``docs/metrics.md``), computed from a whole split:

* :class:`NeuralCollapseMetrics` - torchmetrics-style ``update(features, labels, logits)`` /
  ``compute(weight, bias)`` / ``reset()``. NC1-NC3, equinorm, ETF distance, bias collapse and
  accuracy come from float64 sufficient statistics whose size does not depend on N (class sums
  K x d, counts, one d x d second moment, correct counts). The per-sample measures (NCC mismatch,
  cosine margins) need the *final* class means, so the object also keeps the features it has seen,
  up to ``max_kept_samples`` per process; beyond that cap they are NaN (with a warning) and
  :func:`collect_metrics` is the route to use.
* :func:`collect_metrics` - two passes over a loader (pass 1: the statistics; pass 2: NCC mismatch
  and margins against the final means), memory independent of N apart from one float64 margin
  per sample. It gives the same numbers as the kept-features route.
* Pure functions, one per formula: :func:`nc1_from_statistics`, :func:`etf_gram_deviation` (NC2 and
  NC3), :func:`coefficient_of_variation` (equinorm), :func:`bias_collapse`,
  :func:`nearest_class_centre` (NC4), :func:`cosine_margins`, :func:`ce_lower_bound`. The ETF
  distance is :func:`guided_nc.etf.etf_distance`.

Under ``torch.distributed`` each process updates with its shard;
:meth:`~NeuralCollapseMetrics.compute` sums the statistics over processes through
:func:`guided_nc.distributed.all_reduce_sum` (one flat float64 buffer), computes the per-sample
measures of its own samples against the global means, and sums/gathers those, so every rank
returns identical numbers. ``compute`` is collective: call it on every rank, with the same
``weight``/``bias``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from guided_nc import distributed
from guided_nc.etf import centering_matrix, etf_distance

__all__ = [
    "MARGIN_QUANTILES",
    "METRIC_KEYS",
    "NeuralCollapseMetrics",
    "bias_collapse",
    "ce_lower_bound",
    "coefficient_of_variation",
    "collect_metrics",
    "cosine_margins",
    "etf_gram_deviation",
    "nc1_from_statistics",
    "nearest_class_centre",
]

#: dtype of every statistic and every metric computation.
STATISTICS_DTYPE = torch.float64

#: Reported quantiles of the per-sample cosine margin (numpy's default linear interpolation).
MARGIN_QUANTILES: dict[str, float] = {
    "margin_q05": 0.05,
    "margin_q25": 0.25,
    "margin_median": 0.5,
    "margin_q75": 0.75,
    "margin_q95": 0.95,
}

#: Keys returned by ``compute`` / ``collect_metrics`` (``acc5`` only when K >= 5).
METRIC_KEYS: tuple[str, ...] = (
    "acc1",
    "acc5",
    "nc1",
    "nc2_w",
    "nc2_h",
    "nc3",
    "ncc_mismatch",
    "bias_collapse",
    "cv_w",
    "cv_h",
    "equinorm",
    "margin_mean",
    "margin_min",
    *MARGIN_QUANTILES,
    "margin_max",
    "etf_margin",
    "etf_distance",
    "n",
)

#: Rows per block in the per-sample computations (bounds the B x K float64 temporaries).
_CHUNK_ROWS = 1024

_NAN = float("nan")


# --- pure functions: one implementation per formula ---------------------------------------------


def ce_lower_bound(num_classes: int, temperature: float) -> float:
    """Cross-entropy lower bound for unit-norm classifier rows and features of norm ``temperature``.

    Yaras et al. 2022, Theorem 1 (attained by a simplex ETF with aligned, balanced features):
    ``L*(K, tau) = log(1 + (K - 1) exp(-tau K / (K - 1)))``. tau = 5: K=10 0.0342, K=100 0.4912,
    K=200 0.8362, K=1000 2.0409.

    Args:
        num_classes: K >= 2.
        temperature: tau > 0, the feature norm (method.md section 1).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} must be an integer >= 2")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0 (default 5)")
    exponent = -temperature * num_classes / (num_classes - 1)
    return math.log1p((num_classes - 1) * math.exp(exponent))


def nc1_from_statistics(
    within_class_covariance: torch.Tensor, centred_class_means: torch.Tensor
) -> torch.Tensor:
    """NC1 = tr(Sigma_W Sigma_B^+) / K (Papyan et al. 2020), from the two covariances' factors.

    ``Sigma_B = Hbar Hbar^T / K``; its pseudo-inverse is taken on the rank-(K-1) part
    (method.md section 6): the ``min(K-1, d)`` largest eigen-directions, minus any whose
    eigenvalue is below ``max(d, K) * eps * largest`` (``scipy.linalg.pinv``'s tolerance). With
    balanced classes ``Hbar`` has rank K-1 and this is the plain pseudo-inverse; with imbalanced
    classes (``mu_G`` is the sample-weighted mean) it drops the K-th direction. Computed from the
    thin SVD of ``Hbar`` (O(d K^2 + d^2 K)), never a d x d inverse.

    Shape: within_class_covariance (d, d), centred_class_means Hbar (d, K) -> scalar, float64.
    """
    hbar = centred_class_means.to(STATISTICS_DTYPE)
    within = within_class_covariance.to(STATISTICS_DTYPE)
    dim, num_classes = hbar.shape
    left, singular, _ = torch.linalg.svd(hbar, full_matrices=False)
    eigenvalues = singular.square() / num_classes  # of Sigma_B, descending
    rank = min(num_classes - 1, dim)
    tolerance = eigenvalues[0] * max(dim, num_classes) * torch.finfo(STATISTICS_DTYPE).eps
    keep = eigenvalues[:rank] > tolerance
    directions, eigenvalues = left[:, :rank][:, keep], eigenvalues[:rank][keep]
    # tr(Sigma_W U diag(1/lambda) U^T) = sum_j u_j^T Sigma_W u_j / lambda_j
    projected = (directions * (within @ directions)).sum(dim=0)
    return (projected / eigenvalues).sum() / num_classes


def etf_gram_deviation(gram: torch.Tensor) -> torch.Tensor:
    """``|| G / ||G||_F - M / sqrt(K-1) ||_F`` for a K x K matrix G (Papyan et al. 2020).

    NC2 of the classifier uses ``G = W W^T``, NC2 of the features ``G = Hbar^T Hbar`` and NC3
    (self-duality) ``G = W Hbar``. Zero exactly for a simplex ETF (up to scale); NaN when G = 0.

    Shape: gram (K, K) -> scalar, float64.
    """
    matrix = gram.to(STATISTICS_DTYPE)
    num_classes = matrix.shape[0]
    target = centering_matrix(num_classes, dtype=STATISTICS_DTYPE, device=matrix.device)
    target = target / math.sqrt(num_classes - 1)
    return torch.linalg.matrix_norm(matrix / torch.linalg.matrix_norm(matrix) - target)


def coefficient_of_variation(vectors: torch.Tensor) -> torch.Tensor:
    """Unbiased std / mean of the Euclidean norms of the rows of ``vectors`` (equinorm).

    As the authors' code (``torch.std``, unbiased). ``CV_W`` uses the rows of W, ``CV_H`` the
    columns of Hbar (pass ``Hbar^T``).

    Shape: vectors (K, d) -> scalar, float64.
    """
    norms = torch.linalg.vector_norm(vectors.to(STATISTICS_DTYPE), dim=1)
    return norms.std() / norms.mean()


def bias_collapse(
    weight: torch.Tensor, bias: torch.Tensor | None, global_mean: torch.Tensor
) -> torch.Tensor:
    """``|| W mu_G + b ||_2`` (the authors' code calls this "NC4"); ``bias=None`` means b = 0.

    Shape: weight (K, d), bias (K,) or None, global_mean (d,) -> scalar, float64.
    """
    value = weight.to(STATISTICS_DTYPE) @ global_mean.to(STATISTICS_DTYPE)
    if bias is not None:
        value = value + bias.to(STATISTICS_DTYPE)
    return torch.linalg.vector_norm(value)


def nearest_class_centre(features: torch.Tensor, class_means: torch.Tensor) -> torch.Tensor:
    """Nearest-class-centre classifier ``argmin_k ||h_i - mu_k||_2`` (Papyan et al. 2020, NC4).

    Uses ``||h - mu_k||^2 = ||h||^2 - 2 <h, mu_k> + ||mu_k||^2`` without the constant ``||h||^2``;
    ties go to the lowest class index.

    Shape: features (B, d), class_means (K, d) -> (B,) int64.
    """
    means = class_means.to(STATISTICS_DTYPE)
    scores = means.square().sum(dim=1) - 2.0 * features.to(STATISTICS_DTYPE) @ means.T
    return scores.argmin(dim=1)


def cosine_margins(
    features: torch.Tensor, labels: torch.Tensor, global_mean: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Per-sample cosine margin (paper eq. 17, the authors' ``validate_NC.py``).

    ``cos(h_i - mu_G, w~_y) - max_{k != y} cos(h_i - mu_G, w~_k)`` with ``w~`` the rows of W
    centred by their mean. A zero vector has cosine 0 with everything (``F.normalize``'s eps).
    Equals K/(K-1) for features at the vertices of a simplex ETF aligned with W.

    Shape: features (B, d), labels (B,) int, global_mean (d,), weight (K, d) -> (B,) float64.
    """
    centred = F.normalize(features.to(STATISTICS_DTYPE) - global_mean.to(STATISTICS_DTYPE), dim=1)
    classifier = weight.to(STATISTICS_DTYPE)
    classifier = F.normalize(classifier - classifier.mean(dim=0, keepdim=True), dim=1)
    cosines = centred @ classifier.T
    index = labels.view(-1, 1)
    own = cosines.gather(1, index).squeeze(1)
    others = cosines.scatter(1, index, -math.inf).amax(dim=1)
    return own - others


# --- the stateful metric -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Statistics:
    """Statistics summed over every process (float64)."""

    counts: torch.Tensor  # (K,)
    class_means: torch.Tensor  # (K, d)
    global_mean: torch.Tensor  # (d,)
    within_class_covariance: torch.Tensor  # (d, d)
    num_samples: float
    correct_top1: float
    correct_top5: float
    samples_with_logits: float
    dropped_samples: float


class NeuralCollapseMetrics(nn.Module):
    """Streaming neural-collapse metrics of a split (method.md section 6, ``docs/metrics.md``).

    Call :meth:`update` per batch with the head's normalised features ``h`` (the caller decides
    which features), the labels and optionally the network's logits, then :meth:`compute` with the
    classifier. Statistics are float64 whatever the input dtype:

    * ``class_counts`` (K,), ``class_shifts`` (K, d), ``shifted_class_sums`` (K, d) and
      ``shifted_second_moment`` (d, d) = ``sum_i (h_i - s_{y_i})(h_i - s_{y_i})^T``, where the
      shift ``s_k`` is the mean of class k in the first batch that contained it. Shifting by a
      class-mean estimate keeps ``Sigma_W = (1/N)[sum (h - s)(h - s)^T - sum_k T_k T_k^T / n_k]``
      free of the cancellation that ``sum h h^T - sum n_k mu_k mu_k^T`` suffers near collapse
      (both terms ~ tau^2, their difference ~ the tiny within-class spread).
    * ``correct_top1``, ``correct_top5``, ``samples_with_logits`` (scalars) for accuracy.

    Their size does not depend on N. Per-sample measures (``ncc_mismatch``, ``margin_*``) need the
    final class means, so the features (in their input dtype), labels and logit predictions of up
    to ``max_kept_samples`` samples per process are also kept (not part of ``state_dict``). Past
    the cap they are dropped, a warning is issued, and those keys are NaN: use
    :func:`collect_metrics` (two passes) for large splits. ``max_kept_samples=0`` turns the
    per-sample measures off without a warning.

    Args:
        num_classes: K >= 2.
        dim: d >= 1, the feature width.
        max_kept_samples: cap on kept samples per process (``None``: no cap). The default, 100000,
            holds CIFAR's training set (100000 x 512 float32 features = 205 MB).
        device: where the statistics live (features are moved there).

    Shape:
        update: features (B, d) float, labels (B,) int in [0, K), logits (B, K) float or None.
        compute: weight (K, d) float or None, bias (K,) float or None -> ``dict[str, float]``.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        max_kept_samples: int | None = 100_000,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes={num_classes!r} must be an integer >= 2")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim={dim!r} must be a positive integer (the feature width)")
        if max_kept_samples is not None and (
            isinstance(max_kept_samples, bool)
            or not isinstance(max_kept_samples, int)
            or max_kept_samples < 0
        ):
            raise ValueError(
                f"max_kept_samples={max_kept_samples!r} must be an integer >= 0 or None (no cap)"
            )
        super().__init__()
        self.num_classes = num_classes
        self.dim = dim
        self.max_kept_samples = max_kept_samples
        factory = {"dtype": STATISTICS_DTYPE, "device": device}
        self.register_buffer("class_counts", torch.zeros(num_classes, **factory))
        self.register_buffer("class_shifts", torch.zeros(num_classes, dim, **factory))
        self.register_buffer("shifted_class_sums", torch.zeros(num_classes, dim, **factory))
        self.register_buffer("shifted_second_moment", torch.zeros(dim, dim, **factory))
        self.register_buffer("correct_top1", torch.zeros((), **factory))
        self.register_buffer("correct_top5", torch.zeros((), **factory))
        self.register_buffer("samples_with_logits", torch.zeros((), **factory))
        self.register_buffer("dropped_samples", torch.zeros((), **factory))
        self._kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self._num_kept = 0
        self.register_load_state_dict_post_hook(_forget_kept_features)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, dim={self.dim}, "
            f"max_kept_samples={self.max_kept_samples}"
        )

    @property
    def num_samples(self) -> int:
        """Samples seen by this process since the last :meth:`reset`."""
        return int(self.class_counts.sum().item())

    @property
    def num_kept_samples(self) -> int:
        """Samples whose features this process currently keeps for the per-sample measures."""
        return self._num_kept

    def reset(self) -> None:
        """Forget every sample (statistics and kept features)."""
        for buffer in self.buffers():
            buffer.zero_()
        self._kept = []
        self._num_kept = 0

    @torch.no_grad()
    def update(
        self, features: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor | None = None
    ) -> None:
        """Add one batch. Validates everything first: a rejected batch leaves the state unchanged.

        Args:
            features: (B, d) floating, finite; the head's normalised features.
            labels: (B,) integer class indices in [0, K).
            logits: (B, K) floating, finite, or None. Either every batch has logits or none does.
        """
        self._check_batch(features, labels, logits)
        if features.shape[0] == 0:
            return
        device = self.class_counts.device
        values = features.detach().to(device=device, dtype=STATISTICS_DTYPE)
        labels = labels.detach().to(device=device, dtype=torch.long)
        batch_counts = torch.bincount(labels, minlength=self.num_classes).to(STATISTICS_DTYPE)
        first_seen = (self.class_counts == 0) & (batch_counts > 0)
        shifts = self.class_shifts
        if first_seen.any():  # new classes: their shift is their mean in this batch
            batch_sums = torch.zeros_like(self.shifted_class_sums).index_add_(0, labels, values)
            batch_means = batch_sums / batch_counts.clamp(min=1).unsqueeze(1)
            shifts = torch.where(first_seen.unsqueeze(1), batch_means, self.class_shifts)
        shifted = values - shifts[labels]
        predictions = None
        if logits is not None:
            logits = logits.detach().to(device)
            predictions = logits.argmax(dim=1)
            top1 = (predictions == labels).sum()
            if self.num_classes >= 5:
                top5 = (logits.topk(5, dim=1).indices == labels.unsqueeze(1)).any(dim=1).sum()
        # Everything validated and computed: mutate.
        if shifts is not self.class_shifts:
            self.class_shifts.copy_(shifts)
        self.shifted_class_sums.index_add_(0, labels, shifted)
        self.shifted_second_moment.addmm_(shifted.T, shifted)
        self.class_counts.add_(batch_counts)
        if logits is not None:
            self.samples_with_logits.add_(labels.numel())
            self.correct_top1.add_(top1)
            if self.num_classes >= 5:
                self.correct_top5.add_(top5)
        self._keep(features, labels, predictions)

    def _keep(
        self, features: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor | None
    ) -> None:
        batch = features.shape[0]
        cap = self.max_kept_samples
        if self.dropped_samples.item() == 0 and (cap is None or self._num_kept + batch <= cap):
            # copy=True: never alias the caller's tensor (the release's CPU aliasing bug, item 25).
            device = self.class_counts.device
            kept_features = features.detach().to(device=device, copy=True)
            self._kept.append((kept_features, labels.clone(), predictions))
            self._num_kept += batch
            return
        if cap != 0 and self.dropped_samples.item() == 0:
            warnings.warn(
                f"NeuralCollapseMetrics keeps at most max_kept_samples={cap} samples per process "
                f"and has now seen {self._num_kept + batch}; the kept features are dropped and "
                "ncc_mismatch and margin_* will be NaN. Use guided_nc.metrics.collect_metrics "
                "(two passes over the loader) or raise max_kept_samples.",
                stacklevel=3,
            )
        self.dropped_samples.add_(self._num_kept + batch)
        self._kept = []
        self._num_kept = 0

    @torch.no_grad()
    def compute(
        self, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> dict[str, float]:
        """Every metric of the samples seen on all processes (collective under torch.distributed).

        Args:
            weight: the classifier W, (K, d) floating, or None: then ``nc2_w``, ``nc3``, ``cv_w``,
                ``equinorm``, ``bias_collapse`` and ``margin_*`` are NaN, and so is
                ``ncc_mismatch`` unless logits were given to :meth:`update`.
            bias: (K,) floating or None (b = 0 in ``bias_collapse`` and in the predictions).

        Returns:
            ``{key: float}`` with the keys of :data:`METRIC_KEYS` (``acc5`` only when K >= 5).
            ``acc1``/``acc5``/``ncc_mismatch`` are percentages; ``acc*`` are NaN without logits.
            The network's prediction for ``ncc_mismatch`` is the argmax of the logits given to
            :meth:`update`, otherwise of ``W h + b`` (float64).

        Raises:
            RuntimeError: no sample was seen on any process.
            ValueError: a class has no samples; weight or bias of the wrong shape or non-finite.
        """
        weight, bias = _check_classifier(weight, bias, self.num_classes, self.dim)
        statistics = self._reduce_statistics()
        results = _global_metrics(statistics, self.num_classes, weight, bias)
        if statistics.dropped_samples > 0:
            if self.max_kept_samples != 0:
                warnings.warn(
                    f"{int(statistics.dropped_samples)} samples exceeded max_kept_samples="
                    f"{self.max_kept_samples}: ncc_mismatch and margin_* are NaN. Use "
                    "guided_nc.metrics.collect_metrics for a two-pass evaluation.",
                    stacklevel=2,
                )
            results.update(_nan_per_sample())
        else:
            results.update(
                _per_sample_metrics(self._kept, self._num_kept, statistics, weight, bias)
            )
        return _ordered(results, self.num_classes)

    def _reduce_statistics(self) -> _Statistics:
        """Sum the statistics over processes: one flat all-reduce (two with > 1 process)."""
        num_classes, dim = self.num_classes, self.dim
        counts = self.class_counts
        safe_counts = counts.clamp(min=1).unsqueeze(1)
        shifted_sums = self.shifted_class_sums
        # Filled in place, view by view, to hold a single extra d x d matrix.
        sizes = [num_classes * dim, num_classes, dim * dim, 4]
        flat = torch.empty(sum(sizes), dtype=STATISTICS_DTYPE, device=counts.device)
        sums, total_counts, scatter, scalars = torch.split(flat, sizes)
        torch.addcmul(
            shifted_sums, counts.unsqueeze(1), self.class_shifts, out=sums.view_as(shifted_sums)
        )
        total_counts.copy_(counts)
        # This process's within-class scatter around its own class means (stable: shifted).
        scaled = shifted_sums / safe_counts.sqrt()
        torch.addmm(
            self.shifted_second_moment, scaled.T, scaled, alpha=-1.0, out=scatter.view(dim, dim)
        )
        scalars.copy_(
            torch.stack(
                [
                    self.correct_top1,
                    self.correct_top5,
                    self.samples_with_logits,
                    self.dropped_samples,
                ]
            )
        )
        distributed.all_reduce_sum(flat)
        num_samples = float(total_counts.sum().item())
        if num_samples == 0:
            raise RuntimeError(
                "NeuralCollapseMetrics.compute() called before any sample was seen; call "
                "update(features, labels) first"
            )
        empty = torch.nonzero(total_counts == 0).flatten().tolist()
        if empty:
            raise ValueError(
                f"classes {empty} have no samples (of num_classes={num_classes}); the class "
                "means are undefined. Evaluate a split that contains every class, or metrics "
                "over the classes present with a smaller num_classes and remapped labels"
            )
        class_means = sums.view(num_classes, dim) / total_counts.unsqueeze(1)
        scatter = scatter.view(dim, dim)  # a view of our own flat buffer: safe to update
        if distributed.world_size() > 1:
            # Pooled scatter = sum of per-process scatters + sum_{r,k} n_rk (m_rk - m_k)(...)^T.
            local_means = self.class_shifts + shifted_sums / safe_counts
            deviation = (local_means - class_means) * counts.sqrt().unsqueeze(1)
            scatter += distributed.all_reduce_sum(deviation.T @ deviation)
        correct_top1, correct_top5, with_logits, dropped = scalars.tolist()
        return _Statistics(
            counts=total_counts,
            class_means=class_means,
            global_mean=sums.view(num_classes, dim).sum(dim=0) / num_samples,
            within_class_covariance=scatter / num_samples,
            num_samples=num_samples,
            correct_top1=correct_top1,
            correct_top5=correct_top5,
            samples_with_logits=with_logits,
            dropped_samples=dropped,
        )

    def _check_batch(
        self, features: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor | None
    ) -> None:
        if not isinstance(features, torch.Tensor) or not features.is_floating_point():
            kind = features.dtype if isinstance(features, torch.Tensor) else type(features).__name__
            raise TypeError(f"features must be a floating-point torch.Tensor, got {kind}")
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"features must have shape (batch, dim={self.dim}), got "
                f"{tuple(features.shape)}; pass the head's (batch, {self.dim}) features or build "
                f"the metric with dim={features.shape[-1] if features.dim() else 1}"
            )
        batch = features.shape[0]
        if (
            not isinstance(labels, torch.Tensor)
            or labels.is_floating_point()
            or labels.is_complex()
            or labels.dtype == torch.bool
        ):
            kind = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise TypeError(f"labels must be an integer torch.Tensor of class indices, got {kind}")
        if labels.shape != (batch,):
            raise ValueError(
                f"labels must have shape ({batch},) to match features, got {tuple(labels.shape)}"
            )
        if batch and (labels.min() < 0 or labels.max() >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)].unique()[:5].tolist()
            raise ValueError(
                f"labels {bad} are out of range for num_classes={self.num_classes}; labels must "
                f"be in [0, {self.num_classes - 1}]"
            )
        if not torch.isfinite(features).all():
            raise ValueError(
                "features contain NaN or Inf; the batch was rejected and the metric state is "
                "unchanged (check the backbone output)"
            )
        if logits is not None:
            if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
                kind = logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise TypeError(f"logits must be a floating-point torch.Tensor or None, got {kind}")
            if logits.shape != (batch, self.num_classes):
                raise ValueError(
                    f"logits must have shape (batch, num_classes) = ({batch}, "
                    f"{self.num_classes}), got {tuple(logits.shape)}"
                )
            if not torch.isfinite(logits).all():
                raise ValueError("logits contain NaN or Inf; the batch was rejected")
        seen = self.class_counts.sum().item()
        if seen > 0 and (logits is not None) != (self.samples_with_logits.item() > 0):
            had = "with" if self.samples_with_logits.item() > 0 else "without"
            raise ValueError(
                f"logits={'None' if logits is None else 'a tensor'}, but earlier batches came "
                f"{had} logits; pass logits for every batch or for none (or call reset())"
            )


def _forget_kept_features(module: NeuralCollapseMetrics, incompatible_keys) -> None:
    """After ``load_state_dict``: the loaded samples' features are not in the state, so the
    per-sample measures cannot cover them; mark them dropped (NaN + warning, as past the cap)."""
    module._kept = []
    module._num_kept = 0
    module.dropped_samples.copy_(torch.maximum(module.dropped_samples, module.class_counts.sum()))


# --- shared internals (both routes) --------------------------------------------------------------


def _check_classifier(
    weight: torch.Tensor | None, bias: torch.Tensor | None, num_classes: int, dim: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if weight is None:
        if bias is not None:
            raise ValueError("bias was given without weight; pass weight=W (K, d) as well")
        return None, None
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        kind = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"weight must be a floating-point torch.Tensor (K, d), got {kind}")
    if weight.shape != (num_classes, dim):
        raise ValueError(
            f"weight must have shape (num_classes, dim) = ({num_classes}, {dim}), got "
            f"{tuple(weight.shape)}; pass the head's K x d classifier (e.g. head.weight)"
        )
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf; pass a finite classifier")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            kind = bias.dtype if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise TypeError(f"bias must be a floating-point torch.Tensor (K,) or None, got {kind}")
        if bias.shape != (num_classes,):
            raise ValueError(
                f"bias must have shape ({num_classes},) or be None, got {tuple(bias.shape)}"
            )
        if not torch.isfinite(bias).all():
            raise ValueError("bias contains NaN or Inf; pass a finite bias or None")
        bias = bias.detach().to(STATISTICS_DTYPE)
    return weight.detach().to(STATISTICS_DTYPE), bias


def _global_metrics(
    statistics: _Statistics,
    num_classes: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> dict[str, float]:
    """Everything computable from the summed statistics alone."""
    device = statistics.class_means.device
    hbar = (statistics.class_means - statistics.global_mean).T  # (d, K)
    dim = hbar.shape[0]
    unit_hbar = hbar / torch.linalg.matrix_norm(hbar)
    results = {
        "nc1": nc1_from_statistics(statistics.within_class_covariance, hbar).item(),
        "nc2_h": etf_gram_deviation(hbar.T @ hbar).item(),
        "cv_h": coefficient_of_variation(hbar.T).item(),
        "etf_margin": num_classes / (num_classes - 1),
        # The nearest ETF lives on St(d, K): undefined (NaN) when d < K.
        "etf_distance": etf_distance(unit_hbar).item() if dim >= num_classes else _NAN,
        "n": statistics.num_samples,
    }
    with_logits = statistics.samples_with_logits
    results["acc1"] = 100.0 * statistics.correct_top1 / with_logits if with_logits else _NAN
    if num_classes >= 5:
        results["acc5"] = 100.0 * statistics.correct_top5 / with_logits if with_logits else _NAN
    if weight is None:
        results.update(nc2_w=_NAN, nc3=_NAN, cv_w=_NAN, equinorm=_NAN, bias_collapse=_NAN)
        return results
    weight = weight.to(device)
    cv_w = coefficient_of_variation(weight).item()
    results.update(
        nc2_w=etf_gram_deviation(weight @ weight.T).item(),
        nc3=etf_gram_deviation(weight @ hbar).item(),
        cv_w=cv_w,
        equinorm=abs(results["cv_h"] - cv_w),
        bias_collapse=bias_collapse(
            weight, None if bias is None else bias.to(device), statistics.global_mean
        ).item(),
    )
    return results


def _nan_per_sample() -> dict[str, float]:
    keys = ["ncc_mismatch", "margin_mean", "margin_min", *MARGIN_QUANTILES, "margin_max"]
    return dict.fromkeys(keys, _NAN)


def _per_sample_metrics(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    num_samples: int,
    statistics: _Statistics,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> dict[str, float]:
    """NCC mismatch and cosine margins of this process's samples against the global means.

    ``batches`` yields (features (B, d), labels (B,), network predictions (B,) or None), and
    ``num_samples`` rows in all (checked: the two-pass route needs a deterministic loader).
    Mismatch counts are summed and margins gathered over processes (collective), so every rank
    gets the same numbers. Margins are kept, one float64 per sample, for exact quantiles, in one
    buffer allocated up front (many small long-lived blocks would fragment the heap).
    """
    device = statistics.class_means.device
    if weight is not None:
        weight = weight.to(device)
        bias = None if bias is None else bias.to(device)
    mismatches = torch.zeros((), dtype=STATISTICS_DTYPE, device=device)
    compared = torch.zeros((), dtype=STATISTICS_DTYPE, device=device)
    margins = torch.empty(num_samples if weight is not None else 0, dtype=STATISTICS_DTYPE)
    margins = margins.to(device)
    seen = 0
    for features, labels, predictions in batches:
        if seen + features.shape[0] > num_samples:
            raise ValueError(
                f"the second pass yielded more than the {num_samples} samples of the first; the "
                "loader must yield the same samples each time (no random sampling or dropping)"
            )
        for start in range(0, features.shape[0], _CHUNK_ROWS):
            rows = slice(start, start + _CHUNK_ROWS)
            chunk = features[rows].to(device=device, dtype=STATISTICS_DTYPE)
            chunk_labels = labels[rows].to(device)
            if predictions is not None:
                chunk_predictions = predictions[rows].to(device)
            elif weight is not None:
                logits = chunk @ weight.T
                chunk_predictions = (logits if bias is None else logits + bias).argmax(dim=1)
            else:
                chunk_predictions = None
            if chunk_predictions is not None:
                nearest = nearest_class_centre(chunk, statistics.class_means)
                mismatches += (nearest != chunk_predictions).sum()
                compared += chunk.shape[0]
            if weight is not None:
                margins[seen : seen + chunk.shape[0]] = cosine_margins(
                    chunk, chunk_labels, statistics.global_mean, weight
                )
            seen += chunk.shape[0]
    if seen != num_samples:
        raise ValueError(
            f"the second pass yielded {seen} samples but the first {num_samples}; the loader "
            "must yield the same samples each time (no random sampling or dropping)"
        )
    totals = distributed.all_reduce_sum(torch.stack([mismatches, compared]))
    results = _nan_per_sample()
    if totals[1] > 0:
        results["ncc_mismatch"] = (100.0 * totals[0] / totals[1]).item()
    if weight is not None:
        everything = _gather_variable_length(margins).cpu().numpy()
        if everything.size:
            values = np.quantile(everything, list(MARGIN_QUANTILES.values()))
            results.update(zip(MARGIN_QUANTILES, values.tolist(), strict=True))
            results.update(
                margin_mean=float(everything.mean()),
                margin_min=float(everything.min()),
                margin_max=float(everything.max()),
            )
    return results


def _gather_variable_length(local: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D float64 tensor of any length from every process, in rank order.

    Written with :func:`guided_nc.distributed.all_reduce_sum` only (zero-padded slots), so the
    distributed module stays the only caller of torch.distributed.
    """
    world_size = distributed.world_size()
    if world_size == 1:
        return local
    lengths = torch.zeros(world_size, dtype=STATISTICS_DTYPE, device=local.device)
    lengths[distributed.rank()] = local.numel()
    lengths = distributed.all_reduce_sum(lengths).long().tolist()
    start = sum(lengths[: distributed.rank()])
    gathered = torch.zeros(sum(lengths), dtype=STATISTICS_DTYPE, device=local.device)
    gathered[start : start + local.numel()] = local
    return distributed.all_reduce_sum(gathered)


def _ordered(results: dict[str, float], num_classes: int) -> dict[str, float]:
    keys = [key for key in METRIC_KEYS if key != "acc5" or num_classes >= 5]
    return {key: float(results[key]) for key in keys}


# --- the two-pass route ------------------------------------------------------------


def _features_and_logits(
    feature_fn: Callable, logits_fn: Callable | None, inputs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    output = feature_fn(inputs)
    if isinstance(output, tuple | list):
        if len(output) != 2 or logits_fn is not None:
            raise ValueError(
                "feature_fn returned a sequence: it must be exactly (features, logits), and then "
                "logits_fn must be None"
            )
        return output[0], output[1]
    return output, (None if logits_fn is None else logits_fn(output))


def collect_metrics(
    feature_fn: Callable,
    loader: Iterable,
    num_classes: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    logits_fn: Callable | None = None,
    *,
    progress: bool = True,
) -> dict[str, float]:
    """Neural-collapse metrics of a whole split in two passes, memory independent of N.

    Pass 1 accumulates the float64 sufficient statistics (and accuracy); pass 2 recomputes the
    features and measures NCC mismatch and cosine margins against the *final* class means. Only
    the margins are kept (one float64 per sample, for exact quantiles). Same numbers as
    :meth:`NeuralCollapseMetrics.compute` with every feature kept.

    The loader must yield the same samples with the same features in both passes: evaluation
    transforms (no augmentation), a deterministic ``feature_fn`` (model in eval mode); the order
    may differ. Under torch.distributed every rank passes its own shard and gets the same numbers.

    Args:
        feature_fn: ``inputs -> features`` (B, d) or ``inputs -> (features, logits)``; run under
            ``torch.no_grad``.
        loader: iterable of ``(inputs, labels, ...)`` batches, labels (B,) int in [0, K).
        num_classes: K.
        weight, bias: the classifier, as in :meth:`NeuralCollapseMetrics.compute`.
        logits_fn: ``features -> logits`` (B, K), when ``feature_fn`` returns features only.
        progress: show tqdm bars (rank 0 only; tqdm also hides them when not on a terminal).

    Returns:
        the dict of :meth:`NeuralCollapseMetrics.compute`.
    """
    show = progress and distributed.is_main_process()

    def batches(description: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        bar = tqdm(loader, desc=description, disable=None if show else True, leave=False)
        for batch in bar:
            inputs, labels = batch[0], batch[1]
            features, logits = _features_and_logits(feature_fn, logits_fn, inputs)
            yield features, labels, logits

    with torch.no_grad():
        metric = None
        for features, labels, logits in batches("NC metrics, pass 1/2 (statistics)"):
            if metric is None:
                dim = features.shape[-1] if isinstance(features, torch.Tensor) else 0
                metric = NeuralCollapseMetrics(
                    num_classes, dim, max_kept_samples=0, device=features.device
                )
            metric.update(features, labels, logits)
        if metric is None:
            raise ValueError("loader yielded no batches; pass a loader over a non-empty split")
        weight, bias = _check_classifier(weight, bias, num_classes, metric.dim)
        statistics = metric._reduce_statistics()
        results = _global_metrics(statistics, num_classes, weight, bias)
        second_pass = (
            (features, labels, None if logits is None else logits.argmax(dim=1))
            for features, labels, logits in batches("NC metrics, pass 2/2 (NCC, margins)")
        )
        results.update(
            _per_sample_metrics(second_pass, metric.num_samples, statistics, weight, bias)
        )
    return _ordered(results, num_classes)
