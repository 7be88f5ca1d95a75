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
    "PolarFactor",
    "centering_matrix",
    "check_solver",
    "etf_classifier",
    "etf_distance",
    "gram_eigenvalue_threshold",
    "gram_target_error",
    "haar_stiefel",
    "nearest_etf",
    "newton_schulz_schedule",
    "polar_backward",
    "polar_factor",
    "register_solver",
    "resolve_solver",
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
    return (spectrum.unsqueeze(-1) + spectrum.unsqueeze(-2)).reciprocal_(), spectrum.reciprocal()


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
    core = core - projected * inverse_spectrum  # F o (Gh - Gh^T) - Gh S^-1
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
) -> torch.Tensor:
    """The same dL/dA as :func:`polar_backward`, written with ``P`` instead of ``U = P V``.

    With ``R = P^T G``, ``Gh = V^T R V`` and ``N = V S^-1 V^T`` (``inverse_root``)::

        dL/dA = P X + G N,   X = V (F o (Gh - Gh^T) - Gh S^-1) V^T

    (U never appears: ``U X' V^T = P V X' V^T`` and ``G V S^-1 V^T = G N``). Three d x K x K
    products (``P^T G``, ``P X``, ``G N``) and four K x K x K products, against four d x K x K
    products for the U form: the cheaper form when ``d >= 2.5 K``. Used by the Gram route only,
    where ``s > 0`` is guaranteed (its threshold), so the reciprocals need no guard.
    """
    inverse_pair_sum, inverse_spectrum = _reciprocals(spectrum)
    reduced = frame.transpose(-2, -1) @ grad_frame  # R = P^T G, the one A^T-side product
    projected = right.transpose(-2, -1) @ (reduced @ right)  # Gh = V^T R V
    core = (projected - projected.transpose(-2, -1)) * inverse_pair_sum
    core = core - projected * inverse_spectrum
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


# The route Functions take the *input* X (Y, or A itself for polar_factor) for the gradient and
# the already-built target ``A' = X M + (delta / c) prox`` (``center=True``; the polar factor of
# ``A = c A'`` is the same, and no pass over d x K multiplies by c) or ``X`` itself, so that
# building it adds no autograd nodes (per-call overhead dominates at small K). They return P in
# X's dtype and give back ``dL/dX = (dL/dA') M`` in X's dtype.


class _SVDPolar(torch.autograd.Function):
    """Route "svd": P = U V^T from one thin SVD of the target; U-form backward."""

    @staticmethod
    def forward(ctx, features, target, center: bool):
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
        # LAPACK's U comes back column-major; products with it ran 1.5-3x slower than with a
        # row-major copy (measured at d = 1024, K = 100), and the copy costs one pass.
        u = u.contiguous()
        ctx.save_for_backward(u, s, vh.transpose(-2, -1))
        ctx.center, ctx.input_dtype = center, features.dtype
        return (u @ vh).to(features.dtype)

    @staticmethod
    def backward(ctx, grad_frame):
        u, s, v = ctx.saved_tensors
        grad = polar_backward(u, s, v, grad_frame, center=ctx.center)
        return grad.to(ctx.input_dtype), None, None


class _GramPolar(torch.autograd.Function):
    """Route "gram": P = A V diag(1/s) V^T from the eigendecomposition of A^T A (given)."""

    @staticmethod
    def forward(ctx, features, target, eigenvalues, eigenvectors, center: bool):
        spectrum = eigenvalues.sqrt()  # s, ascending; > 0 (checked by the caller)
        # eigh's V is column-major; every product with it ran ~1.5x slower (K = 10 and 100).
        eigenvectors = eigenvectors.contiguous()
        frame_form = _frame_form(*target.shape)
        if frame_form:  # P = A N with N = V S^-1 V^T = (A^T A)^(-1/2)
            inverse_root = (eigenvectors / spectrum) @ eigenvectors.transpose(-2, -1)
            frame = target @ inverse_root
            ctx.save_for_backward(frame, spectrum, eigenvectors, inverse_root)
        else:  # U = A V S^-1, P = U V^T
            left = (target @ eigenvectors) / spectrum
            frame = left @ eigenvectors.transpose(-2, -1)
            ctx.save_for_backward(left, spectrum, eigenvectors)
        ctx.frame_form, ctx.center, ctx.input_dtype = frame_form, center, features.dtype
        return frame if frame.dtype == features.dtype else frame.to(features.dtype)

    @staticmethod
    def backward(ctx, grad_frame):
        saved = ctx.saved_tensors
        if grad_frame.dtype != saved[0].dtype:
            grad_frame = grad_frame.to(saved[0].dtype)
        if ctx.frame_form:
            grad = _frame_backward(*saved, grad_frame, center=ctx.center)
        else:
            grad = polar_backward(*saved, grad_frame, center=ctx.center, guarded=False)
        if grad.dtype != ctx.input_dtype:
            grad = grad.to(ctx.input_dtype)
        return grad, None, None, None, None


