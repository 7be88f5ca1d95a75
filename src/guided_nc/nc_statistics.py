"""Neural-collapse statistics: pure functions of float64 sums, and the one per-sample route.

Everything here is plain torch (no torchmetrics), so that :class:`guided_nc.metrics.
NeuralCollapseMetrics` is a thin torchmetrics adapter over it and :func:`guided_nc.metrics.
collect_metrics` uses the very same code:

* one function per formula (method.md section 6, ``docs/metrics.md``): :func:`nc1_from_statistics`,
  :func:`etf_gram_deviation` (NC2 and NC3), :func:`coefficient_of_variation` (equinorm),
  :func:`bias_collapse`, :func:`nearest_class_centre` (NC4), :func:`cosine_margins`,
  :func:`ce_lower_bound`; the ETF distance is :func:`guided_nc.etf.etf_distance`;
* the sums: :func:`statistics_from_sums` turns the shifted float64 sums (class counts K, class
  shifts and shifted class sums K x d, shifted second moment d x d) into class means, the global
  mean (of either convention, :data:`GLOBAL_MEANS`) and Sigma_W (:class:`Statistics`);
  :func:`sum_over_processes` adds the sums of every process about one common shift;
* :func:`global_metrics`: every key that needs only the statistics;
* :func:`per_sample_metrics`: the one per-sample route (NCC mismatch and cosine margins against
  the final means), fed with kept features (the Metric) or a second pass (collect_metrics).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from guided_nc import distributed
from guided_nc.etf import centering_matrix, etf_distance

__all__ = [
    "GLOBAL_MEANS",
    "MARGIN_QUANTILES",
    "METRIC_KEYS",
    "STATISTICS_DTYPE",
    "Statistics",
    "bias_collapse",
    "ce_lower_bound",
    "check_batch",
    "check_classifier",
    "check_global_mean",
    "coefficient_of_variation",
    "cosine_margins",
    "etf_gram_deviation",
    "global_metrics",
    "nan_per_sample",
    "nc1_from_statistics",
    "nearest_class_centre",
    "ordered_metrics",
    "per_sample_metrics",
    "shifted_batch",
    "statistics_from_sums",
    "sum_over_processes",
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


#: Conventions for the global mean mu_G that centres the class means: ``"weighted"`` (the mean
#: of all samples, (1/N) sum_i h_i = sum_k (n_k/N) mu_k; this library's default and the paper
#: release's) or ``"unweighted"`` (the mean of the class means, (1/K) sum_k mu_k, as
#: rhubarbwu/neural-collapse and Papyan-style scripts). Equal for balanced classes.
GLOBAL_MEANS = ("weighted", "unweighted")


def check_global_mean(global_mean: str) -> str:
    """``global_mean`` must be one of :data:`GLOBAL_MEANS`; returns it."""
    if global_mean not in GLOBAL_MEANS:
        raise ValueError(
            f"global_mean={global_mean!r} is not supported; use 'weighted' (mean of all "
            "samples, the default) or 'unweighted' (mean of the class means, as "
            "rhubarbwu/neural-collapse)"
        )
    return global_mean


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


# --- sums -> statistics -------------------------------------------------------------------------


@dataclass(frozen=True)
class Statistics:
    """Statistics of every sample the states cover (float64): one process, or all once synced."""

    counts: torch.Tensor  # (K,)
    class_means: torch.Tensor  # (K, d); NaN rows for classes without samples
    global_mean: torch.Tensor  # (d,)
    within_class_covariance: torch.Tensor  # (d, d)
    num_samples: float
    correct_top1: float
    correct_top5: float
    samples_with_logits: float
    dropped_samples: float
    restored_samples: float

    @property
    def every_class_seen(self) -> bool:
        return bool((self.counts > 0).all().item())


def statistics_from_sums(
    counts: torch.Tensor,
    shifts: torch.Tensor,
    shifted_sums: torch.Tensor,
    second_moment: torch.Tensor,
    scalars: dict[str, float],
    *,
    global_mean: str = "weighted",
    every_class: bool = True,
) -> Statistics:
    """Means and Sigma_W from the shifted float64 sums (no communication).

    With the shift ``s_k`` of class k, ``T_k = sum_{y_i = k} (h_i - s_k)`` and
    ``C = sum_i (h_i - s_{y_i})(h_i - s_{y_i})^T``: ``mu_k = s_k + T_k / n_k`` and
    ``N Sigma_W = C - sum_k T_k T_k^T / n_k``, both terms of the within-class size (stable near
    collapse). ``global_mean``: ``"weighted"`` (1/N) sum_i h_i or ``"unweighted"`` (1/K) sum_k
    mu_k over the classes seen.

    Shape: counts (K,), shifts and shifted_sums (K, d), second_moment (d, d); scalars: the
    accuracy counters by name (``correct_top1``, ...) -> :class:`Statistics`, float64.

    Raises:
        RuntimeError: no sample. ValueError: a class without samples, with ``every_class``.
    """
    num_samples = float(counts.sum().item())
    if num_samples == 0:
        raise RuntimeError(
            "NeuralCollapseMetrics.compute() called before any sample was seen; call "
            "update(features, labels) first"
        )
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty and every_class:
        raise ValueError(
            f"classes {empty} have no samples (of num_classes={counts.numel()}); the class "
            "means are undefined. Evaluate a split that contains every class, or metrics "
            "over the classes present with a smaller num_classes and remapped labels"
        )
    safe_counts = counts.clamp(min=1).unsqueeze(1)
    seen = (counts > 0).unsqueeze(1)
    class_means = torch.where(seen, shifts + shifted_sums / safe_counts, _NAN)
    if check_global_mean(global_mean) == "unweighted":
        centre = class_means[seen.squeeze(1)].mean(dim=0)
    else:
        centre = torch.addcmul(shifted_sums, counts.unsqueeze(1), shifts).sum(dim=0) / num_samples
    scaled = shifted_sums / safe_counts.sqrt()
    scatter = torch.addmm(second_moment, scaled.T, scaled, alpha=-1.0)
    return Statistics(
        counts=counts,
        class_means=class_means,
        global_mean=centre,
        within_class_covariance=scatter.div_(num_samples),
        num_samples=num_samples,
        **scalars,
    )


def shifted_batch(
    values: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor, shifts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch's contribution to the shifted sums, without touching the running sums.

    A class seen for the first time gets its mean in this batch as its shift ``s_k`` (a
    class-mean estimate, which keeps the shifted sums of the within-class size); the others keep
    theirs. Returns ``(batch_counts, shifts, shifted)``: then ``T += index_add(shifted)``,
    ``C += shifted^T shifted`` and ``counts += batch_counts``.

    Shape: values (B, d) float64, labels (B,) int64, counts (K,), shifts (K, d) -> (K,),
    (K, d) (the same tensor when no class is new), (B, d); float64.
    """
    batch_counts = torch.bincount(labels, minlength=counts.numel()).to(STATISTICS_DTYPE)
    first_seen = (counts == 0) & (batch_counts > 0)
    if first_seen.any():  # new classes: their shift is their mean in this batch
        batch_sums = torch.zeros_like(shifts).index_add_(0, labels, values)
        batch_means = batch_sums / batch_counts.clamp(min=1).unsqueeze(1)
        shifts = torch.where(first_seen.unsqueeze(1), batch_means, shifts)
    return batch_counts, shifts, values - shifts[labels]


