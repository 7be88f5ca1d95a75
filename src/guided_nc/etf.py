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
from collections.abc import Callable

import torch

from guided_nc._checks import (
    COMPUTE_DTYPE,
    check_class_matrix,
    check_delta,
    check_max_iterations,
    check_sizes,
    check_stiefel,
)

__all__ = [
    "SOLVERS",
    "PolarFactor",
    "centering_matrix",
    "check_solver",
    "etf_classifier",
    "etf_distance",
    "haar_stiefel",
    "nearest_etf",
    "polar_backward",
    "polar_factor",
    "register_solver",
    "simplex_etf",
]


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
    check_sizes(dim, num_classes)
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
    check_sizes(dim, num_classes)
    if isinstance(rotation, torch.Tensor):
        frame = check_stiefel(rotation, "rotation", dim, num_classes).to(COMPUTE_DTYPE)
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


def polar_backward(
    left: torch.Tensor, spectrum: torch.Tensor, right: torch.Tensor, grad_frame: torch.Tensor
) -> torch.Tensor:
    """dL/dA of the orthogonal polar factor ``P = U V^T``, from ``U``, ``s``, ``V``, ``G = dL/dP``.

    With ``Gh = U^T G V`` and ``F_ij = 1 / (s_i + s_j)``::

        dL/dA = U (F o (Gh - Gh^T)) V^T + (I - U U^T) G V S^-1 V^T
              = [U (F o (Gh - Gh^T) - Gh S^-1) + G V S^-1] V^T

    (four d x K x K products). At the exact polar factor ``(U, s, V)`` is the thin SVD of A. At
    any other Stiefel point P, ``B = sym(P^T A) = V diag(s) V^T`` and ``U = P V`` give the
    implicit-function (Proposition 1) gradient at that point (docs/etf.md); s may then be
    negative. Time O(dK^2 + K^3), memory O(dK + K^2). Reciprocals of ``|s_i + s_j|`` or
    ``|s_i|`` below ``K * eps * max|s|`` are set to 0 (pseudo-inverse convention), so a
    rank-deficient A (possible only with ``delta = 0``) gives a finite gradient.
    """
    grad_frame = grad_frame.to(left.dtype)
    tiny = spectrum.shape[-1] * torch.finfo(spectrum.dtype).eps * spectrum.abs().max()
    pair_sum = spectrum.unsqueeze(-1) + spectrum.unsqueeze(-2)
    keep_pair = pair_sum.abs() > tiny
    inverse_pair_sum = torch.where(keep_pair, 1.0 / torch.where(keep_pair, pair_sum, 1.0), 0.0)
    keep = spectrum.abs() > tiny
    inverse_spectrum = torch.where(keep, 1.0 / torch.where(keep, spectrum, 1.0), 0.0)
    grad_right = grad_frame @ right  # G V, (d, K)
    projected = left.transpose(-2, -1) @ grad_right  # Gh = U^T G V, (K, K)
    core = (projected - projected.transpose(-2, -1)) * inverse_pair_sum
    core = core - projected * inverse_spectrum  # F o (Gh - Gh^T) - Gh S^-1
    return (left @ core + grad_right * inverse_spectrum) @ right.transpose(-2, -1)


class PolarFactor(torch.autograd.Function):
    """Orthogonal polar factor ``P = U V^T`` of a d x K matrix ``A = U S V^T`` (d >= K).

    Forward: one thin SVD (``torch.linalg.svd``, ``full_matrices=False``). Backward (method.md
    section 2), for ``G = dL/dP``::

        Gh = U^T G V,  F_ij = 1 / (s_i + s_j)
        dL/dA = U (F o (Gh - Gh^T)) V^T + (I - U U^T) G V S^-1 V^T

    O(dK^2 + K^3) time, O(dK + K^2) memory (saved: U, s, V). Unlike autograd through
    ``torch.linalg.svd``, it is finite when singular values repeat (a collapsed, ETF-like Y):
    only the sums ``s_i + s_j`` appear. Runs in the dtype of A; :func:`polar_factor` casts to
    float64 first.

    Shape: A (d, K) -> P (d, K).
    """

    @staticmethod
    def forward(ctx, matrix: torch.Tensor) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        ctx.save_for_backward(u, s, vh.transpose(-2, -1))
        return u @ vh

    @staticmethod
    def backward(ctx, grad_frame: torch.Tensor) -> torch.Tensor:
        u, s, v = ctx.saved_tensors
        return polar_backward(u, s, v, grad_frame)


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """Differentiable orthogonal polar factor of a (d, K) matrix, d >= K.

    Computed in float64 and returned in the input's dtype. See :class:`PolarFactor`.

    Shape: matrix (d, K) -> (d, K), same dtype and device.
    """
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
        shape = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__
        raise ValueError(f"matrix must be a 2-D (d, K) tensor, got {shape}")
    if matrix.shape[0] < matrix.shape[1]:
        raise ValueError(
            f"matrix has shape {tuple(matrix.shape)} with d < K; the polar factor P^T P = I "
            "needs at least as many rows as columns (transpose it)"
        )
    return PolarFactor.apply(matrix.to(COMPUTE_DTYPE)).to(matrix.dtype)


