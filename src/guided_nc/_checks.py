"""Validators shared by the maths modules (etf, solvers, heads, metrics).

Every error names the argument, the value and the fix (``docs/architecture.md``). The checks on
tensor *values* (NaN, orthonormality) are kept apart from the structural ones (type, dtype,
shape), so that the heads can run the structural checks eagerly and the value checks on the
device, without a host synchronisation.

``COMPUTE_DTYPE`` is the dtype in which the nearest-ETF solve, its backward and the class-mean
statistics run unless a caller asks for another one.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "COMPUTE_DTYPE",
    "check_batch_features",
    "check_class_matrix",
    "check_delta",
    "check_head_sizes",
    "check_labels",
    "check_max_iterations",
    "check_positive",
    "check_sizes",
    "check_stiefel",
    "orthonormality_error",
    "stored_tolerance",
]

#: dtype in which the nearest-ETF solve, its backward and the heads' statistics run.
COMPUTE_DTYPE = torch.float64


def stored_tolerance(dtype: torch.dtype) -> float:
    """Tolerance on ``max|(P^T P - I) x|`` for a Stiefel point *stored* in ``dtype``.

    A point computed exactly and rounded to ``dtype`` is off by a few units in the last place
    of that dtype (times a small factor for the sums in ``P^T P x``), so the tolerance follows
    the dtype's machine epsilon with a wide margin, and stays small enough that a matrix that is
    not orthonormal still fails: float64 1e-8 (eps 2.2e-16), float32 1e-4 (eps 1.2e-7),
    float16 / bfloat16 5e-2 (eps 9.8e-4 / 7.8e-3).
    """
    if dtype == torch.float64:
        return 1e-8
    if dtype == torch.float32:
        return 1e-4
    return 5e-2  # float16 (eps 1e-3) and bfloat16 (eps 8e-3): a few ulps times sqrt(K)


def check_sizes(dim: int, num_classes: int) -> None:
    """K >= 2 and d >= K (a point of St(d, K) needs d >= K)."""
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} is too small; a simplex ETF needs K >= 2")
    if dim < num_classes:
        raise ValueError(
            f"dim={dim} < num_classes={num_classes}: a point of St(d, K) needs d >= K; use a "
            f"feature dimension of at least {num_classes}"
        )


def check_class_matrix(features: torch.Tensor) -> int:
    """A (d, K) float matrix of class means, finite, d >= K >= 2; returns K.

    The finiteness test reads the tensor on the host (one synchronisation on a GPU).
    """
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 2:
        raise ValueError(
            f"features must be a 2-D (d, K) matrix of class means, got shape "
            f"{tuple(features.shape)}; stack the K class means as columns"
        )
    if not features.is_floating_point():
        raise TypeError(f"features must be floating point, got dtype {features.dtype}")
    dim, num_classes = features.shape
    check_sizes(dim, num_classes)
    if not torch.isfinite(features).all():
        raise ValueError(
            "features contain NaN or Inf; check the backbone output (e.g. lower the learning "
            "rate) before computing the nearest ETF"
        )
    return num_classes


def check_max_iterations(max_iterations: int) -> None:
    """An integer >= 1 (trust-region iterations)."""
    is_integer = isinstance(max_iterations, int) and not isinstance(max_iterations, bool)
    if not is_integer or max_iterations < 1:
        raise ValueError(f"max_iterations={max_iterations!r} must be an integer >= 1 (paper: 30)")


def check_delta(delta: float) -> float:
    """The proximal coefficient: a finite number >= 0; returns it as a float."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)):
        raise TypeError(f"delta must be a number, got {type(delta).__name__}")
    if not math.isfinite(delta) or delta < 0:
        raise ValueError(f"delta={delta} must be a finite number >= 0 (the default is 1e-3)")
    return float(delta)