def sum_over_processes(
    counts: torch.Tensor,
    shifts: torch.Tensor,
    shifted_sums: torch.Tensor,
    second_moment: torch.Tensor,
    scalars: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum every process's statistics, after converting them to one common shift (float64).

    Each process r accumulates about its own shifts s_rk (class k's mean in its first local batch),
    so its shifted sums T_rk = sum (h - s_rk) and second moment C_r = sum (h - s_r)(h - s_r)^T
    cannot simply be added. Two all-reduces through :func:`guided_nc.distributed.all_reduce_sum`:

    1. the raw class sums ``T_rk + n_rk s_rk`` and the counts ``n_rk`` (K x d + K), giving the
       global class means c_k, identical on every rank (the same reduced numbers, the same
       division);
    2. each process's statistics about c: with ``delta_rk = s_rk - c_k`` (within-class size),
       ``T'_rk = T_rk + n_rk delta_rk`` and
       ``C'_r = C_r + T_r^T delta_r + delta_r^T T'_r``, which expands to
       ``C_r + T^T delta + delta^T T + delta^T diag(n) delta`` = ``sum (h - c)(h - c)^T``.
       Every term is of the within-class size, so the conversion keeps the shifted formula's
       stability near collapse. Then one flat buffer (K x d + K + d x d + scalars) is summed.

    Shape: counts (K,), shifts/shifted_sums (K, d), second_moment (d, d), scalars (S,) ->
    the summed (counts, common shifts c, shifted sums, second moment, scalars), all float64.
    """
    num_classes, dim = shifts.shape
    factory = {"dtype": STATISTICS_DTYPE, "device": counts.device}
    means_buffer = torch.empty(num_classes * dim + num_classes, **factory)
    raw_sums, total_counts = torch.split(means_buffer, [num_classes * dim, num_classes])
    raw_sums = raw_sums.view(num_classes, dim)
    torch.addcmul(shifted_sums, counts.unsqueeze(1), shifts, out=raw_sums)
    total_counts.copy_(counts)
    distributed.all_reduce_sum(means_buffer)
    common = raw_sums / total_counts.clamp(min=1).unsqueeze(1)  # 0 for classes seen nowhere
    # Rows of classes this process has not seen carry no samples (n_rk = 0, T_rk = 0).
    delta = torch.where((counts > 0).unsqueeze(1), shifts - common, 0.0)
    sizes = [num_classes * dim, num_classes, dim * dim, scalars.numel()]
    flat = torch.empty(sum(sizes), **factory)
    sums, flat_counts, moment, flat_scalars = torch.split(flat, sizes)
    sums, moment = sums.view(num_classes, dim), moment.view(dim, dim)
    torch.addcmul(shifted_sums, counts.unsqueeze(1), delta, out=sums)  # T' = T + n delta
    moment.copy_(second_moment)
    moment.addmm_(shifted_sums.T, delta).addmm_(delta.T, sums)  # C' = C + T^T delta + delta^T T'
    flat_counts.copy_(counts)
    flat_scalars.copy_(scalars)
    distributed.all_reduce_sum(flat)
    return flat_counts, common, sums, moment, flat_scalars


# --- the statistics' metrics and the per-sample route ---------------------------------------------


def check_batch(
    features: torch.Tensor,
    labels: torch.Tensor,
    logits: torch.Tensor | None,
    num_classes: int,
    dim: int,
) -> None:
    """TypeError/ValueError (one line, naming the argument and the fix) unless ``features`` is a
    finite floating (B, dim) tensor, ``labels`` an integer (B,) tensor in [0, K) and ``logits``
    None or a finite floating (B, K) tensor."""
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        kind = features.dtype if isinstance(features, torch.Tensor) else type(features).__name__
        raise TypeError(f"features must be a floating-point torch.Tensor, got {kind}")
    if features.dim() != 2 or features.shape[1] != dim:
        raise ValueError(
            f"features must have shape (batch, dim={dim}), got "
            f"{tuple(features.shape)}; pass the head's (batch, {dim}) features or build "
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
    if batch and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)].unique()[:5].tolist()
        raise ValueError(
            f"labels {bad} are out of range for num_classes={num_classes}; labels must "
            f"be in [0, {num_classes - 1}]"
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
        if logits.shape != (batch, num_classes):
            raise ValueError(
                f"logits must have shape (batch, num_classes) = ({batch}, "
                f"{num_classes}), got {tuple(logits.shape)}"
            )
        if not torch.isfinite(logits).all():
            raise ValueError("logits contain NaN or Inf; the batch was rejected")


def check_classifier(
    weight: torch.Tensor | None, bias: torch.Tensor | None, num_classes: int, dim: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Validate a classifier W (K, d) and bias (K,) or None; returns float64 detached copies."""
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


def global_metrics(
    statistics: Statistics,
    num_classes: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> dict[str, float]:
    """Everything computable from the statistics alone (float64).

    The keys that need every class mean (``nc1``, ``nc2_h``, ``nc3``, ``cv_h``, ``equinorm``,
    ``etf_distance``) are NaN when a class has no samples (only
    :meth:`guided_nc.metrics.NeuralCollapseMetrics.forward` gets that far; ``compute`` raises
    first).
    """
    device = statistics.class_means.device
    results: dict[str, float] = {
        "etf_margin": num_classes / (num_classes - 1),
        "n": statistics.num_samples,
        **dict.fromkeys(["nc1", "nc2_h", "cv_h", "etf_distance"], _NAN),
    }
    hbar = None
    if statistics.every_class_seen:
        hbar = (statistics.class_means - statistics.global_mean).T  # (d, K)
        dim = hbar.shape[0]
        unit_hbar = hbar / torch.linalg.matrix_norm(hbar)
        results.update(
            nc1=nc1_from_statistics(statistics.within_class_covariance, hbar).item(),
            nc2_h=etf_gram_deviation(hbar.T @ hbar).item(),
            cv_h=coefficient_of_variation(hbar.T).item(),
            # The nearest ETF lives on St(d, K): undefined (NaN) when d < K.
            etf_distance=etf_distance(unit_hbar).item() if dim >= num_classes else _NAN,
        )
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
        nc3=etf_gram_deviation(weight @ hbar).item() if hbar is not None else _NAN,
        cv_w=cv_w,
        equinorm=abs(results["cv_h"] - cv_w),
        bias_collapse=bias_collapse(
            weight, None if bias is None else bias.to(device), statistics.global_mean
        ).item(),
    )
    return results


def nan_per_sample() -> dict[str, float]:
    """The per-sample keys, all NaN (no classifier and no predictions, or no kept features)."""
    keys = ["ncc_mismatch", "margin_mean", "margin_min", *MARGIN_QUANTILES, "margin_max"]
    return dict.fromkeys(keys, _NAN)


def per_sample_metrics(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    num_samples: int,
    statistics: Statistics,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    collective: bool,
    kept_margins: list | None = None,
) -> dict[str, float]:
    """NCC mismatch and cosine margins of this process's samples against the given means (float64).

    ``kept_margins``, when a list, receives the margins of every sample (numpy float64, in rank
    order under torch.distributed).

    ``batches`` yields (features (B, d), labels (B,), network predictions (B,) or None), and
    ``num_samples`` rows in all (checked: the two-pass route needs a deterministic loader).
    With ``collective`` (the statistics are the sums over processes), mismatch counts are summed
    and margins gathered over processes, so every rank gets the same numbers. Margins are kept,
    one float64 per sample, for exact quantiles, in one buffer allocated up front (many small
    long-lived blocks would fragment the heap). NCC needs every class mean: NaN otherwise.
    """
    device = statistics.class_means.device
    if weight is not None:
        weight = weight.to(device)
        bias = None if bias is None else bias.to(device)
    mismatches = torch.zeros((), dtype=STATISTICS_DTYPE, device=device)
    compared = torch.zeros((), dtype=STATISTICS_DTYPE, device=device)
    margins = torch.empty(num_samples if weight is not None else 0, dtype=STATISTICS_DTYPE)
    margins = margins.to(device)
    every_mean = statistics.every_class_seen
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
            if chunk_predictions is not None and every_mean:
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
    totals = torch.stack([mismatches, compared])
    if collective:
        totals = distributed.all_reduce_sum(totals)
    results = nan_per_sample()
    if totals[1] > 0:
        results["ncc_mismatch"] = (100.0 * totals[0] / totals[1]).item()
    if weight is not None:
        everything = (_gather_variable_length(margins) if collective else margins).cpu().numpy()
        if kept_margins is not None:
            kept_margins.append(everything)
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


def ordered_metrics(results: dict[str, float], num_classes: int) -> dict[str, float]:
    """The result dict in :data:`METRIC_KEYS` order (``acc5`` only when K >= 5), as floats."""
    keys = [key for key in METRIC_KEYS if key != "acc5" or num_classes >= 5]
    return {key: float(results[key]) for key in keys}
