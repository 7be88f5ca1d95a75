"""Simplex equiangular tight frames (ETFs) and the differentiable nearest-ETF layer.

Pure maths, no training state: see ``docs/etf.md`` for the derivation, the routes and their
accuracy rule.

Notation (method.md): d features, K classes, ``M = I_K - 11^T/K``, ``c = 2/sqrt(K-1)``,
``St(d, K) = {P in R^{d x K}: P^T P = I_K}`` (needs d >= K).

The nearest simplex ETF to a d x K matrix ``Y`` (paper eq. 6 with the proximal term of eq. 7),

    P* = argmin_{P in St(d,K)} ||Y - P M / sqrt(K-1)||_F^2 + (delta/2) ||P - P_prev||_F^2,

is the orthogonal polar factor of ``A = c Y M + delta P_prev`` (orthogonal Procrustes). Three
exact routes compute it (:data:`SOLVERS`), all with a closed-form O(dK)-memory backward that
equals the paper's implicit-function-theorem gradient at the optimum:

* ``"gram"``: ``A^T A = V diag(s^2) V^T`` (one K x K ``eigh``), ``P = A V diag(1/s) V^T``. It
  squares the condition number, so it falls back to ``"svd"`` by itself whenever that would cost
  accuracy (:func:`gram_eigenvalue_threshold`).
* ``"svd"``: one thin SVD ``A = U S V^T``, ``P = U V^T``.
* ``"newton-schulz"``: a scaled Newton-Schulz iteration with a fixed, precomputed number of
  matmul-only steps, and a matmul-only backward; no host synchronisation (for accelerators).

``"auto"`` (the default) picks the fastest exact route for the device (:func:`resolve_solver`).
The solve runs in ``compute_dtype`` (float64 by default, whatever the input dtype: the smallest
singular value of ``A`` is about ``delta`` and the backward divides by it); results are cast back
to the input's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from guided_nc._checks import (
    COMPUTE_DTYPE,
    check_class_matrix,
    check_compute_dtype,
    check_delta,
    check_finite_features,
    check_max_iterations,
    check_sizes,
    check_stiefel,
    stored_tolerance,
)

__all__ = [
    "SOLVERS",
    "PolarFactors",
    "centering_matrix",
    "check_solver",
    "etf_classifier",
    "etf_distance",
    "gram_eigenvalue_threshold",
    "gram_target_error",
    "haar_stiefel",
    "nearest_etf",
    "nearest_etf_target",
    "newton_schulz_schedule",
    "polar_backward",
    "polar_factor",
    "polar_factors_backward",
    "register_solver",
    "resolve_solver",
    "simplex_etf",
    "solve_nearest_etf",
    "solve_polar",
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


# --- the closed-form backward ------------------------------------------------------------------


def _pseudo_reciprocals(spectrum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``1/(s_i + s_j)`` (K, K) and ``1/s_i`` (K,), with 0 where the divisor is below
    ``K * eps * max|s|`` (pseudo-inverse convention: only a rank-deficient A reaches it)."""
    tiny = spectrum.shape[-1] * torch.finfo(spectrum.dtype).eps * spectrum.abs().max()
    pair_sum = spectrum.unsqueeze(-1) + spectrum.unsqueeze(-2)
    keep_pair = pair_sum.abs() > tiny
    inverse_pair_sum = torch.where(keep_pair, 1.0 / torch.where(keep_pair, pair_sum, 1.0), 0.0)
    keep = spectrum.abs() > tiny
    inverse_spectrum = torch.where(keep, 1.0 / torch.where(keep, spectrum, 1.0), 0.0)
    return inverse_pair_sum, inverse_spectrum