def check_positive(name: str, value: float) -> float:
    """A finite number > 0; returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value} must be a finite number > 0")
    return float(value)


def orthonormality_error(frame: torch.Tensor) -> torch.Tensor:
    """``max(|column norms^2 - 1|, max|(P^T P - I) x|)`` for two fixed unit probes x, float64.

    O(dK) instead of the O(dK^2) Gram matrix: ``P^T P = I`` iff ``P^T P x = x`` for every x,
    so the column norms are tested exactly and ``P^T P - I`` on two fixed generic probe
    vectors (missing a defect would need ``P^T P - I`` to vanish on both, a measure-zero event
    for these fixed pseudo-random probes). Returns a 0-dim tensor on the frame's device.
    """
    matrix = frame.detach().to(COMPUTE_DTYPE)
    norm_error = (matrix.pow(2).sum(dim=0) - 1.0).abs().max()
    probes = _probe_vectors(frame.shape[-1], matrix.device)
    probe_error = (matrix.T @ (matrix @ probes) - probes).abs().max()
    return torch.maximum(norm_error, probe_error)


def check_stiefel(frame: torch.Tensor, name: str, dim: int, num_classes: int) -> torch.Tensor:
    """A (d, K) tensor with orthonormal columns, judged with the tolerance of *its* dtype.

    A float32 point passed to a float64 computation is still judged as float32 (issue: a
    float32-rounded previous frame must not fail a float64 tolerance). Returns ``frame``.
    """
    if not isinstance(frame, torch.Tensor) or tuple(frame.shape) != (dim, num_classes):
        shape = tuple(frame.shape) if isinstance(frame, torch.Tensor) else type(frame).__name__
        raise ValueError(f"{name} must be a ({dim}, {num_classes}) tensor, got {shape}")
    if not frame.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {frame.dtype}")
    error = orthonormality_error(frame)
    tolerance = stored_tolerance(frame.dtype)
    if not torch.isfinite(error) or error > tolerance:
        raise ValueError(
            f"{name} must have orthonormal columns (P^T P = I), but max|(P^T P - I) x| = "
            f"{float(error):.3g} > {tolerance:g} (the tolerance of {frame.dtype}) for unit "
            "probes x; pass a Stiefel point, e.g. the previous nearest_etf output"
        )
    return frame


def _probe_vectors(num_classes: int, device: torch.device) -> torch.Tensor:
    """Two fixed unit vectors of length K (float64) with generic, non-zero entries."""
    probes = torch.randn(
        num_classes, 2, generator=torch.Generator().manual_seed(0), dtype=COMPUTE_DTYPE
    )
    return (probes / probes.norm(dim=0)).to(device)


# --- heads: batches of features and labels -------------------------------------------------------


def check_head_sizes(num_features: int, num_classes: int, *, needs_stiefel: bool) -> None:
    """Integer d >= 1 and K >= 2; the ETF heads also need d >= K."""
    for name, value in (("num_features", num_features), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} is too small; a classifier needs K >= 2")
    if num_features < 1:
        raise ValueError(f"num_features={num_features} must be >= 1")
    if needs_stiefel and num_features < num_classes:
        raise ValueError(
            f"num_features={num_features} < num_classes={num_classes}: a simplex ETF head needs "
            f"d >= K; use a backbone with at least {num_classes} output features (e.g. a final "
            f"linear projection to {num_classes}) or the 'standard' head"
        )


def check_batch_features(features: torch.Tensor, num_features: int) -> None:
    """Structural checks of a (B, d) batch (type, dtype, shape); values are checked apart."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(
            f"features must be floating point, got dtype {features.dtype}; pass the backbone output"
        )
    if features.dim() != 2 or features.shape[1] != num_features or features.shape[0] == 0:
        raise ValueError(
            f"features must have shape (batch, {num_features}) with batch >= 1, got "
            f"{tuple(features.shape)}; flatten the backbone output and check num_features"
        )


def check_labels(labels: torch.Tensor | None, batch: int, *, required: bool) -> None:
    """Structural checks of labels (type, dtype, shape). The range is checked apart."""
    if labels is None:
        if required:
            raise ValueError(
                "labels=None, but the implicit ETF head needs the class labels in training mode "
                "to compute the class means; call head(features, labels), or head.eval() to "
                "classify with the last classifier"
            )
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(
            f"labels must be an integer tensor of class indices, got dtype {labels.dtype}; "
            f"use labels.long()"
        )
    if tuple(labels.shape) != (batch,):
        raise ValueError(
            f"labels must have shape ({batch},) to match features, got {tuple(labels.shape)}"
        )
