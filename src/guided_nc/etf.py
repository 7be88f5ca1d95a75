"""Simplex equiangular tight frames (ETFs) and the differentiable nearest-ETF layer.

Pure maths, no training state: see ``docs/etf.md`` for the derivation.

Notation (method.md): d features, K classes, ``M = I_K - 11^T/K``, ``c = 2/sqrt(K-1)``,
``St(d, K) = {P in R^{d x K}: P^T P = I_K}`` (needs d >= K).

The nearest simplex ETF to a d x K matrix ``Y`` (paper eq. 6 with the proximal term of eq. 7),

    P* = argmin_{P in St(d,K)} ||Y - P M / sqrt(K-1)||_F^2 + (delta/2) ||P - P_prev||_F^2,

is the orthogonal polar factor of ``A = c Y M + delta P_prev`` (orthogonal Procrustes), i.e. one
thin SVD ``A = U S V^T -> P* = U V^T``. Its gradient has the closed form implemented in
:class:`PolarFactor`, which equals the paper's implicit-function-theorem gradient at the optimum.

Precision: the SVD and the backward always run in float64, whatever the input dtype, because the
smallest singular value of ``A`` is about ``delta`` and the backward divides by ``s_i + s_j``;
results are cast back to the input's dtype.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "PolarFactor",
    "centering_matrix",
    "etf_classifier",
    "etf_distance",
    "haar_stiefel",
    "nearest_etf",
    "polar_factor",
    "simplex_etf",
]

#: dtype in which the SVD and its backward run.
COMPUTE_DTYPE = torch.float64


def centering_matrix(
    num_classes: int, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """The K x K centring matrix ``M = I_K - (1/K) 1 1^T`` (symmetric, idempotent, trace K-1)."""
    eye = torch.eye(num_classes, dtype=dtype, device=device)
    return eye - 1.0 / num_classes


def haar_stiefel(
    dim: int,
    num_classes: int,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A Haar-distributed point of St(d, K): QR of a Gaussian d x K matrix with the sign fix.

    Multiplying each column of Q by the sign of the matching diagonal entry of R makes the
    factorisation unique, so Q is exactly Haar (Mezzadri 2007). Drawn in float64 on the CPU
    from ``generator`` (so a seed gives the same point on every device), then cast.

    Shape: returns (dim, num_classes) with ``P^T P = I``.
    """
    _check_sizes(dim, num_classes)
    gaussian = torch.randn(dim, num_classes, generator=generator, dtype=COMPUTE_DTYPE)
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).to(dtype=dtype, device=device)


def etf_classifier(frame: torch.Tensor) -> torch.Tensor:
    """The simplex-ETF classifier ``W = sqrt(K/(K-1)) M P^T`` of a Stiefel point P.

    Rows of W have unit norm and ``W W^T = K/(K-1) M``; W depends on P only through ``P M``.

    Shape: frame (d, K) -> W (K, d), same dtype and device. Differentiable in ``frame``.
    """
    num_classes = frame.shape[-1]
    centred = frame - frame.mean(dim=-1, keepdim=True)  # P M
    return math.sqrt(num_classes / (num_classes - 1)) * centred.transpose(-2, -1)