class _NewtonSchulzPolar(torch.autograd.Function):
    """Route "newton-schulz": scaled Newton-Schulz steps on ``X0 = A / bound``; matmul only.

    Forward, for each ``a`` of the precomputed schedule (:func:`newton_schulz_schedule`)::

        X <- X (1.5 a I - 0.5 a^3 X^T X)        (2 d x K x K products per step)

    then ``H = sym(P^T A)`` for the backward and a convergence flag ``max|P^T P - I| <=
    tolerance`` computed on the device (an output, never read here). Backward, with the same
    schedule on the K x K matrices only (no eigendecomposition)::

        R = P^T G,  C = R - R^T,  Z = H / bound,  D = C,  E = I
        each step:  D <- (a/2) (3 D - a^2 (Z^2 D - Z D Z + D Z^2)),
                    F = 1.5 a I - 0.5 a^3 Z^2,  E <- E F,  Z <- Z F
        L = D / (2 bound)  (H L + L H = C),   N = E / bound  (= H^-1)
        dL/dA = P (L - R N) + G N

    The K x K iteration is the same scalar polynomial on ``[[Z, D], [0, -Z]]`` (odd), which tends
    to ``[[I, 2 Lyap(Z, C)], [0, -I]]`` (the sign function), so D tends to the Lyapunov solution
    that ``1/(s_i + s_j)`` gives in the eigenbasis and E to the inverse: the closed form of
    :func:`_frame_backward` without ``eigh``.
    """

    @staticmethod
    def forward(ctx, features, target, bound: float, schedule, center: bool, tolerance: float):
        num_classes = target.shape[-1]
        iterate = target / bound
        for a in schedule:
            step = iterate.transpose(-2, -1) @ iterate
            step.mul_(-0.5 * a**3).diagonal().add_(1.5 * a)  # 1.5 a I - 0.5 a^3 X^T X
            iterate = iterate @ step
        symmetric = iterate.transpose(-2, -1) @ target
        symmetric = 0.5 * (symmetric + symmetric.transpose(-2, -1))  # H = sym(P^T A)
        # max|P^T P - I| from the full Gram matrix (one more product, ~4 % of the forward): no
        # cached probe tensors, which torch.compile would have to guard on.
        deviation = iterate.transpose(-2, -1) @ iterate
        deviation.diagonal().sub_(1.0)
        converged = deviation.abs().amax() <= tolerance
        ctx.save_for_backward(iterate, symmetric)
        ctx.mark_non_differentiable(converged)
        ctx.bound, ctx.schedule, ctx.num_classes = bound, schedule, num_classes
        ctx.center, ctx.input_dtype = center, features.dtype
        return iterate.to(features.dtype), converged

    @staticmethod
    def backward(ctx, grad_frame, _grad_converged):
        frame, symmetric = ctx.saved_tensors
        grad_frame = grad_frame.to(frame.dtype)
        reduced = frame.transpose(-2, -1) @ grad_frame  # R = P^T G
        lyapunov = reduced - reduced.transpose(-2, -1)  # D = C
        inverse = torch.eye(ctx.num_classes, dtype=frame.dtype, device=frame.device)  # E
        iterate = symmetric / ctx.bound  # Z
        for a in ctx.schedule:
            square = iterate @ iterate
            mixed = square @ lyapunov - (iterate @ lyapunov) @ iterate + lyapunov @ square
            lyapunov = (0.5 * a) * (3.0 * lyapunov - a * a * mixed)
            step = square.mul(-0.5 * a**3)
            step.diagonal().add_(1.5 * a)
            inverse = inverse @ step
            iterate = iterate @ step
        inverse_root = inverse / ctx.bound  # N = H^-1
        inner = _centre_rows(lyapunov / (2.0 * ctx.bound) - reduced @ inverse_root, ctx.center)
        grad = torch.addmm(grad_frame @ _centre_rows(inverse_root, ctx.center), frame, inner)
        return grad.to(ctx.input_dtype), None, None, None, None, None


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


