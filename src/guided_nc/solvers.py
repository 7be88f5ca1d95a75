"""The paper's own solvers for the nearest-ETF layer: reference oracles and benchmark baseline.

* :func:`trust_region_nearest_etf` - the forward as the paper computes it: pymanopt's Riemannian
  trust regions on St(d, K) (30 iterations, warm-started from the previous solution).
* :func:`dense_ddn_backward` - the backward as the paper computes it: Proposition 1 (Gould et
  al.'s deep declarative networks) with the dense K(K+1)/2 x dK constraint Jacobian.

Training never needs either: :func:`guided_nc.etf.nearest_etf` solves the same problem in closed
form and differentiates it in O(dK) memory. These exist to check that claim and to time it
(``guided-nc bench etf``). See ``docs/etf.md``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from guided_nc._checks import (
    COMPUTE_DTYPE,
    check_class_matrix,
    check_delta,
    check_max_iterations,
    check_stiefel,
)
from guided_nc.etf import register_solver

__all__ = [
    "dense_ddn_backward",
    "dense_ddn_bytes",
    "trust_region_nearest_etf",
]


def trust_region_nearest_etf(
    features: torch.Tensor,
    prox: torch.Tensor | None,
    delta: float = 1e-3,
    max_iterations: int = 30,
    *,
    min_gradient_norm: float = 1e-6,
    initial_point: torch.Tensor | None = None,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict]:
    """Nearest simplex ETF by pymanopt's Riemannian trust regions, as in the paper.

    Minimises, over ``X in St(d, K)`` (``pymanopt.manifolds.Stiefel(d, K)``, QR retraction)::

        f(X) = ||Y - X M/sqrt(K-1)||_F^2 + (delta/2) ||X - prox||_F^2

    with the hand-written Euclidean gradient ``(2/(K-1)) X M - c Y M + delta (X - prox)`` and
    Hessian ``E -> (2/(K-1)) E M + delta E`` (c = 2/sqrt(K-1); reference-release.md section 2a),
    using ``pymanopt.optimizers.TrustRegions(max_iterations, min_gradient_norm, verbosity=0)``
    with its default trust-region settings. Runs in numpy float64 on the CPU. The start point is
    ``initial_point`` (default: ``prox``, the paper's warm start), so no random numbers are
    drawn (numpy's global generator is left untouched).

    Args:
        features: Y, (d, K) class means, any float dtype and device.
        prox: (d, K) with orthonormal columns, the previous solution; ``None`` = ``eye(d, K)``.
        delta: proximal coefficient >= 0 (paper 1e-3).
        max_iterations: outer trust-region iterations (paper 30); the solver also stops when the
            Riemannian gradient norm falls below ``min_gradient_norm`` (pymanopt default 1e-6).
        initial_point: optional (d, K) Stiefel start point instead of ``prox``.
        return_info: also return a dict with ``iterations``, ``gradient_norm``, ``cost``,
            ``time`` (s) and ``stopping_criterion``.

    Shape: features (d, K) -> P (d, K) in the dtype and on the device of ``features``.
    """
    num_classes = check_class_matrix(features)
    check_delta(delta)
    check_max_iterations(max_iterations)
    dim = features.shape[0]
    if prox is None:
        prox = torch.eye(dim, num_classes, dtype=COMPUTE_DTYPE)
    prox = check_stiefel(prox, "prox", dim, num_classes)
    if initial_point is not None:
        initial_point = check_stiefel(initial_point, "initial_point", dim, num_classes)
    frame, info = _run_trust_regions(
        features, prox, delta, max_iterations, min_gradient_norm, initial_point
    )
    frame = frame.to(dtype=features.dtype, device=features.device)
    return (frame, info) if return_info else frame


def _numpy64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().double().numpy()


def _run_trust_regions(
    features: torch.Tensor,
    prox: torch.Tensor,
    delta: float,
    max_iterations: int,
    min_gradient_norm: float = 1e-6,
    initial_point: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """pymanopt's trust regions on validated inputs; returns (P float64 CPU, info)."""
    import pymanopt  # deferred: pymanopt is only needed for this solver

    dim, num_classes = features.shape
    prox_np = _numpy64(prox)
    start = prox_np if initial_point is None else _numpy64(initial_point)
    y = _numpy64(features)

    centring = np.eye(num_classes) - 1.0 / num_classes  # M
    scale = 1.0 / math.sqrt(num_classes - 1)
    y_centred = y @ centring
    manifold = pymanopt.manifolds.Stiefel(dim, num_classes)

    @pymanopt.function.numpy(manifold)
    def cost(x):
        residual = y - scale * (x @ centring)
        return float(np.sum(residual**2) + 0.5 * delta * np.sum((x - prox_np) ** 2))

    @pymanopt.function.numpy(manifold)
    def euclidean_gradient(x):
        return 2.0 * scale**2 * (x @ centring) - 2.0 * scale * y_centred + delta * (x - prox_np)

    @pymanopt.function.numpy(manifold)
    def euclidean_hessian(x, direction):
        return 2.0 * scale**2 * (direction @ centring) + delta * direction

    problem = pymanopt.Problem(
        manifold,
        cost,
        euclidean_gradient=euclidean_gradient,
        euclidean_hessian=euclidean_hessian,
    )
    optimizer = pymanopt.optimizers.TrustRegions(
        max_iterations=max_iterations, min_gradient_norm=min_gradient_norm, verbosity=0
    )
    result = optimizer.run(problem, initial_point=np.array(start, copy=True))
    frame = torch.from_numpy(np.ascontiguousarray(result.point))
    info = {
        "iterations": int(result.iterations),
        "gradient_norm": float(result.gradient_norm),
        "cost": float(result.cost),
        "time": float(result.time),
        "stopping_criterion": str(result.stopping_criterion),
    }
    return frame, info


def _trust_region_route(
    features: torch.Tensor, prox: torch.Tensor, delta: float, max_iterations: int
) -> torch.Tensor:
    """``nearest_etf(..., solver="trust-regions")``: the Stiefel point P found by the paper's
    solver from ``prox`` (inputs validated there). :mod:`guided_nc.etf` differentiates it with
    the implicit-function (Proposition-1) gradient at P, ``B = sym(P^T A) = V diag(s) V^T`` and
    ``U = P V``, equal to the closed form's at convergence."""
    frame, _ = _run_trust_regions(features, prox, delta, max_iterations)
    return frame


register_solver("trust-regions", _trust_region_route)


def dense_ddn_bytes(dim: int, num_classes: int, dtype: torch.dtype = COMPUTE_DTYPE) -> int:
    """Bytes of the dense arrays :func:`dense_ddn_backward` allocates for (d, K) in ``dtype``.

    The constraint Jacobian ``A_c`` (K(K+1)/2 x dK), ``T = H^-1 A_c^T`` (dK x K(K+1)/2) and the
    K(K+1)/2 x K(K+1)/2 Schur complement with its LU factor; smaller arrays are ignored.
    """
    pairs = num_classes * (num_classes + 1) // 2
    size = dim * num_classes
    itemsize = torch.empty((), dtype=dtype).element_size()
    return itemsize * (2 * pairs * size + 2 * pairs * pairs)


def constraint_jacobian(frame: torch.Tensor) -> torch.Tensor:
    """Dense Jacobian of ``vech(X^T X - I)`` at X = P, row-major vectorisation.

    Equals ``L_K (I_{K^2} + C_K) (P^T kron I_K)`` (reference-release.md section 3, step 5), built
    entry by entry instead of through the K^2 x dK Kronecker product: row (a, b), a >= b in
    row-major order, holds ``d(X^T X)_ab / dX_ic = delta_ca X_ib + delta_cb X_ia`` at column
    ``i K + c``.

    Shape: frame (d, K) -> (K(K+1)/2, dK), same dtype and device.
    """
    dim, num_classes = frame.shape
    rows_a, rows_b = torch.tril_indices(num_classes, num_classes, device=frame.device)
    pairs = rows_a.numel()
    jacobian = torch.zeros(pairs, dim * num_classes, dtype=frame.dtype, device=frame.device)
    view = jacobian.view(pairs, dim, num_classes)
    pair_index = torch.arange(pairs, device=frame.device)[:, None]
    row_index = torch.arange(dim, device=frame.device)[None, :]
    # delta_ca X_ib: column i K + a gets X[i, b]; delta_cb X_ia: column i K + b gets X[i, a]
    # (both land on the same entry, 2 X_ia, when a = b).
    view.index_put_((pair_index, row_index, rows_a[:, None]), frame[:, rows_b].T, accumulate=True)
    view.index_put_((pair_index, row_index, rows_b[:, None]), frame[:, rows_a].T, accumulate=True)
    return jacobian


def dense_ddn_backward(
    features: torch.Tensor,
    frame: torch.Tensor,
    prox: torch.Tensor | None,
    delta: float,
    grad_frame: torch.Tensor,
    *,
    max_bytes: int = 4 * 2**30,
    dtype: torch.dtype = COMPUTE_DTYPE,
) -> torch.Tensor:
    """dL/dY of the nearest-ETF layer by the paper's Proposition 1, with dense matrices.

    Literally reference-release.md section 3 (row-major vectorisation, v = vec(G))::

        g   = (2/(K-1)) P M - c Y M + delta (P - prox)          Euclidean gradient at P
        B   = (2/(K-1)) M + delta I_K - sym(P^T g)              H_L = I_d kron B
        A_c = L_K (I + C_K) (P^T kron I_K)                      K(K+1)/2 x dK, dense
        u   = -[H^-1 - H^-1 A_c^T (A_c H^-1 A_c^T)^-1 A_c H^-1] v
        dL/dY = -c unvec(u) M

    H_L is applied block-wise (its d diagonal blocks are all B), as the release does; A_c,
    ``H^-1 A_c^T`` and ``A_c H^-1 A_c^T`` are dense: O(dK^3 + K^4) memory, O(dK^5 + K^6) time.
    Prox is a constant, as in the paper. Use it as an oracle at tiny sizes or as the baseline.

    Args:
        features: Y, (d, K).
        frame: P, (d, K) Stiefel point at which to differentiate (the layer's output).
        prox: (d, K) previous solution (``None`` = ``eye(d, K)``, the first-step rule).
        delta: proximal coefficient >= 0.
        grad_frame: G = dL/dP, (d, K).
        max_bytes: refuse (MemoryError) when :func:`dense_ddn_bytes` exceeds this.
        dtype: precision of the computation (float64 by default; the release used float32).

    Shape: returns dL/dY, (d, K), in the dtype and on the device of ``features``.
    """
    num_classes = check_class_matrix(features)
    check_delta(delta)
    dim = features.shape[0]
    frame = check_stiefel(frame, "frame", dim, num_classes)
    if prox is None:
        prox = torch.eye(dim, num_classes, dtype=dtype, device=features.device)
    prox = check_stiefel(prox, "prox", dim, num_classes)
    if not isinstance(grad_frame, torch.Tensor) or tuple(grad_frame.shape) != (dim, num_classes):
        shape = (
            tuple(grad_frame.shape)
            if isinstance(grad_frame, torch.Tensor)
            else type(grad_frame).__name__
        )
        raise ValueError(f"grad_frame must be a ({dim}, {num_classes}) tensor, got {shape}")
    needed = dense_ddn_bytes(dim, num_classes, dtype)
    if needed > max_bytes:
        raise MemoryError(
            f"dense_ddn_backward for d={dim}, K={num_classes} needs about {needed:,} bytes "
            f"({needed / 2**30:.1f} GiB) > max_bytes={max_bytes:,}; raise max_bytes if the "
            "machine has the memory, or use the closed-form backward of nearest_etf"
        )

    device = features.device
    y, p = features.detach().to(dtype), frame.detach().to(device, dtype)
    prox, grad = prox.detach().to(device, dtype), grad_frame.detach().to(device, dtype)
    centring = torch.eye(num_classes, dtype=dtype, device=device) - 1.0 / num_classes  # M
    scale = 2.0 / math.sqrt(num_classes - 1)  # c
    curvature = 2.0 / (num_classes - 1)

    euclidean_gradient = curvature * p @ centring - scale * y @ centring + delta * (p - prox)
    multiplier = p.T @ euclidean_gradient
    multiplier = 0.5 * (multiplier + multiplier.T)  # sym(P^T g)
    block = curvature * centring + delta * torch.eye(num_classes, dtype=dtype, device=device)
    block = block - multiplier  # B; H_L = I_d kron B
    block_lu = torch.linalg.lu_factor(block)

    def solve_hessian(rhs: torch.Tensor) -> torch.Tensor:
        # H_L^-1 on a (dK, m) matrix: the same K x K block B on each of the d row blocks.
        columns = rhs.shape[1]
        blocks = rhs.reshape(dim, num_classes, columns)
        solved = torch.linalg.lu_solve(*block_lu, blocks.permute(1, 0, 2).reshape(num_classes, -1))
        return solved.reshape(num_classes, dim, columns).permute(1, 0, 2).reshape(-1, columns)

    jacobian = constraint_jacobian(p)  # A_c, (K(K+1)/2, dK)
    vector = grad.reshape(-1, 1)  # v = vec_r(G)
    step = -solve_hessian(vector)  # w = -H^-1 v
    coupled = solve_hessian(jacobian.T)  # T = H^-1 A_c^T, (dK, K(K+1)/2)
    schur = jacobian @ coupled  # A_c H^-1 A_c^T
    rhs = -(jacobian @ step)  # -A_c w
    del jacobian
    correction = torch.linalg.solve(schur, rhs)
    direction = step + coupled @ correction  # u
    grad_features = -scale * direction.reshape(dim, num_classes) @ centring
    return grad_features.to(features.dtype)
