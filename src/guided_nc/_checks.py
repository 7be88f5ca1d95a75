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
    "COMPUTE_DTYPES",
    "VALIDATION_MODES",
    "check_batch_features",
    "check_class_matrix",
    "check_compute_dtype",
    "check_delta",
    "check_finite_features",
    "check_head_sizes",
    "check_labels",
    "check_max_iterations",
    "check_number",
    "check_positive",
    "check_sizes",
    "check_stiefel",
    "check_validation",
    "orthonormality_error",
    "stored_tolerance",
]

#: dtype in which the nearest-ETF solve, its backward and the heads' statistics run by default.
COMPUTE_DTYPE = torch.float64

#: dtypes a caller may ask the solve to run in (``compute_dtype=``): float64, or float32 for
#: devices with slow float64 (docs/etf.md, "compute_dtype").
COMPUTE_DTYPES = (torch.float64, torch.float32)

#: How the heads (and AGD) report bad values: ``"strict"`` raises at once (one host read per
#: call), ``"deferred"`` counts on the device and raises at the next explicit check, ``"auto"``
#: is strict on the CPU and deferred on accelerators (docs/heads.md, "Validation").
VALIDATION_MODES = ("auto", "strict", "deferred")


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


def check_class_matrix(features: torch.Tensor, *, finite: bool = True) -> int:
    """A (d, K) float matrix of class means, d >= K >= 2 (and finite); returns K.

    The finiteness test reads the tensor on the host (one synchronisation on a GPU); callers
    that find non-finite values another way pass ``finite=False`` and call
    :func:`check_finite_features` when they do.
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
    if finite:
        check_finite_features(features)
    return num_classes


def check_finite_features(features: torch.Tensor, name: str = "features") -> None:
    """ValueError if ``features`` holds NaN or Inf (one host read)."""
    if not bool(torch.isfinite(features).all()):
        raise ValueError(
            f"{name} contain NaN or Inf; check the backbone output (e.g. lower the learning "
            "rate) before computing the nearest ETF"
        )


def check_max_iterations(max_iterations: int) -> None:
    """An integer >= 1 (trust-region iterations)."""
    is_integer = isinstance(max_iterations, int) and not isinstance(max_iterations, bool)
    if not is_integer or max_iterations < 1:
        raise ValueError(f"max_iterations={max_iterations!r} must be an integer >= 1 (paper: 30)")


def check_number(
    name: str,
    value: float | None,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
    optional: bool = False,
    hint: str = "",
) -> float | None:
    """The one number validator: a finite int or float within the bounds (None if ``optional``).

    Returns it as a float. NaN and infinities are refused, so that ``lr=nan`` fails here, at
    once, and not an epoch later blaming something else. The error names the argument, the
    value and the range, then ``hint`` (the fix, when there is more to say than the range).
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    too_low = minimum is not None and (value <= minimum if exclusive_minimum else value < minimum)
    too_high = maximum is not None and (value >= maximum if exclusive_maximum else value > maximum)
    if math.isfinite(value) and not too_low and not too_high:
        return float(value)
    if minimum is not None and maximum is not None:
        bounds = (
            f" in {'(' if exclusive_minimum else '['}{minimum:g}, "
            f"{maximum:g}{')' if exclusive_maximum else ']'}"
        )
    elif minimum is not None:
        bounds = f" {'>' if exclusive_minimum else '>='} {minimum:g}"
    elif maximum is not None:
        bounds = f" {'<' if exclusive_maximum else '<='} {maximum:g}"
    else:
        bounds = ""
    fix = f"; {hint}" if hint else ""
    raise ValueError(f"{name}={value} must be a finite number{bounds}{fix}")


def check_delta(delta: float) -> float:
    """The proximal coefficient: a finite number >= 0; returns it as a float."""
    return check_number("delta", delta, minimum=0, hint="the default is 1e-3")


def check_positive(name: str, value: float) -> float:
    """A finite number > 0; returns it as a float."""
    return check_number(name, value, minimum=0, exclusive_minimum=True)


#: Up to this K the checks form ``P^T P`` in full (d K^2 multiply-adds, a handful of ops); above
#: it they use the O(dK) probes (the Gram matrix would cost as much as the solve itself).
FULL_GRAM_MAX_CLASSES = 16