def _gram_route(
    features: torch.Tensor,
    target: torch.Tensor,
    center: bool,
    result_dtype: torch.dtype,
    name: str = "features",
) -> torch.Tensor:
    """Route "gram" with its fallback: the SVD route when the eigenvalues fail the threshold.

    The fallback triggers on ``lambda_min <= threshold * lambda_max`` (too ill-conditioned; this
    includes a rank-deficient A, possible with delta = 0) and on a non-finite ``A^T A`` (overflow
    of a huge A, which the SVD route does not square; or NaN input). The decision reads one bool
    on the host, and only then is the input checked for NaN/Inf (``name`` in the ValueError), so
    the common case pays for no finiteness pass; under ``torch.compile`` it is a ``torch.cond``
    instead, so the graph has no break (callers pass finite input there: the heads do).
    """
    threshold = gram_eigenvalue_threshold(target.dtype, result_dtype)
    with torch.no_grad():
        gram = target.transpose(-2, -1) @ target
        # A NaN anywhere makes the sum NaN; an overflowing sum (entries near 1e308) only sends a
        # finite case to the SVD, which is exact too.
        total = gram.sum()
    if torch.compiler.is_compiling():
        # The same rule as device tensors and a torch.cond, so that the graph has no break.
        # eigh may fail on non-finite input: it gets zeros instead, which fail the threshold.
        with torch.no_grad():
            finite = total.isfinite()
            eigenvalues, eigenvectors = torch.linalg.eigh(torch.where(finite, gram, 0.0))
            accurate = (eigenvalues[0] > threshold * eigenvalues[-1]) & finite

        def gram_branch(features, target, eigenvalues, eigenvectors):
            return _GramPolar.apply(features, target, eigenvalues, eigenvectors, center)

        def svd_branch(features, target, eigenvalues, eigenvectors):
            return _SVDPolar.apply(features, target, center)

        return torch.cond(
            accurate, gram_branch, svd_branch, (features, target, eigenvalues, eigenvectors)
        )
    # Eager: the same rule on Python floats (three host reads, fewer operations than tensors).
    if math.isfinite(total.item()):
        with torch.no_grad():
            eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        if eigenvalues[0].item() > threshold * eigenvalues[-1].item():
            return _GramPolar.apply(features, target, eigenvalues, eigenvectors, center)
    check_finite_features(features, name)
    return _SVDPolar.apply(features, target, center)


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