def simplex_etf(
    num_classes: int,
    dim: int,
    rotation: str | torch.Tensor = "canonical",
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A simplex ETF classifier ``sqrt(K/(K-1)) M P^T`` (K x d, unit-norm rows).

    Args:
        num_classes: K >= 2.
        dim: d >= K.
        rotation: ``"canonical"`` (P = the first K columns of I_d), ``"haar"`` (a Haar-random point
            of St(d, K) drawn from ``generator``) or a (d, K) tensor with orthonormal columns.
        generator: random generator for ``"haar"``.

    Shape: returns (num_classes, dim) in ``dtype``.
    """
    _check_sizes(dim, num_classes)
    if isinstance(rotation, torch.Tensor):
        frame = _check_stiefel(rotation, "rotation", dim, num_classes).to(COMPUTE_DTYPE)
    elif rotation == "canonical":
        frame = torch.eye(dim, num_classes, dtype=COMPUTE_DTYPE)
    elif rotation == "haar":
        frame = haar_stiefel(dim, num_classes, generator, dtype=COMPUTE_DTYPE)
    else:
        raise ValueError(
            f"rotation={rotation!r} is not supported; use 'canonical', 'haar' or a "
            f"({dim}, {num_classes}) tensor with orthonormal columns"
        )
    return etf_classifier(frame.cpu()).to(dtype=dtype, device=device)


class PolarFactor(torch.autograd.Function):
    """Orthogonal polar factor ``P = U V^T`` of a d x K matrix ``A = U S V^T`` (d >= K).

    Forward: one thin SVD. Backward (method.md section 2), for ``G = dL/dP``::

        Gh = U^T G V,  F_ij = 1 / (s_i + s_j)
        dL/dA = U (F o (Gh - Gh^T)) V^T + (I - U U^T) G V S^-1 V^T

    O(dK^2 + K^3) time, O(dK + K^2) memory. Entries with ``s_i + s_j = 0`` (A rank-deficient,
    possible only with ``delta = 0``) use the pseudo-inverse convention (0), so the gradient stays
    finite. Runs in the dtype of ``A``; :func:`polar_factor` casts to float64 first.
    """

    @staticmethod
    def forward(ctx, matrix: torch.Tensor) -> torch.Tensor:  # noqa: D102
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        ctx.save_for_backward(u, s, vh)
        return u @ vh

    @staticmethod
    def backward(ctx, grad_frame: torch.Tensor) -> torch.Tensor:  # noqa: D102
        u, s, vh = ctx.saved_tensors
        v = vh.transpose(-2, -1)
        grad_frame = grad_frame.to(u.dtype)
        grad_v = grad_frame @ v  # G V, (d, K)
        projected = u.transpose(-2, -1) @ grad_v  # U^T G V, (K, K)
        pair_sum = s.unsqueeze(-1) + s.unsqueeze(-2)
        inverse_pair_sum = torch.where(pair_sum > 0, 1.0 / pair_sum, torch.zeros_like(pair_sum))
        inner = u @ ((projected - projected.transpose(-2, -1)) * inverse_pair_sum)
        inverse_s = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
        outer = (grad_v - u @ projected) * inverse_s  # (I - U U^T) G V S^-1
        return (inner + outer) @ vh


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """Differentiable orthogonal polar factor of a (d, K) matrix, d >= K.

    Computed in float64 and returned in the input's dtype. See :class:`PolarFactor`.
    """
    return PolarFactor.apply(matrix.to(COMPUTE_DTYPE)).to(matrix.dtype)


def nearest_etf(
    features: torch.Tensor,
    prox: torch.Tensor | None = None,
    delta: float = 1e-3,
    solver: str = "svd",
) -> torch.Tensor:
    """The Stiefel point P of the simplex ETF nearest to the class-mean matrix ``features`` (Y).

    Solves ``min_{P in St(d,K)} ||Y - P M/sqrt(K-1)||_F^2 + (delta/2)||P - prox||_F^2`` exactly as
    the polar factor of ``A = c Y M + delta * prox``. Differentiable in Y through
    :class:`PolarFactor`; ``prox`` is a constant (detached, no gradient), as in the paper.

    Args:
        features: Y, (d, K) centred class means (any scale; the heads pass unit Frobenius norm).
        prox: the previous solution, (d, K) with orthonormal columns. ``None`` means the first-step
            rule of method.md: ``prox = eye(d, K)``.
        delta: proximal coefficient, >= 0. With ``delta = 0`` the solution is unique only in
            ``P M`` (the component along ``P 1`` is arbitrary).
        solver: ``"svd"`` (closed form) or ``"trust-regions"`` (pymanopt's Riemannian trust
            regions, the paper's solver; see :mod:`guided_nc.solvers`). Both use the same backward.

    Shape: features (d, K) -> P (d, K), in the dtype and on the device of ``features``;
    computed in float64.
    """
    num_classes = _check_features(features)
    _check_delta(delta)
    dim = features.shape[0]
    if prox is None:
        prox = torch.eye(dim, num_classes, dtype=COMPUTE_DTYPE, device=features.device)
    else:
        prox = _check_stiefel(prox, "prox", dim, num_classes).detach()
    y = features.to(COMPUTE_DTYPE)
    scale = 2.0 / math.sqrt(num_classes - 1)
    target = scale * (y - y.mean(dim=1, keepdim=True)) + delta * prox.to(y)  # A = c Y M + delta prox
    if solver == "svd":
        return PolarFactor.apply(target).to(features.dtype)
    if solver == "trust-regions":
        from guided_nc.solvers import trust_region_nearest_etf

        return trust_region_nearest_etf(features, prox, delta).to(features.dtype)
    raise ValueError(f"solver={solver!r} is not supported; use 'svd' or 'trust-regions'")


def etf_distance(features: torch.Tensor) -> torch.Tensor:
    """Squared distance from Y to its nearest simplex ETF, in closed form (no proximal term).

    ``min_{P in St(d,K)} ||Y - P M/sqrt(K-1)||_F^2 = ||Y||_F^2 + 1 - c ||Y M||_*``
    (nuclear norm). Callers normalise Y to unit Frobenius norm to get a scale-free distance.

    Shape: features (d, K) -> scalar tensor, float64.
    """
    num_classes = _check_features(features)
    y = features.to(COMPUTE_DTYPE)
    centred = y - y.mean(dim=1, keepdim=True)
    nuclear = torch.linalg.svdvals(centred).sum()
    return y.pow(2).sum() + 1.0 - 2.0 / math.sqrt(num_classes - 1) * nuclear


# --- validation helpers (errors name the argument, the value and the fix) ---------------------


def _check_sizes(dim: int, num_classes: int) -> None:
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} is too small; a simplex ETF needs K >= 2")
    if dim < num_classes:
        raise ValueError(
            f"dim={dim} < num_classes={num_classes}: a point of St(d, K) needs d >= K; use a "
            f"feature dimension of at least {num_classes}"
        )


def _check_features(features: torch.Tensor) -> int:
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
    _check_sizes(dim, num_classes)
    if not torch.isfinite(features).all():
        raise ValueError(
            "features contain NaN or Inf; check the backbone output (e.g. lower the learning "
            "rate) before computing the nearest ETF"
        )
    return num_classes


def _check_delta(delta: float) -> None:
    if not math.isfinite(delta) or delta < 0:
        raise ValueError(f"delta={delta} must be a finite number >= 0 (the default is 1e-3)")


def _check_stiefel(frame: torch.Tensor, name: str, dim: int, num_classes: int) -> torch.Tensor:
    if not isinstance(frame, torch.Tensor) or tuple(frame.shape) != (dim, num_classes):
        shape = tuple(frame.shape) if isinstance(frame, torch.Tensor) else type(frame).__name__
        raise ValueError(f"{name} must be a ({dim}, {num_classes}) tensor, got {shape}")
    gram = frame.to(COMPUTE_DTYPE).T @ frame.to(COMPUTE_DTYPE)
    error = (gram - torch.eye(num_classes, dtype=COMPUTE_DTYPE, device=frame.device)).abs().max()
    tolerance = 1e-4 if frame.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-8
    if not torch.isfinite(error) or error > tolerance:
        raise ValueError(
            f"{name} must have orthonormal columns (P^T P = I), but max|P^T P - I| = "
            f"{float(error):.3g}; pass a Stiefel point, e.g. the previous nearest_etf output"
        )
    return frame