def orthonormality_error(frame: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``max(|column norms^2 - 1|, max|(P^T P - I) x|)`` for a fixed unit probe x.

    O(dK) instead of the O(dK^2) Gram matrix: ``P^T P = I`` iff ``P^T P x = x`` for every x,
    so the column norms are tested exactly and ``P^T P - I`` on one fixed generic probe vector
    (missing a defect would need ``P^T P - I`` to vanish on it, a measure-zero event for this
    fixed pseudo-random probe; two matrix-vector products, not a skinny matrix product, which
    ran 3x slower). For K <= 16 it is ``max|P^T P - I|`` itself (fewer operations there).
    Computed in ``dtype`` (default: the frame's dtype, at least float32: rounding in the check,
    ~K u, stays far below the tolerance of the dtype the frame is stored in). No host
    synchronisation.

    Shape: frame (d, K) -> 0-dim tensor in ``dtype`` on the frame's device.
    """
    if dtype is None:
        dtype = torch.promote_types(frame.dtype, torch.float32)
    matrix = frame.detach()
    if matrix.dtype != dtype:
        matrix = matrix.to(dtype)
    num_classes = frame.shape[-1]
    if num_classes <= FULL_GRAM_MAX_CLASSES:
        identity = _negative_identity(num_classes, matrix.device, dtype)
        deviation = torch.addmm(identity, matrix.transpose(-2, -1), matrix)
        return torch.linalg.vector_norm(deviation, ord=math.inf)  # max|P^T P - I|
    norm_error = (torch.linalg.vector_norm(matrix, dim=0).square() - 1.0).abs().amax()
    probe = probe_vectors(num_classes, matrix.device, dtype)
    probe_error = (matrix.transpose(-2, -1).mv(matrix.mv(probe)) - probe).abs().amax()
    return torch.maximum(norm_error, probe_error)


def check_stiefel(frame: torch.Tensor, name: str, dim: int, num_classes: int) -> torch.Tensor:
    """A (d, K) tensor with orthonormal columns, judged with the tolerance of *its* dtype.

    A float32 point passed to a float64 computation is still judged as float32 (issue: a
    float32-rounded previous frame must not fail a float64 tolerance). One host read (the
    verdict). Returns ``frame``.
    """
    if not isinstance(frame, torch.Tensor) or tuple(frame.shape) != (dim, num_classes):
        shape = tuple(frame.shape) if isinstance(frame, torch.Tensor) else type(frame).__name__
        raise ValueError(f"{name} must be a ({dim}, {num_classes}) tensor, got {shape}")
    if not frame.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {frame.dtype}")
    error = orthonormality_error(frame).item()
    tolerance = stored_tolerance(frame.dtype)
    if not error <= tolerance:  # False for NaN too
        raise ValueError(
            f"{name} must have orthonormal columns (P^T P = I), but max|(P^T P - I) x| = "
            f"{error:.3g} > {tolerance:g} (the tolerance of {frame.dtype}) for unit "
            "probes x; pass a Stiefel point, e.g. the previous nearest_etf output"
        )
    return frame


#: Probe vectors already made, per (K, device, dtype): every call of a check used to draw them
#: again (a generator, a randn and a copy per call, most of the cost of a check at small K).
_PROBES: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def probe_vectors(
    num_classes: int, device: torch.device | str, dtype: torch.dtype = COMPUTE_DTYPE
) -> torch.Tensor:
    """A fixed unit vector of length K with generic, non-zero entries (cached).

    Drawn once in float64 on the CPU from seed 0 (the same probe on every device), then cast.

    Shape: returns (K,) in ``dtype`` on ``device``. Treat it as read-only.
    """
    key = (num_classes, torch.device(device), dtype)
    probe = _PROBES.get(key)
    if probe is None:
        draw = torch.randn(
            num_classes, generator=torch.Generator().manual_seed(0), dtype=torch.float64
        )
        probe = (draw / draw.norm()).to(device=key[1], dtype=dtype)
        _PROBES[key] = probe
    return probe


_NEGATIVE_IDENTITIES: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def _negative_identity(num_classes: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``-I_K`` (cached; read-only), the addend of ``P^T P - I`` in one ``addmm``."""
    key = (num_classes, device, dtype)
    matrix = _NEGATIVE_IDENTITIES.get(key)
    if matrix is None:
        matrix = -torch.eye(num_classes, dtype=dtype, device=device)
        _NEGATIVE_IDENTITIES[key] = matrix
    return matrix


def check_compute_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """``compute_dtype`` must be one of :data:`COMPUTE_DTYPES`; returns it."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"compute_dtype={compute_dtype} is not supported; use torch.float64 (the default) or "
            "torch.float32 (for devices with slow float64, docs/etf.md)"
        )
    return compute_dtype


def check_validation(validation: str) -> str:
    """``validation`` must be one of :data:`VALIDATION_MODES`; returns it."""
    if validation not in VALIDATION_MODES:
        raise ValueError(
            f"validation={validation!r} is not supported; use 'auto' (strict on the CPU, deferred "
            "on accelerators), 'strict' (raise at once) or 'deferred' (count on the device, raise "
            "at the next check())"
        )
    return validation


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