def _reciprocals(spectrum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``1/(s_i + s_j)`` and ``1/s_i`` without guards, for a spectrum known to be positive."""
    return (spectrum.unsqueeze(-1) + spectrum).reciprocal_(), spectrum.reciprocal()


def _centre_rows(matrix: torch.Tensor, center: bool) -> torch.Tensor:
    """``matrix @ M`` (each row minus its mean) when ``center``, else ``matrix``.

    The backward applies ``dL/dY = (dL/dA) M`` to its small K x K factors instead of to the
    d x K result: ``(P X + G N) M = P (X M) + G (N M)``, two passes over d x K saved.
    """
    return matrix - matrix.mean(dim=-1, keepdim=True) if center else matrix


def polar_backward(
    left: torch.Tensor,
    spectrum: torch.Tensor,
    right: torch.Tensor,
    grad_frame: torch.Tensor,
    *,
    center: bool = False,
    guarded: bool = True,
) -> torch.Tensor:
    """dL/dA of the orthogonal polar factor ``P = U V^T``, from ``U``, ``s``, ``V``, ``G = dL/dP``.

    With ``Gh = U^T G V`` and ``F_ij = 1 / (s_i + s_j)``::

        dL/dA = U (F o (Gh - Gh^T)) V^T + (I - U U^T) G V S^-1 V^T
              = [U (F o (Gh - Gh^T) - Gh S^-1) + G V S^-1] V^T

    (four d x K x K products: the cheaper form when d < 2.5 K, see :func:`_frame_backward`).
    At the exact polar factor ``(U, s, V)`` is the thin SVD of A. At any other Stiefel point P,
    ``B = sym(P^T A) = V diag(s) V^T`` and ``U = P V`` give the implicit-function (Proposition 1)
    gradient at that point (docs/etf.md); s may then be negative. Time O(dK^2 + K^3), memory
    O(dK + K^2). Reciprocals of ``|s_i + s_j|`` or ``|s_i|`` below ``K * eps * max|s|`` are set
    to 0 (pseudo-inverse convention), so a rank-deficient A (possible only with ``delta = 0``)
    gives a finite gradient (``guarded=False`` skips the guard where ``s > 0`` is known: the
    Gram route). ``center=True`` returns ``(dL/dA) M`` instead (the gradient through
    ``A = Y M + const``), folded into the last K x K factor.

    Shape: left (d, K), spectrum (K,), right (K, K), grad_frame (d, K) -> (d, K) in left's dtype.
    """
    if grad_frame.dtype != left.dtype:
        grad_frame = grad_frame.to(left.dtype)
    if guarded:
        inverse_pair_sum, inverse_spectrum = _pseudo_reciprocals(spectrum)
    else:
        inverse_pair_sum, inverse_spectrum = _reciprocals(spectrum)
    grad_right = grad_frame @ right  # G V, (d, K)
    projected = left.transpose(-2, -1) @ grad_right  # Gh = U^T G V, (K, K)
    core = (projected - projected.transpose(-2, -1)) * inverse_pair_sum
    core = torch.addcmul(core, projected, inverse_spectrum, value=-1.0)  # ... - Gh S^-1
    output = _centre_rows(right.transpose(-2, -1), center)  # V^T (M)
    return torch.addmm(grad_right * inverse_spectrum, left, core) @ output


def _frame_backward(
    frame: torch.Tensor,
    spectrum: torch.Tensor,
    right: torch.Tensor,
    inverse_root: torch.Tensor,
    grad_frame: torch.Tensor,
    *,
    center: bool = False,
    guarded: bool = False,
) -> torch.Tensor:
    """The same dL/dA as :func:`polar_backward`, written with ``P`` instead of ``U = P V``.

    With ``R = P^T G``, ``Gh = V^T R V`` and ``N = V S^-1 V^T`` (``inverse_root``)::

        dL/dA = P X + G N,   X = V (F o (Gh - Gh^T) - Gh S^-1) V^T

    (U never appears: ``U X' V^T = P V X' V^T`` and ``G V S^-1 V^T = G N``). Three d x K x K
    products (``P^T G``, ``P X``, ``G N``) and four K x K x K products, against four d x K x K
    products for the U form: the cheaper form when ``d >= 2.5 K``. The Gram route guarantees
    ``s > 0`` (its threshold), so its reciprocals need no guard; the SVD route asks for the
    pseudo-inverse convention (``guarded``), as :func:`polar_backward`.
    """
    reciprocals = _pseudo_reciprocals if guarded else _reciprocals
    inverse_pair_sum, inverse_spectrum = reciprocals(spectrum)
    reduced = frame.transpose(-2, -1) @ grad_frame  # R = P^T G, the one A^T-side product
    projected = right.transpose(-2, -1) @ (reduced @ right)  # Gh = V^T R V
    core = (projected - projected.transpose(-2, -1)) * inverse_pair_sum
    core = torch.addcmul(core, projected, inverse_spectrum, value=-1.0)
    inner = _centre_rows((right @ core) @ right.transpose(-2, -1), center)  # X (M)
    return torch.addmm(grad_frame @ _centre_rows(inverse_root, center), frame, inner)


#: Below this K the P form's three extra K x K x K products cost more in per-operation overhead
#: than the d x K x K product they save (measured at d = 512: even at K = 32).
FRAME_FORM_MIN_CLASSES = 32


def _frame_form(dim: int, num_classes: int) -> bool:
    """Whether the P form (:func:`_frame_backward`) costs less than the U form at (d, K).

    Forward and backward together, the P form takes 5 d x K x K and 5 K x K x K products
    (``A^T A``, ``A N``, ``N``; ``P^T G``, ``P X``, ``G N`` and four in the eigenbasis), the U form
    6 d x K x K and none (``A^T A``, ``A V``, ``U V^T``; ``G V``, ``U^T (G V)``, ``U core``, and the
    last ``(...) V^T``): equal at d = 2.5 K in flops; at small K the operation count decides.
    """
    return 2 * dim >= 5 * num_classes and num_classes >= FRAME_FORM_MIN_CLASSES


# --- the routes ----------------------------------------------------------------------------------
#
# Every route is two pure functions of plain tensors: a forward that returns the polar factor
# with what its backward needs (:class:`PolarFactors`), and :func:`polar_factors_backward`. The
# layer (:func:`nearest_etf`, one autograd Function) and the implicit head's fused step both call
# them, so there is one copy of each route, of its fallback and of its backward.


class PolarFactors(NamedTuple):
    """The polar factor P of a target matrix and what its backward needs.

    ``form`` names the backward (:func:`polar_factors_backward`): ``"u"`` (``saved`` = U, s, V:
    :func:`polar_backward`), ``"p"`` (P, s, V, N: :func:`_frame_backward`) or ``"newton-schulz"``
    (P, H = sym(P^T A)). ``guarded`` asks the backward for pseudo-inverse reciprocals (the SVD
    route, where s may vanish). ``bound`` and ``schedule`` are Newton-Schulz's scale and steps.
    ``converged`` is Newton-Schulz's device flag when it was not read (deferred use), else None.

    Shape: frame (d, K) and every saved tensor in the compute dtype.
    """

    frame: torch.Tensor
    form: str
    saved: tuple[torch.Tensor, ...]
    guarded: bool = True
    bound: float = 1.0
    schedule: tuple[float, ...] = ()
    converged: torch.Tensor | None = None


def _svd_factors(target: torch.Tensor) -> PolarFactors:
    """Route "svd": ``P = U V^T`` from one thin SVD of the target (exact for any A)."""
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    right = vh.transpose(-2, -1)
    frame = u @ vh
    if _frame_form(*target.shape):
        inverse_root = (right * _pseudo_reciprocals(s)[1]) @ vh
        return PolarFactors(frame, "p", (frame, s, right, inverse_root))
    # LAPACK's U comes back column-major; products with it ran 1.5-3x slower than with a
    # row-major copy (measured at d = 1024, K = 100), and the copy costs one pass.
    return PolarFactors(frame, "u", (u.contiguous(), s, right))


def _gram_factors(
    target: torch.Tensor, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, guarded: bool
) -> PolarFactors:
    """Route "gram": ``P = A V diag(1/s) V^T`` from the eigendecomposition of ``A^T A``."""
    spectrum = eigenvalues.sqrt()  # s, ascending; > 0 (the caller checked the threshold)
    # eigh's V is column-major; every product with it ran ~1.5x slower (K = 10 and 100).
    right = eigenvectors.contiguous()
    if _frame_form(*target.shape):  # P = A N with N = V S^-1 V^T = (A^T A)^(-1/2)
        inverse_root = (right / spectrum) @ right.transpose(-2, -1)
        frame = target @ inverse_root
        return PolarFactors(frame, "p", (frame, spectrum, right, inverse_root), guarded)
    left = (target @ right) / spectrum  # U = A V S^-1
    frame = left @ right.transpose(-2, -1)
    return PolarFactors(frame, "u", (left, spectrum, right), guarded)


def _gram_or_svd_factors(
    target: torch.Tensor, result_dtype: torch.dtype, name: str, finite: bool = False
) -> PolarFactors:
    """Route "gram" with its fallback: the SVD when the eigenvalues fail the threshold.

    The fallback triggers on ``lambda_min <= threshold * lambda_max`` (too ill-conditioned; this
    includes a rank-deficient A, possible with delta = 0) and on a non-finite ``A^T A`` (overflow
    of a huge A, which the SVD does not square; or NaN input). Eagerly the decision reads the
    host twice, and only then is the input checked for NaN/Inf (``name`` in the ValueError), so
    the common case pays for no finiteness pass; under ``torch.compile`` it is a ``torch.cond``
    instead, so the graph has no break (callers pass finite input there: the heads do). A
    caller that knows A is finite and moderate (``finite``: the heads' A has a unit-norm Y and
    an orthonormal prox) skips the overflow test, one host read fewer.
    """
    threshold = gram_eigenvalue_threshold(target.dtype, result_dtype)
    gram = target.transpose(-2, -1) @ target
    # A NaN anywhere makes the sum of A^T A NaN; an overflowing sum (entries near 1e308) only
    # sends a finite case to the SVD, which is exact too.
    if torch.compiler.is_compiling():
        # The same rule as device tensors and a torch.cond. eigh may fail on non-finite input:
        # it gets zeros instead, which fail the threshold. Both branches give the same form.
        usable = gram.sum().isfinite()
        eigenvalues, eigenvectors = torch.linalg.eigh(torch.where(usable, gram, 0.0))
        accurate = (eigenvalues[0] > threshold * eigenvalues[-1]) & usable

        def gram_branch(target, eigenvalues, eigenvectors):
            factors = _gram_factors(target, eigenvalues, eigenvectors, guarded=True)
            return (factors.frame, *factors.saved)

        def svd_branch(target, eigenvalues, eigenvectors):
            factors = _svd_factors(target)
            return (factors.frame, *factors.saved)

        frame, *saved = torch.cond(
            accurate, gram_branch, svd_branch, (target, eigenvalues, eigenvectors)
        )
        form = "p" if _frame_form(*target.shape) else "u"
        return PolarFactors(frame, form, tuple(saved))
    if finite or math.isfinite(gram.sum().item()):
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        lowest, highest = eigenvalues[:: eigenvalues.shape[0] - 1].tolist()  # one host read
        if lowest > threshold * highest:
            return _gram_factors(target, eigenvalues, eigenvectors, guarded=False)
    check_finite_features(target, name)
    return _svd_factors(target)


def _newton_schulz_factors(target: torch.Tensor, bound: float, floor: float) -> PolarFactors:
    """Route "newton-schulz": scaled Newton-Schulz steps on ``X0 = A / bound``; matmul only.

    ``bound`` >= sigma_max(A) and ``floor`` the usual size of its smallest singular value (the
    schedule starts from ``floor / (safety * bound)``, :func:`newton_schulz_schedule`). For each
    ``a`` of the schedule::

        X <- 1.5 a X - 0.5 a^3 X (X^T X)        (one product and one addmm)

    then ``H = sym(P^T A)`` for the backward and the convergence flag ``max|P^T P - I| <=
    tolerance`` on the device (returned in ``converged``, never read here).
    """
    compute_dtype = target.dtype
    scaled_bound = bound * (1.0 + NEWTON_SCHULZ_MARGIN)
    lower = min(1.0, floor / (NEWTON_SCHULZ_SAFETY * scaled_bound))
    schedule = newton_schulz_schedule(lower, torch.finfo(compute_dtype).eps)
    iterate = target / scaled_bound
    for a in schedule:
        gram = iterate.transpose(-2, -1) @ iterate
        iterate = torch.addmm(iterate, iterate, gram, beta=1.5 * a, alpha=-0.5 * a**3)
    symmetric = iterate.transpose(-2, -1) @ target
    symmetric = 0.5 * (symmetric + symmetric.transpose(-2, -1))  # H = sym(P^T A)
    # max|P^T P - I| from the full Gram matrix (one more product, ~4 % of the forward): no
    # cached probe tensors, which torch.compile would have to guard on.
    identity = torch.eye(target.shape[-1], dtype=compute_dtype, device=target.device)
    deviation = torch.addmm(identity, iterate.transpose(-2, -1), iterate, alpha=-1.0)
    converged = deviation.abs().amax() <= stored_tolerance(compute_dtype)
    return PolarFactors(
        iterate, "newton-schulz", (iterate, symmetric), True, scaled_bound, schedule, converged
    )


def _stiefel_point_factors(frame: torch.Tensor, target: torch.Tensor) -> PolarFactors:
    """Factors of the implicit-function gradient at a Stiefel point P found by another solver:
    ``B = sym(P^T A) = V diag(s) V^T`` and ``U = P V`` (docs/etf.md); s may be negative there."""
    gram = frame.transpose(-2, -1) @ target
    s, v = torch.linalg.eigh(0.5 * (gram + gram.transpose(-2, -1)))
    return PolarFactors(frame, "u", (frame @ v, s, v))


#: Up to this K the Newton-Schulz backward iterates on one 3K x 3K block matrix (two products a
#: step: fewest operations, what small K pays for); above it on the K x K blocks (seven products
#: a step: fewest flops; the block form spends 27 K^3 a product on mostly zero blocks).
NEWTON_SCHULZ_BLOCK_MAX_CLASSES = 32


def _newton_schulz_backward(
    frame: torch.Tensor,
    symmetric: torch.Tensor,
    grad_frame: torch.Tensor,
    bound: float,
    schedule: tuple[float, ...],
    center: bool,
) -> torch.Tensor:
    """dL/dA of the Newton-Schulz route, with the forward's schedule on K x K matrices only.

    With ``R = P^T G``, ``C = R - R^T`` and ``Z = H / bound`` (spectrum in [lower, 1]), the
    schedule's odd polynomial tends to the sign function. Applied to the block matrix
    ``[[Z, C, I], [0, -Z, 0], [0, 0, -Z]]`` it tends to ``[[I, 2 X, Z^-1], [0, -I, 0], [0, 0,
    -I]]`` with ``Z X + X Z = C`` (the Lyapunov solution that ``1/(s_i + s_j)`` gives in the
    eigenbasis; Roberts' sign-function method). Then, with ``L = X / bound`` (``H L + L H =
    C``) and ``N = Z^-1 / bound = H^-1``::

        dL/dA = P (L - R N) + G N

    the closed form of :func:`_frame_backward` without ``eigh`` (no host synchronisation). Above
    :data:`NEWTON_SCHULZ_BLOCK_MAX_CLASSES` the same polynomial runs on the K x K blocks.
    """
    k = frame.shape[-1]
    reduced = frame.transpose(-2, -1) @ grad_frame  # R = P^T G
    iterate = symmetric / bound  # Z
    identity = torch.eye(k, dtype=frame.dtype, device=frame.device)
    if k <= NEWTON_SCHULZ_BLOCK_MAX_CLASSES:
        top = torch.cat([iterate, reduced - reduced.transpose(-2, -1), identity], dim=1)
        below = torch.block_diag(iterate, iterate).neg_()
        block = torch.cat([top, torch.cat([below.new_zeros(2 * k, k), below], dim=1)], dim=0)
        for a in schedule:
            block = torch.addmm(block, block, block @ block, beta=1.5 * a, alpha=-0.5 * a**3)
        lyapunov, inverse = block[:k, k : 2 * k], block[:k, 2 * k :]  # 2 X, Z^-1
    else:
        lyapunov = reduced - reduced.transpose(-2, -1)  # D -> 2 X
        inverse = identity  # E -> Z^-1
        for a in schedule:
            square = iterate @ iterate
            mixed = square @ lyapunov - (iterate @ lyapunov) @ iterate + lyapunov @ square
            lyapunov = (0.5 * a) * (3.0 * lyapunov - a * a * mixed)
            step = torch.add(identity, square, alpha=-(a**2) / 3.0).mul_(1.5 * a)
            inverse = inverse @ step
            iterate = iterate @ step
    inverse_root = inverse / bound  # N = H^-1
    inner = _centre_rows(lyapunov / (2.0 * bound) - reduced @ inverse_root, center)
    return torch.addmm(grad_frame @ _centre_rows(inverse_root, center), frame, inner)


def polar_factors_backward(
    factors: PolarFactors, grad_frame: torch.Tensor, center: bool
) -> torch.Tensor:
    """dL/dA (times M when ``center``) of any route, from its :class:`PolarFactors`.

    Shape: grad_frame (d, K) -> (d, K) in the factors' (compute) dtype.
    """
    saved = factors.saved
    if grad_frame.dtype != saved[0].dtype:
        grad_frame = grad_frame.to(saved[0].dtype)
    if factors.form == "newton-schulz":
        return _newton_schulz_backward(*saved, grad_frame, factors.bound, factors.schedule, center)
    if factors.form == "p":
        return _frame_backward(*saved, grad_frame, center=center, guarded=factors.guarded)
    return polar_backward(*saved, grad_frame, center=center, guarded=factors.guarded)


# --- the accuracy rule of the Gram route ----------------------------------------------------------

#: Measured constant of the Gram route's error model ``error <= C * u * cond(A)^2`` (u = unit
#: roundoff of the compute dtype): largest relative gradient error / (u cond^2) seen over random,
#: one-small and two-close-small spectra, 5.1, with margin (docs/etf.md, "The accuracy rule").
GRAM_ERROR_CONSTANT = 8.0

#: Error the Gram route may add to a float64 result (float32 and narrower results: their own
#: rounding, 2^-24). 1e-10 keeps ten digits; pass ``solver="svd"`` for the last ones.
GRAM_FLOAT64_TARGET = 1e-10


def gram_target_error(result_dtype: torch.dtype) -> float:
    """The largest relative error the Gram route may add to a result stored in ``result_dtype``.

    A float32 (or narrower) result is rounded to ``2^-24`` relative anyway, so an extra error below
    that is invisible; a float64 result keeps 1e-10 (:data:`GRAM_FLOAT64_TARGET`).
    """
    return GRAM_FLOAT64_TARGET if result_dtype == torch.float64 else 2.0**-24


def gram_eigenvalue_threshold(compute_dtype: torch.dtype, result_dtype: torch.dtype) -> float:
    """Smallest ``lambda_min / lambda_max`` of ``A^T A`` at which the Gram route is accurate.

    The Gram route's error (on P and, relatively, on dL/dY) is ``<= C u cond(A)^2``, with u the
    unit roundoff of ``compute_dtype`` and C = :data:`GRAM_ERROR_CONSTANT`: forming ``A^T A``
    and its eigenvalues costs an absolute error ``~u lambda_max``, i.e. a relative error
    ``u cond^2`` on ``lambda_min = s_min^2``, and the backward divides by s_min. Requiring
    ``C u cond^2 <= target`` (:func:`gram_target_error`) with ``cond^2 = lambda_max/lambda_min``
    gives the threshold ``C u / target``: float64 compute, float32 result: 1.5e-8 (cond <= 8.2e3);
    float64 result: 8.9e-6 (cond <= 335); float32 compute: 8 > 1, never (the SVD is used).
    """
    unit_roundoff = torch.finfo(compute_dtype).eps / 2
    return GRAM_ERROR_CONSTANT * unit_roundoff / gram_target_error(result_dtype)


#: sigma_max(X0) <= 1 / (1 + margin): keeps the scaled steps clear of sqrt(3), where the cubic
#: changes sign (a singular value pushed past it would converge to -1, not 1).
NEWTON_SCHULZ_MARGIN = 2.0**-8

#: The schedule assumes ``s_min(A) >= delta / NEWTON_SCHULZ_SAFETY`` (it is about delta: the
#: direction 1/sqrt(K) of A is delta P_prev 1/sqrt(K)), a factor 4 below the usual value.
NEWTON_SCHULZ_SAFETY = 4.0


def newton_schulz_schedule(lower: float, tolerance: float) -> tuple[float, ...]:
    """Scale factors ``a_k`` of the scaled Newton-Schulz steps for singular values in [lower, 1].

    Each step applies ``f(x) = a x (3 - a^2 x^2) / 2`` to every singular value, with
    ``a^2 = 3 / (1 + l + l^2)`` chosen so that ``f(l) = f(1)``: [l, 1] maps onto [f(l), 1] and a
    small l grows by about ``1.5 sqrt(3) = 2.6`` per step (1.5 for plain Newton-Schulz); a -> 1
    as l -> 1 (plain, quadratically convergent steps). Stops once ``1 - l <= tolerance``.
    Computed on the host from numbers the caller knows (a few microseconds of Python, also while
    ``torch.compile`` traces), so the step count never needs a device read: lower = 1e-4 takes
    14 steps in float64, 13 in float32.

    Returns the tuple of a_k (at most 100).
    """
    if not 0 < lower <= 1:
        raise ValueError(f"lower={lower} must lie in (0, 1]")
    schedule = []
    bound = lower
    while 1.0 - bound > tolerance and len(schedule) < 100:
        a = math.sqrt(3.0 / (1.0 + bound + bound * bound))
        schedule.append(a)
        bound = 0.5 * a * bound * (3.0 - a * a * bound * bound)
    return tuple(schedule)


# --- solver names --------------------------------------------------------------------------------

#: An iterative solver registered by another module: ``solve(features, prox, delta,
#: max_iterations) -> P`` (a Stiefel point; no autograd: the gradient is the implicit-function
#: gradient at P, :func:`_stiefel_point_factors`). See :func:`register_solver`.
_REGISTERED_SOLVERS: dict[str, Callable[..., torch.Tensor]] = {}

#: Solvers accepted by :func:`nearest_etf`: "auto", the three exact routes of this module, then
#: the registered ones ("trust-regions", registered by :mod:`guided_nc.solvers` when the package
#: is imported).
SOLVERS = ("auto", "gram", "svd", "newton-schulz", "trust-regions")

#: The routes this module computes itself.
_CLOSED_FORM = ("gram", "svd", "newton-schulz")


def register_solver(name: str, solve: Callable[..., torch.Tensor]) -> None:
    """Make ``nearest_etf(..., solver=name)`` call ``solve(features, prox, delta,
    max_iterations) -> P`` (Y and prox in the compute dtype; P without autograd).

    This keeps the maths module free of any import of an iterative solver: the solver module
    registers itself (``guided_nc.solvers`` registers ``"trust-regions"``; ``import guided_nc``
    imports it), and the import arrow runs from the solver to the maths, never back.
    """
    registrable = tuple(n for n in SOLVERS if n != "auto" and n not in _CLOSED_FORM)
    if name not in registrable:
        raise ValueError(f"name={name!r} is not a registrable solver; use one of {registrable}")
    _REGISTERED_SOLVERS[name] = solve


def check_solver(solver: str) -> None:
    """ValueError unless ``solver`` is one of :data:`SOLVERS`."""
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not supported; use one of {SOLVERS}")


def resolve_solver(
    solver: str,
    device: torch.device | str,
    delta: float,
    compute_dtype: torch.dtype = COMPUTE_DTYPE,
) -> str:
    """The route ``solver`` stands for on ``device``: ``"auto"`` becomes the fastest exact one.

    ============  ======================  =========================================
    device        compute float64         compute float32
    ============  ======================  =========================================
    CPU           ``"gram"``              ``"svd"`` (the Gram route is never
                                          accurate in float32)
    accelerator   ``"newton-schulz"``     ``"newton-schulz"``
                  (``"gram"`` if delta=0)  (``"svd"`` if delta = 0)
    ============  ======================  =========================================

    On accelerators ``eigh`` and ``svd`` synchronise with the host and run far below the
    device's matmul rate; Newton-Schulz is matmul only (docs/etf.md, "Routes"). Newton-Schulz
    needs delta > 0 (its step count comes from the lower bound ``s_min(A) ~ delta``).
    Other names are returned unchanged.
    """
    check_solver(solver)
    if solver != "auto":
        return solver
    if torch.device(device).type != "cpu" and delta > 0:
        return "newton-schulz"
    return "gram" if compute_dtype == torch.float64 else "svd"


def polar_factor(matrix: torch.Tensor, *, solver: str = "auto") -> torch.Tensor:
    """Differentiable orthogonal polar factor of a (d, K) matrix, d >= K.

    Computed in float64 and returned in the input's dtype, with the closed-form backward
    (finite where singular values repeat, unlike autograd through ``torch.linalg.svd``).
    ``solver``: ``"auto"`` or ``"gram"`` (the Gram route with its automatic SVD fallback) or
    ``"svd"``. (Newton-Schulz needs a lower bound on the smallest singular value, which a
    general matrix does not come with: use :func:`nearest_etf` for it.)

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
    if solver not in ("auto", "gram", "svd"):
        raise ValueError(
            f"solver={solver!r} is not supported by polar_factor; use 'auto', 'gram' or 'svd'"
        )
    route = "svd" if solver == "svd" else "gram"
    target = matrix.detach().to(COMPUTE_DTYPE)

    def solve() -> PolarFactors:
        return solve_polar(target, route, result_dtype=matrix.dtype, name="matrix")

    return _PolarLayer.apply(matrix, solve, False)


class _PolarLayer(torch.autograd.Function):
    """The layer of :func:`nearest_etf` and :func:`polar_factor`: ``solve()`` gives the
    :class:`PolarFactors` (eagerly, fallbacks taken), :func:`polar_factors_backward` the gradient.
    Gradient flows to ``features`` (X: Y, or A itself for :func:`polar_factor`) as
    ``(dL/dA') M`` (``center``) or ``dL/dA``; the target is built inside ``solve``, as a
    constant, so building it adds no autograd nodes."""

    @staticmethod
    def forward(ctx, features, solve, center):
        factors = solve()
        ctx.save_for_backward(*factors.saved)
        ctx.factors = factors._replace(frame=None, saved=(), converged=None)
        ctx.center, ctx.input_dtype = center, features.dtype
        return factors.frame.to(features.dtype)

    @staticmethod
    def backward(ctx, grad_frame):
        factors = ctx.factors._replace(saved=ctx.saved_tensors)
        grad = polar_factors_backward(factors, grad_frame, ctx.center)
        return grad.to(ctx.input_dtype), None, None


def solve_polar(
    target: torch.Tensor,
    route: str,
    *,
    result_dtype: torch.dtype | None = None,
    bound: float | None = None,
    floor: float = 0.0,
    strict: bool = True,
    name: str = "features",
    finite: bool = False,
) -> PolarFactors:
    """The orthogonal polar factor of ``target`` by one exact route, with the route's fallback.

    No autograd (wrap it, as :func:`nearest_etf` and the implicit head do, and differentiate with
    :func:`polar_factors_backward`); no validation of the target's shape.

    * ``"gram"``: eigh of ``A^T A``, the SVD when that would cost accuracy for a result stored
      in ``result_dtype`` (:func:`gram_eigenvalue_threshold`; one host read eagerly, a
      ``torch.cond`` while compiling).
    * ``"svd"``: one thin SVD (no finiteness check: :func:`nearest_etf` checks its input first,
      and the heads zero a rejected batch's target, so their step stays free of host reads).
    * ``"newton-schulz"``: matmul-only steps from ``bound >= sigma_max(A)`` and the usual size
      ``floor`` of ``sigma_min(A)``. ``strict``: read the convergence flag and answer with the
      SVD if it failed (one host read); otherwise return the flag in ``converged``, unread.

    ``name`` is what a NaN/Inf error calls the input; ``finite`` says the caller knows A is
    finite and moderate (the Gram route then skips its overflow test). Shape: target (d, K), in
    the compute dtype.
    """
    if route == "gram":
        return _gram_or_svd_factors(target, result_dtype or target.dtype, name, finite)
    if route == "svd":  # exact for any finite A; callers that may pass NaN check first
        return _svd_factors(target)
    if route != "newton-schulz":
        raise ValueError(f"route={route!r} is not an exact route; use one of {_CLOSED_FORM}")
    if bound is None:
        bound = float(torch.linalg.matrix_norm(target))  # ||A||_F >= sigma_max (a host read)
        if not math.isfinite(bound):  # NaN/Inf in A, or an overflowing norm
            check_finite_features(target, name)
            return _svd_factors(target)
    factors = _newton_schulz_factors(target, bound, floor)
    if not strict:
        return factors
    if not bool(factors.converged):
        # The lower bound on s_min(A) did not hold (e.g. Y M cancels delta prox) or A is not
        # finite: the host may wait here, so check, then answer exactly with the SVD.
        check_finite_features(target, name)
        return _svd_factors(target)
    return factors._replace(converged=None)


def nearest_etf_target(
    features: torch.Tensor,
    prox: torch.Tensor | None,
    delta: float,
    compute_dtype: torch.dtype = COMPUTE_DTYPE,
) -> torch.Tensor:
    """``A' = Y M + (delta / c) prox`` (d, K) in ``compute_dtype``, no autograd: the target
    whose polar factor is the nearest ETF (``A = c A'`` has the same polar factor, and no pass
    over d x K multiplies by c). ``prox=None`` is the first-step rule: ``prox = eye(d, K)``.
    Mixed dtypes promote inside the ops (no separate float64 copies of Y and prox)."""
    with torch.no_grad():
        scale = 2.0 / math.sqrt(features.shape[-1] - 1)  # c
        target = torch.sub(features, features.mean(dim=-1, keepdim=True, dtype=compute_dtype))
        if target.dtype != compute_dtype:  # float64 Y with a float32 solve
            target = target.to(compute_dtype)
        if delta != 0:
            if prox is None:
                target.diagonal().add_(delta / scale)
            else:
                if prox.device != target.device:
                    prox = prox.to(target.device)
                target.add_(prox, alpha=delta / scale)
        return target


def solve_nearest_etf(
    features: torch.Tensor,
    prox: torch.Tensor | None,
    delta: float,
    route: str,
    *,
    compute_dtype: torch.dtype = COMPUTE_DTYPE,
    result_dtype: torch.dtype | None = None,
    feature_norm: float | None = None,
    strict: bool = True,
    max_iterations: int = 30,
    finite: bool = False,
) -> PolarFactors:
    """The nearest-ETF solve on validated inputs, without autograd: :class:`PolarFactors` of
    ``A' = Y M + (delta / c) prox`` (:func:`nearest_etf_target`), by a resolved route.

    The public solve that :func:`nearest_etf` and the implicit head share (the head wraps it in
    its own fused backward). ``result_dtype`` sets the Gram route's accuracy target (default:
    the features' dtype; the heads pass the dtype they store P in). ``feature_norm`` is an upper
    bound on ``||Y||_F`` for Newton-Schulz (the heads pass 1: their Y has unit norm); None reads
    it from the device. ``strict`` and ``finite``: see :func:`solve_polar`. A registered solver
    (e.g. ``"trust-regions"``) returns P, and the backward is the implicit-function gradient at
    P.
    """
    target = nearest_etf_target(features, prox, delta, compute_dtype)
    floor = delta / (2.0 / math.sqrt(features.shape[-1] - 1))  # delta / c, the usual s_min(A')
    if route in _CLOSED_FORM:
        bound = None if feature_norm is None else feature_norm + floor  # >= ||Y M|| + ||.. prox||
        return solve_polar(
            target,
            route,
            result_dtype=result_dtype or features.dtype,
            bound=bound,
            floor=floor,
            strict=strict,
            finite=finite,
        )
    if route not in _REGISTERED_SOLVERS:
        raise RuntimeError(
            f"solver={route!r} is not registered; import guided_nc (or guided_nc.solvers) "
            "before calling nearest_etf with it"
        )
    y = features.detach().to(compute_dtype)
    if prox is None:
        anchor = torch.eye(*features.shape, dtype=compute_dtype, device=y.device)
    else:
        anchor = prox.detach().to(dtype=compute_dtype, device=y.device)
    frame = _REGISTERED_SOLVERS[route](y, anchor, delta, max_iterations)
    return _stiefel_point_factors(frame.to(dtype=compute_dtype, device=y.device), target)


def nearest_etf(
    features: torch.Tensor,
    prox: torch.Tensor | None = None,
    delta: float = 1e-3,
    solver: str = "auto",
    *,
    max_iterations: int = 30,
    compute_dtype: torch.dtype = COMPUTE_DTYPE,
) -> torch.Tensor:
    """The Stiefel point P of the simplex ETF nearest to the class-mean matrix ``features`` (Y).

    Solves (paper eq. 6 with the proximal term of eq. 7)::

        min_{P in St(d,K)} ||Y - P M/sqrt(K-1)||_F^2 + (delta/2)||P - prox||_F^2

    exactly as the orthogonal polar factor of ``A = c Y M + delta * prox`` (c = 2/sqrt(K-1)).
    Differentiable in Y through a closed-form backward (O(dK) memory); ``prox`` is a constant
    (detached, no gradient), as in the paper. The classifier is ``etf_classifier(P)``.

    Args:
        features: Y, (d, K) centred class means (any scale; the heads pass unit Frobenius norm).
            float16/bfloat16/float32/float64, any device.
        prox: the previous solution, (d, K) with orthonormal columns (any float dtype, judged
            with that dtype's tolerance). ``None`` means the first-step rule of method.md:
            ``P0 = polar(c Y M + delta eye(d,K))``.
        delta: proximal coefficient, >= 0. With ``delta = 0`` the solution is unique only in
            ``P M`` (the component along ``P 1`` is arbitrary) and the gradient may not exist.
        solver: ``"auto"`` (default: the fastest exact route for the device, see
            :func:`resolve_solver`), ``"gram"`` (eigh of ``A^T A``, falling back to the SVD by
            itself when that would cost accuracy, see :func:`gram_eigenvalue_threshold`),
            ``"svd"`` (one thin SVD), ``"newton-schulz"`` (matmul-only scaled iteration; needs
            delta > 0; falls back to the SVD if it did not converge) or ``"trust-regions"``
            (pymanopt's Riemannian trust regions from ``prox``, the paper's solver, CPU numpy
            float64; see :mod:`guided_nc.solvers`). All use the same closed-form backward.
        max_iterations: trust-region iterations (``solver="trust-regions"`` only; paper: 30).
        compute_dtype: dtype of the solve and its backward: float64 (default) or float32 for
            devices with slow float64 (docs/etf.md, "compute_dtype": errors ~1e-6 on W at the
            paper's delta).

    Shape: features (d, K) -> P (d, K), in the dtype and on the device of ``features``.

    Raises:
        ValueError: non-2-D features, K < 2, d < K, non-finite features, prox of the wrong shape
            or not orthonormal, delta < 0, unknown solver or compute_dtype, newton-schulz with
            delta = 0.
    """
    num_classes = check_class_matrix(features, finite=False)
    delta = check_delta(delta)
    check_compute_dtype(compute_dtype)
    route = resolve_solver(solver, features.device, delta, compute_dtype)
    if route not in ("gram", "newton-schulz"):
        # Those two notice NaN/Inf themselves (failed threshold, not converged) and check then.
        check_finite_features(features)
    if route == "trust-regions":
        check_max_iterations(max_iterations)
    if route == "newton-schulz" and delta == 0:
        raise ValueError(
            "solver='newton-schulz' needs delta > 0 (its step count comes from s_min(A) ~ "
            "delta); use solver='gram' or 'svd' for delta=0"
        )
    if prox is not None:
        prox = check_stiefel(prox, "prox", features.shape[0], num_classes)

    def solve() -> PolarFactors:
        return solve_nearest_etf(
            features,
            prox,
            delta,
            route,
            compute_dtype=compute_dtype,
            max_iterations=max_iterations,
        )

    return _PolarLayer.apply(features, solve, True)


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