def _newton_schulz_route(
    features: torch.Tensor, target: torch.Tensor, bound: float, floor: float, center: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route "newton-schulz": (P in the features' dtype, converged flag on the device).

    ``bound`` >= sigma_max(target) (``||Y||_F + delta / c`` for ``A' = Y M + (delta/c) prox``)
    and ``floor`` the usual size of its smallest singular value (``delta / c``); the schedule
    starts from ``floor / (safety * bound)``.
    """
    compute_dtype = target.dtype
    scaled_bound = bound * (1.0 + NEWTON_SCHULZ_MARGIN)
    lower = min(1.0, floor / (NEWTON_SCHULZ_SAFETY * scaled_bound))
    schedule = newton_schulz_schedule(lower, torch.finfo(compute_dtype).eps)
    tolerance = stored_tolerance(compute_dtype)
    return _NewtonSchulzPolar.apply(features, target, scaled_bound, schedule, center, tolerance)


# --- solver names --------------------------------------------------------------------------------

#: An iterative solver registered by another module: ``solve(target, features, prox, delta,
#: max_iterations) -> P`` (float64, differentiable in ``target`` = A). See :func:`register_solver`.
_REGISTERED_SOLVERS: dict[str, Callable[..., torch.Tensor]] = {}

#: Solvers accepted by :func:`nearest_etf`: "auto", the three exact routes of this module, then
#: the registered ones ("trust-regions", registered by :mod:`guided_nc.solvers` when the package
#: is imported).
SOLVERS = ("auto", "gram", "svd", "newton-schulz", "trust-regions")

#: The routes this module computes itself.
_CLOSED_FORM = ("gram", "svd", "newton-schulz")


def register_solver(name: str, solve: Callable[..., torch.Tensor]) -> None:
    """Make ``nearest_etf(..., solver=name)`` call ``solve(target, features, prox, delta,
    max_iterations)``.

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

    Computed in float64 and returned in the input's dtype, with the closed-form backward.
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
    target = matrix.detach().to(COMPUTE_DTYPE)
    if solver == "svd":
        return _SVDPolar.apply(matrix, target, False)
    return _gram_route(matrix, target, False, matrix.dtype, "matrix")


def _solve(
    features: torch.Tensor,
    prox: torch.Tensor | None,
    delta: float,
    route: str,
    *,
    compute_dtype: torch.dtype = COMPUTE_DTYPE,
    result_dtype: torch.dtype | None = None,
    feature_norm: float | None = None,
    max_iterations: int = 30,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The nearest-ETF solve on validated inputs: ``(P, converged)``.

    P is in the features' dtype and differentiable in them; ``converged`` is a device bool for
    ``"newton-schulz"`` (never read here) and None for the routes that are always exact.
    ``result_dtype`` sets the Gram route's accuracy target (default: the features' dtype; the
    heads pass the dtype they store P in). ``feature_norm`` is an upper bound on ``||Y||_F``
    for Newton-Schulz (the heads pass 1: their Y has unit norm); None reads it from the device.
    No validation and, except for the Gram route's fallback test on the CPU (a host read) and
    ``feature_norm=None``, no host synchronisation: :mod:`guided_nc.heads` calls this directly.
    """
    dim, num_classes = features.shape
    scale = 2.0 / math.sqrt(num_classes - 1)  # c
    if route in _CLOSED_FORM:
        with torch.no_grad():
            # A' = Y M + (delta / c) prox = A / c: the same polar factor, one pass fewer. Mixed
            # dtypes promote inside the ops (no separate float64 copies of Y and prox).
            target = torch.sub(features, features.mean(dim=1, keepdim=True, dtype=compute_dtype))
            if target.dtype != compute_dtype:  # float64 Y with a float32 solve
                target = target.to(compute_dtype)
            if route == "newton-schulz" and feature_norm is None:
                feature_norm = float(torch.linalg.matrix_norm(target))  # ||Y M||_F (a host read)
                if not math.isfinite(feature_norm):  # NaN/Inf in Y, or an overflowing norm
                    check_finite_features(features)
                    route = "svd"
            if delta != 0:
                if prox is None:  # first-step rule (method.md): prox = eye(d, K)
                    target.diagonal().add_(delta / scale)
                else:
                    if prox.device != target.device:
                        prox = prox.to(target.device)
                    target.add_(prox, alpha=delta / scale)
        if route == "gram":
            return _gram_route(features, target, True, result_dtype or features.dtype), None
        if route == "svd":
            return _SVDPolar.apply(features, target, True), None
        bound = feature_norm + delta / scale  # >= ||Y M||_2 + (delta / c) ||prox||_2
        return _newton_schulz_route(features, target, bound, delta / scale, True)
    if route not in _REGISTERED_SOLVERS:
        raise RuntimeError(
            f"solver={route!r} is not registered; import guided_nc (or guided_nc.solvers) "
            "before calling nearest_etf with it"
        )
    # A registered solver differentiates through A itself: build it with autograd.
    y = features.to(compute_dtype)
    if prox is None:
        anchor = torch.eye(dim, num_classes, dtype=compute_dtype, device=y.device)
    else:
        anchor = prox.detach().to(dtype=compute_dtype, device=y.device)
    target = scale * (y - y.mean(dim=1, keepdim=True)) + delta * anchor
    frame = _REGISTERED_SOLVERS[route](target, y.detach(), anchor, delta, max_iterations)
    return frame.to(features.dtype), None


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
    frame, converged = _solve(
        features, prox, delta, route, compute_dtype=compute_dtype, max_iterations=max_iterations
    )
    if converged is not None and not bool(converged):
        # Newton-Schulz's lower bound on s_min(A) did not hold (e.g. Y M cancels delta prox) or
        # Y is not finite: here the host may wait, so check, then answer exactly with the SVD.
        check_finite_features(features)
        frame, _ = _solve(features, prox, delta, "svd", compute_dtype=compute_dtype)
    return frame


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