#: An iterative solver registered by another module: ``solve(target, features, prox, delta,
#: max_iterations) -> P`` (float64, differentiable in ``target`` = A). See :func:`register_solver`.
_REGISTERED_SOLVERS: dict[str, Callable[..., torch.Tensor]] = {}

#: Solvers accepted by :func:`nearest_etf`: the closed form of this module, then the registered
#: ones ("trust-regions", registered by :mod:`guided_nc.solvers` when the package is imported).
SOLVERS = ("svd", "trust-regions")


def register_solver(name: str, solve: Callable[..., torch.Tensor]) -> None:
    """Make ``nearest_etf(..., solver=name)`` call ``solve(target, features, prox, delta,
    max_iterations)``.

    This keeps the maths module free of any import of an iterative solver: the solver module
    registers itself (``guided_nc.solvers`` registers ``"trust-regions"``; ``import guided_nc``
    imports it), and the import arrow runs from the solver to the maths, never back.
    """
    if name not in SOLVERS or name == "svd":
        raise ValueError(f"name={name!r} is not a registrable solver; use one of {SOLVERS[1:]}")
    _REGISTERED_SOLVERS[name] = solve


def check_solver(solver: str) -> None:
    """ValueError unless ``solver`` is one of :data:`SOLVERS`."""
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not supported; use one of {SOLVERS}")


def nearest_etf(
    features: torch.Tensor,
    prox: torch.Tensor | None = None,
    delta: float = 1e-3,
    solver: str = "svd",
    *,
    max_iterations: int = 30,
) -> torch.Tensor:
    """The Stiefel point P of the simplex ETF nearest to the class-mean matrix ``features`` (Y).

    Solves (paper eq. 6 with the proximal term of eq. 7)::

        min_{P in St(d,K)} ||Y - P M/sqrt(K-1)||_F^2 + (delta/2)||P - prox||_F^2

    exactly as the polar factor of ``A = c Y M + delta * prox`` (c = 2/sqrt(K-1)).
    Differentiable in Y through :class:`PolarFactor` (O(dK) memory); ``prox`` is a constant
    (detached, no gradient), as in the paper. The classifier is ``etf_classifier(P)``.

    Args:
        features: Y, (d, K) centred class means (any scale; the heads pass unit Frobenius norm).
            float16/bfloat16/float32/float64, any device.
        prox: the previous solution, (d, K) with orthonormal columns (any float dtype, judged
            with that dtype's tolerance). ``None`` means the first-step rule of method.md:
            ``P0 = polar(c Y M + delta eye(d,K))``.
        delta: proximal coefficient, >= 0. With ``delta = 0`` the solution is unique only in
            ``P M`` (the component along ``P 1`` is arbitrary) and the gradient may not exist.
        solver: ``"svd"`` (closed form, one thin SVD) or ``"trust-regions"`` (pymanopt's
            Riemannian trust regions from ``prox``, the paper's solver, CPU numpy float64; see
            :mod:`guided_nc.solvers`). Both use the same closed-form backward.
        max_iterations: trust-region iterations (``solver="trust-regions"`` only; paper: 30).

    Shape: features (d, K) -> P (d, K), in the dtype and on the device of ``features``;
    computed in float64 (docs/etf.md, "Precision").

    Raises:
        ValueError: non-2-D features, K < 2, d < K, non-finite features, prox of the wrong shape
            or not orthonormal, delta < 0, unknown solver.
    """
    num_classes = check_class_matrix(features)
    check_delta(delta)
    check_solver(solver)
    if solver != "svd":
        check_max_iterations(max_iterations)
    dim = features.shape[0]
    if prox is None:
        prox = torch.eye(dim, num_classes, dtype=COMPUTE_DTYPE, device=features.device)
    else:
        prox = check_stiefel(prox, "prox", dim, num_classes).detach()
    y = features.to(COMPUTE_DTYPE)
    prox = prox.to(y)
    scale = 2.0 / math.sqrt(num_classes - 1)
    target = scale * (y - y.mean(dim=1, keepdim=True)) + delta * prox  # A = c Y M + delta prox
    if solver == "svd":
        frame = PolarFactor.apply(target)
    else:
        if solver not in _REGISTERED_SOLVERS:
            raise RuntimeError(
                f"solver={solver!r} is not registered; import guided_nc (or guided_nc.solvers) "
                "before calling nearest_etf with it"
            )
        frame = _REGISTERED_SOLVERS[solver](target, y.detach(), prox, delta, max_iterations)
    return frame.to(features.dtype)


def etf_distance(features: torch.Tensor) -> torch.Tensor:
    """Squared distance from Y to its nearest simplex ETF, in closed form (no proximal term).

    ``min_{P in St(d,K)} ||Y - P M/sqrt(K-1)||_F^2 = ||Y||_F^2 + 1 - c ||Y M||_*``
    (nuclear norm). Callers normalise Y to unit Frobenius norm to get a scale-free distance.

    Shape: features (d, K) -> scalar tensor, float64.
    """
    num_classes = check_class_matrix(features)
    y = features.to(COMPUTE_DTYPE)
    centred = y - y.mean(dim=1, keepdim=True)
    nuclear = torch.linalg.svdvals(centred).sum()
    return y.pow(2).sum() + 1.0 - 2.0 / math.sqrt(num_classes - 1) * nuclear
