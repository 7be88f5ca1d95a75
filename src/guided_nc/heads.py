"""Classifier heads: learnable, fixed simplex ETF and implicit (nearest) simplex ETF.

Every head takes raw backbone features ``f`` (B, d), normalises them to ``h = tau f / ||f||``
(method.md section 1) and returns logits ``z = W h + b`` (B, K). The heads differ in W and b:

============  ==========================================  ===================================
head          W (K x d)                                   b (K)
============  ==========================================  ===================================
learnable     a Parameter, rows renormalised to unit norm  none (optional Parameter)
fixed ETF     ``sqrt(K/(K-1)) M P^T`` for a fixed P        ``-W mu`` (batch mean / running mean)
implicit ETF  the nearest simplex ETF of the class means   ``-W mu_G`` (batch mean / running mean)
============  ==========================================  ===================================

The ETF heads hold their state in persistent buffers, like batch norm's running statistics, so a
``state_dict`` round trip resumes a run bit-identically. Under ``torch.distributed`` the batch
statistics are summed over ranks with :mod:`guided_nc.distributed` before they are used, so every
rank builds the same W and b.

Bad values (NaN/Inf features, labels outside [0, K)) never change the state. How they are
reported is the ``validation`` mode: ``"strict"`` raises at once (one host read per call),
``"deferred"`` commits the state with ``torch.where`` on an on-device flag, counts the rejected
batch in a device counter and raises at the next :meth:`check` (called by ``train()``/``eval()``),
so the training step reads nothing on the host; ``"auto"`` (default) is strict on the CPU and
deferred elsewhere, and ``torch.compile`` always traces the deferred step. Decisions and the
exact update rules are in ``docs/heads.md``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from guided_nc._checks import (
    COMPUTE_DTYPE,
    check_batch_features,
    check_compute_dtype,
    check_delta,
    check_head_sizes,
    check_labels,
    check_number,
    check_positive,
    check_stiefel,
    check_validation,
)
from guided_nc._guards import committed, counted, drain, is_strict, store_buffer
from guided_nc.distributed import all_reduce_sum, all_reduce_sum_with_grad, all_reduce_sums
from guided_nc.etf import (
    PolarFactors,
    check_solver,
    etf_classifier,
    polar_factors_backward,
    resolve_solver,
    simplex_etf,
    solve_nearest_etf,
)
from guided_nc.methods import HEAD_NAMES, METHOD_VARIANTS
from guided_nc.settings import HeadSettings

__all__ = [
    "FixedETFHead",
    "ImplicitETFHead",
    "LearnableHead",
    "build_head",
    "normalize_features",
    "renormalize_heads_",
]

#: Floor of the class-mean smoothing factor alpha_t (paper section 3.5).
DEFAULT_ALPHA_FLOOR = 1e-4

#: Reasons a batch is rejected, in the order of the ``rejected_batches`` counter.
REJECTION_REASONS = ("non-finite features", "labels out of range", "solver not converged")

#: The clamp of the feature norms in the normalisation (as :func:`torch.nn.functional.normalize`).
NORM_EPS = 1e-12

#: dtypes an ETF head may keep its state in (float16/bfloat16 are too coarse for a Stiefel frame
#: and for running statistics; features of those dtypes are fine).
STATE_DTYPES = (torch.float32, torch.float64)


def normalize_features(features: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample normalisation ``h = tau * f / ||f||_2`` (method.md section 1).

    The norm is clamped at :data:`NORM_EPS` = 1e-12 (as :func:`torch.nn.functional.normalize`),
    so an all-zero feature maps to 0. One scaling pass over the batch: ``f * (tau / ||f||)``
    (a (B, 1) factor), rather than a division and then a multiplication by tau.

    Shape: features (B, d) -> (B, d), same dtype and device; differentiable.
    """
    return _normalized(features, temperature)[0].to(features.dtype)


def _working_dtype(features: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 features in float32 (norms and sums of many half values lose digits);
    float32/float64 unchanged (no copy)."""
    if features.dtype in (torch.float32, torch.float64):
        return features
    return features.float()


def _normalized(
    features: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h, ||f||, tau / max(||f||, eps))``: the features the heads classify
    (:func:`normalize_features` is this, so the same bits), the row norms (B, 1), which the
    heads reuse as their finiteness test, and the scale (B, 1), which the implicit head's
    backward reuses."""
    features = _working_dtype(features)
    norms = features.norm(2, dim=-1, keepdim=True)
    scale = temperature / norms.clamp_min(NORM_EPS)
    return features * scale, norms, scale


def _value_flags(
    norms: torch.Tensor, labels: torch.Tensor | None, num_classes: int
) -> torch.Tensor:
    """A 2-vector of bools ``[features non-finite?, labels out of range?]``, no host read.

    The features are judged through their row norms (B values instead of a pass over the (B, d)
    batch): a NaN or Inf entry makes its row's norm NaN or Inf. (So does a row whose squared norm
    overflows, |f| > ~1e19 in float32: such features normalise to garbage anyway.)
    """
    bad_features = ~torch.isfinite(norms).all()
    if labels is None:
        return torch.stack([bad_features, torch.zeros_like(bad_features)])
    bad_labels = ((labels < 0) | (labels >= num_classes)).any().to(bad_features.device)
    return torch.stack([bad_features, bad_labels])


def _raise_value_errors(errors: torch.Tensor, num_classes: int) -> None:
    """Raise if any rank flagged its batch. ``errors`` holds the counts summed over ranks."""
    bad_features, bad_labels = (int(v) for v in errors.tolist())
    if bad_features:
        raise ValueError(
            f"features contain NaN or Inf (on {bad_features} rank(s)); the batch was rejected and "
            f"the head's state is unchanged. Check the backbone (e.g. lower the learning rate)"
        )
    if bad_labels:
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}] (num_classes={num_classes}), but "
            f"{bad_labels} rank(s) passed labels outside that range; the batch was rejected"
        )


def _reasons(flags: torch.Tensor, converged: torch.Tensor | None = None) -> torch.Tensor:
    """The (3,) rejection flags of :data:`REJECTION_REASONS` from the (2,) value flags and the
    solver's convergence flag (None: nothing to converge)."""
    failed = flags.new_zeros(1) if converged is None else (~converged).reshape(1).to(flags.dtype)
    return torch.cat([flags, failed])


def _check_state_dtype(dtype: torch.dtype | None, head: str) -> torch.dtype:
    """The dtype of an ETF head's state: float32 or float64 (default: torch's default dtype)."""
    dtype = dtype or torch.get_default_dtype()
    if dtype not in STATE_DTYPES:
        raise ValueError(
            f"dtype={dtype} is too coarse for the {head}'s state (a Stiefel frame and running "
            f"statistics); use dtype=torch.float32 or torch.float64 (float16/bfloat16 features "
            f"and autocast are fine: the statistics and the solve run in compute_dtype)"
        )
    return dtype


class _Head(nn.Module):
    """What every head shares: its feature normalisation and the validation modes.

    ``rejected_batches`` (non-persistent buffer, (3,) long) counts the batches rejected since the
    last :meth:`check`, per reason (:data:`REJECTION_REASONS`); it is a report, not state, so it
    is not in the ``state_dict``. The modes themselves live in :mod:`guided_nc._guards`.
    """

    temperature: float
    num_classes: int
    validation: str
    rejected_batches: torch.Tensor

    def _init_validation(self, validation: str, device: torch.device | str | None) -> None:
        self.validation = check_validation(validation)
        counter = torch.zeros(len(REJECTION_REASONS), dtype=torch.long, device=device)
        self.register_buffer("rejected_batches", counter, persistent=False)

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        """The features this head classifies: ``tau f / ||f||`` (B, d), differentiable.

        Metrics and evaluation take their features from here, so that they see exactly what
        the head sees. float16/bfloat16 features are normalised in float32.
        """
        return _normalized(features, self.temperature)[0]

    def strict(self, device: torch.device) -> bool:
        """Whether a call on ``device`` raises at once (``"strict"``) or defers (``"deferred"``);
        ``"auto"`` is strict on the CPU, deferred elsewhere and while compiling."""
        return is_strict(self.validation, device)

    def _screen(self, flags: torch.Tensor, strict: bool) -> torch.Tensor | None:
        """Judge a batch by its value flags ``[non-finite features, labels out of range]``
        (summed over ranks). Strict: raise now, before any state changes, and return None;
        deferred: the on-device verdict ``ok``."""
        if strict:
            _raise_value_errors(flags, self.num_classes)  # every rank raises together
            return None
        return ~(flags > 0).any()

    def _commit(self, ok: torch.Tensor | None, updates: dict[str, torch.Tensor]) -> None:
        """Store every new buffer value; deferred (``ok`` a device flag): only if ``ok``."""
        for name, value in updates.items():
            store_buffer(self, name, committed(ok, value, getattr(self, name)))

    def _count(self, flags: torch.Tensor) -> None:
        """Add one batch's (3,) rejection flags (:data:`REJECTION_REASONS`) to the counter."""
        store_buffer(self, "rejected_batches", counted(self.rejected_batches, flags))

    def check(self) -> None:
        """Raise ``ValueError`` if batches were rejected since the last check (deferred mode).

        One host read. The counter is reset before raising, so a caller that catches the error
        can go on. ``train()`` and ``eval()`` call it (one host read at each switch).
        """
        counts = drain(self.rejected_batches)
        if not counts:
            return
        fixes = {
            "non-finite features": "check the backbone (e.g. lower the learning rate)",
            "labels out of range": f"labels must lie in [0, {self.num_classes - 1}]",
            "solver not converged": "the Newton-Schulz solve did not converge (delta too small "
            "for it?): use solver='gram' or 'svd'",
        }
        parts = [
            f"{count} with {reason} ({fixes[reason]})"
            for reason, count in zip(REJECTION_REASONS, counts, strict=True)
            if count
        ]
        raise ValueError(
            f"{type(self).__name__} rejected {sum(counts)} batch(es) since the last check() "
            f"(validation='deferred') and left its state unchanged: " + "; ".join(parts)
        )

    def train(self, mode: bool = True) -> _Head:
        """``nn.Module.train``, then :meth:`check` (the natural host read of a deferred run)."""
        result = super().train(mode)
        self.check()
        return result

    def _validate_values(
        self,
        norms: torch.Tensor,
        labels: torch.Tensor | None,
        strict: bool,
        *,
        reduce: bool,
    ) -> None:
        """Check a batch's values (no state to protect: evaluation and the standard head).

        ``reduce`` sums the flags over ranks first (training mode, where every rank steps
        together), so that every rank raises together and no rank is left in a collective.
        """
        flags = _value_flags(norms, labels, self.num_classes)
        if reduce:
            flags = all_reduce_sum(flags.to(torch.int32))
        if self._screen(flags, strict) is not None:
            self._count(_reasons(flags))


class LearnableHead(_Head):
    """Standard head: a learnable linear classifier with unit-norm rows (method.md section 1).

    ``logits = W h (+ b)`` with ``h = tau f / ||f||``. The rows of W are renormalised to unit norm
    at initialisation and whenever :meth:`renormalize_` is called; **the training loop must call
    ``head.renormalize_()`` (or :func:`renormalize_heads_` on the model) after every optimiser
    step**, and after any re-initialisation such as :func:`guided_nc.optim.orthogonal_init_`.

    Values are checked as in the ETF heads (NaN/Inf features, labels outside [0, K) when given):
    ``validation="strict"`` raises at once, ``"deferred"`` counts them for :meth:`check` (the
    head has no state of its own to protect; the check keeps NaN from silently reaching the
    optimiser, which refuses non-finite gradients too, see :class:`guided_nc.optim.AGD`).

    Args:
        num_features: d, the backbone's feature width.
        num_classes: K >= 2.
        temperature: tau > 0, the norm of every normalised feature.
        bias: add a learnable bias (zero-initialised). Off by default, as in the paper.
        validation: ``"auto"`` (strict on the CPU, deferred elsewhere), ``"strict"`` or
            ``"deferred"`` (module docstring).
        device, dtype: of the parameters (any float dtype; float16/bfloat16 features are
            normalised in float32 and the product runs in the parameters' dtype).

    Shape: features (B, d) float -> logits (B, K) in the features' dtype.
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        temperature: float = 5.0,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        validation: str = "auto",
    ) -> None:
        super().__init__()
        check_head_sizes(num_features, num_classes, needs_stiefel=False)
        self.num_features = num_features
        self.num_classes = num_classes
        self.temperature = check_positive("temperature", temperature)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_classes, num_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_classes, **factory)) if bias else None
        self._init_validation(validation, device)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """nn.Linear's initialisation (Kaiming uniform), then unit-norm rows; bias 0."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5), generator=generator)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.renormalize_()

    @torch.no_grad()
    def renormalize_(self) -> None:
        """Project every row of W back to unit norm, in place (call after each optimiser step)."""
        self.weight.copy_(F.normalize(self.weight, dim=1))

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, K). ``labels`` is accepted for a uniform head interface and only checked."""
        check_batch_features(features, self.num_features)
        check_labels(labels, features.shape[0], required=False)
        h, norms, _ = _normalized(features, self.temperature)
        self._validate_values(norms, labels, self.strict(features.device), reduce=self.training)
        weight = self.weight
        logits = F.linear(h.to(weight.dtype), weight, self.bias)
        return logits if logits.dtype == features.dtype else logits.to(features.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_features={self.num_features}, num_classes={self.num_classes}, "
            f"temperature={self.temperature}, bias={self.bias is not None}, "
            f"validation={self.validation!r}"
        )


class _CentredETFHead(_Head):
    """Shared parts of the ETF heads: W buffer, running global mean, eval-mode logits."""

    weight: torch.Tensor
    running_mean: torch.Tensor
    num_steps: torch.Tensor

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        temperature: float,
        running_mean_momentum: float | None,
        compute_dtype: torch.dtype,
        validation: str,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        check_head_sizes(num_features, num_classes, needs_stiefel=True)
        check_number(
            "running_mean_momentum",
            running_mean_momentum,
            minimum=0,
            exclusive_minimum=True,
            maximum=1,
            optional=True,
            hint="0.1 is batch norm's default, None a cumulative average",
        )
        self.num_features = num_features
        self.num_classes = num_classes
        self.temperature = check_positive("temperature", temperature)
        self.running_mean_momentum = running_mean_momentum
        self.compute_dtype = check_compute_dtype(compute_dtype)
        self._init_validation(validation, device)

    @property
    def bias(self) -> torch.Tensor:
        """The evaluation bias ``b = -W running_mean`` (K,), detached (like nn.Linear.bias)."""
        return -(self.weight @ self.running_mean)

    def _check_state(self) -> None:
        """The state must still be float32/float64 (``.half()`` converts buffers too)."""
        if self.weight.dtype not in STATE_DTYPES:
            raise TypeError(
                f"{type(self).__name__}'s state is {self.weight.dtype} (after .half(), "
                f".bfloat16() or .to({self.weight.dtype})), too coarse for its frame and running "
                f"statistics; keep the head in float32 or float64: call head.float() (float16/"
                f"bfloat16 features and autocast are fine)"
            )

    def _running_mean_update(
        self, batch_mean: torch.Tensor, steps_done: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """The new running mean (not yet stored). The first training step copies the batch mean
        (no bias towards the zero initialisation); later steps use the momentum, or a cumulative
        average when ``running_mean_momentum`` is None (as in batch norm). ``steps_done``: the
        step count read on the host (an int, strict mode), else the device buffer is used (no
        host read)."""
        old = self.running_mean
        if old.dtype != batch_mean.dtype:
            old = old.to(batch_mean.dtype)
        if isinstance(steps_done, int):
            weight = self.running_mean_momentum or 1.0 / (steps_done + 1)
            return torch.lerp(old, batch_mean, 1.0 if steps_done == 0 else weight)
        if self.running_mean_momentum is None:
            weight = 1.0 / (self.num_steps + 1).to(batch_mean.dtype)
        else:
            weight = float(self.running_mean_momentum)
        return torch.where(self.num_steps == 0, batch_mean, torch.lerp(old, batch_mean, weight))

    def _eval_logits(
        self, features: torch.Tensor, h: torch.Tensor, norms: torch.Tensor
    ) -> torch.Tensor:
        self._validate_values(norms, None, self.strict(features.device), reduce=False)
        weight = self.weight.to(h.dtype)
        logits = F.linear(h, weight, -(weight @ self.running_mean.to(h.dtype)))
        return logits if logits.dtype == features.dtype else logits.to(features.dtype)


class FixedETFHead(_CentredETFHead):
    """Fixed simplex-ETF classifier with a centring bias (method.md sections 1 and 5).

    ``W = sqrt(K/(K-1)) M P^T`` (unit-norm rows) is a buffer, never trained. ``b = -W mu``:

    * training: mu is the global mean of the (all-ranks) batch of normalised features, so the
      logits are ``W (h - mu)``. With ``bias_gradient=True`` (default, like the implicit head)
      the gradient flows through mu; ``False`` reproduces the release (mu treated as a constant).
    * evaluation: mu is the running mean of the training batches' means (buffer
      ``running_mean``), never the evaluation batch's own mean.

    Args:
        num_features: d >= K.
        num_classes: K >= 2.
        temperature: tau > 0.
        rotation: ``"canonical"`` (P = first K columns of I_d), ``"haar"`` (Haar-random P drawn
            from ``generator``) or a (d, K) tensor with orthonormal columns (any float dtype).
        generator: random generator for ``"haar"``.
        running_mean_momentum: momentum of the running mean (None = cumulative average).
        bias_gradient: whether the training bias carries gradient through the batch mean.
        device, dtype: of the buffers (float32 or float64).
        compute_dtype: dtype of the batch statistics (float64; float32 for slow-float64 devices).
        validation: ``"auto"``, ``"strict"`` or ``"deferred"`` (module docstring).

    Shape: features (B, d) float -> logits (B, K) in the features' dtype.
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        temperature: float = 5.0,
        rotation: str | torch.Tensor = "canonical",
        generator: torch.Generator | None = None,
        running_mean_momentum: float | None = 0.1,
        bias_gradient: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        compute_dtype: torch.dtype = COMPUTE_DTYPE,
        validation: str = "auto",
    ) -> None:
        super().__init__(
            num_features,
            num_classes,
            temperature,
            running_mean_momentum,
            compute_dtype,
            validation,
            device,
        )
        dtype = _check_state_dtype(dtype, "fixed ETF head")
        self.rotation = rotation if isinstance(rotation, str) else "tensor"
        self.bias_gradient = bool(bias_gradient)
        # Persistent: a Haar draw cannot be recomputed without the generator's state.
        weight = simplex_etf(num_classes, num_features, rotation, generator, dtype=dtype)
        self.register_buffer("weight", weight.to(device))
        self.register_buffer("running_mean", torch.zeros(num_features, dtype=dtype, device=device))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long, device=device))

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, K); training mode updates the running mean. ``labels`` is only checked."""
        check_batch_features(features, self.num_features)
        check_labels(labels, features.shape[0], required=False)
        self._check_state()
        h, norms, _ = _normalized(features, self.temperature)
        if not self.training:
            return self._eval_logits(features, h, norms)
        strict = self.strict(features.device)
        compute = self.compute_dtype
        # One all-reduce: [sum of h | count | error flags] (identity without a process group).
        # The sum runs in the features' dtype shifted by the first row, as in
        # :func:`class_statistics`; the gradient flows back to every rank's features.
        reference = h[0].detach()
        sums = (h - reference).sum(dim=0).to(compute) + h.shape[0] * reference.to(compute)
        flags = _value_flags(norms, labels, self.num_classes).to(compute)
        count = torch.full((1,), h.shape[0], dtype=compute, device=h.device)
        total = all_reduce_sum_with_grad(torch.cat([sums, count, flags]))
        d = self.num_features
        flags = total[d + 1 :].detach()
        ok = self._screen(flags, strict)  # every rank raises together
        batch_mean = total[:d] / total[d].detach()
        if not self.bias_gradient:
            batch_mean = batch_mean.detach()
        weight = self.weight.to(h.dtype)
        logits = F.linear(h, weight, -(weight @ batch_mean.to(h.dtype)))
        with torch.no_grad():  # deferred: commit only if the (all-ranks) batch was clean
            updates = {
                "running_mean": self._running_mean_update(batch_mean),
                "num_steps": self.num_steps + 1,
            }
            self._commit(ok, updates)
            if ok is not None:
                self._count(_reasons(flags))
        return logits if logits.dtype == features.dtype else logits.to(features.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_features={self.num_features}, num_classes={self.num_classes}, "
            f"temperature={self.temperature}, rotation={self.rotation!r}, "
            f"running_mean_momentum={self.running_mean_momentum}, "
            f"bias_gradient={self.bias_gradient}, compute_dtype={self.compute_dtype}, "
            f"validation={self.validation!r}"
        )


# --- the implicit head's step, as pure functions -------------------------------------------------


def smoothing_factor(steps_done, floor: float, dtype: torch.dtype = COMPUTE_DTYPE):
    """The class-mean smoothing factor ``alpha_t = max(2/(t+1), floor)`` of step
    ``t = steps_done + 1`` (method.md section 3.5): a Python float for an int, a 0-d tensor in
    ``dtype`` on its device for a tensor (no host read)."""
    if isinstance(steps_done, torch.Tensor):
        return (2.0 / (steps_done + 2).to(dtype)).clamp_min(floor)
    return max(2.0 / (steps_done + 2), floor)


class ClassStatistics(NamedTuple):
    """A batch's class statistics, summed over ranks (:func:`class_statistics`).

    ``sums`` (K, d) and ``counts`` (K,) in the compute dtype; ``flags`` (2,) counts the ranks
    whose batch had non-finite features or labels outside [0, K); ``scatter`` is how a gradient
    of the sums goes back to the samples: the class index (B,) with K for out-of-range labels
    (CPU) or the one-hot (B, K) matrix (accelerators).
    """

    sums: torch.Tensor
    counts: torch.Tensor
    flags: torch.Tensor
    scatter: torch.Tensor


def class_statistics(
    h: torch.Tensor, norms: torch.Tensor, labels: torch.Tensor, num_classes: int, compute_dtype
) -> ClassStatistics:
    """Class sums and counts of a batch of normalised features, summed over ranks.

    The sums are reduced in the compute dtype. With float64 compute (the default) the batch is
    read in float64; with float32 compute it is shifted first, ``sum(h - r) + n r`` with
    ``r = h[0]``, which keeps the float32 sums accurate where the class means nearly coincide
    (early training: class offsets 1e-4 of tau gave 1.7e-3 relative error on Ybar unshifted,
    1.9e-6 shifted). On accelerators the sums are one one-hot product, deterministic unlike
    ``index_add`` (atomics there), with out-of-range labels giving a zero row instead of an
    error; on the CPU, where ``index_add`` is sequential and deterministic, they are an O(Bd)
    ``index_add`` (the one-hot product costs 2BKd flops, which a CPU feels at large K), with
    out-of-range labels sent to an extra row K that is dropped. No operation synchronises with
    the host. The features are judged through their row norms: a NaN or Inf entry makes its
    row's norm NaN or Inf.

    Shape: h (B, d), norms (B, 1), labels (B,) int -> :class:`ClassStatistics`.
    """
    k = num_classes
    reference = h[0] if compute_dtype == torch.float32 else None
    source = h.to(compute_dtype) if reference is None else h - reference
    if h.device.type == "cpu":
        out_of_range = labels != labels.clamp(0, k - 1)
        scatter = labels.masked_fill(out_of_range, k)  # row K: dropped
        sums = source.new_zeros(k + 1, h.shape[1]).index_add_(0, scatter, source)[:k]
        ones = source.new_ones(h.shape[0])
        counts = source.new_zeros(k + 1).index_add_(0, scatter, ones)[:k]
        bad_labels = out_of_range.any()
    else:
        classes = torch.arange(k, device=h.device)
        scatter = (labels.unsqueeze(1) == classes).to(source.dtype)  # (B, K)
        sums, counts = scatter.transpose(0, 1) @ source, scatter.sum(dim=0)
        bad_labels = counts.sum() != labels.shape[0]
    if reference is not None:
        sums = torch.addr(sums, counts, reference)
    flags = torch.stack([~torch.isfinite(norms).all(), bad_labels]).to(compute_dtype)
    return ClassStatistics(*all_reduce_sums(sums, counts, flags), scatter)


class _ImplicitETFLogits(torch.autograd.Function):
    """Logits ``W h + b`` of the implicit head's training step, with one hand-written backward.

    The forward's inputs were computed without autograd (the step's sections in
    :meth:`ImplicitETFHead._training_step`); only ``features`` receives a gradient. The backward
    is the chain rule through every section (docs/heads.md, "The fused backward"), for
    ``Gz = dL/dz``::

        dW   = Gz^T (h - mu)                    dmu = -W^T sum_i Gz_i
        dY   = polar backward of sqrt(K/(K-1)) dW^T M      (ddn_grad only)
        dAvg = (dY - <dY, Y> Y) / ||Avg||       dYbar = dAvg diag(alpha_t present)
        dS_k = dYbar_k / n_k + (dmu - sum_k dYbar_k) / n     (summed over ranks)
        dh_i = W^T Gz_i + dS_{y_i}
        df_i = (tau / ||f_i||) (dh_i - <dh_i, h_i> h_i / tau^2)

    so the whole head costs one autograd node instead of one per operation.
    """

    @staticmethod
    def forward(
        ctx,
        features,
        temperature: float,
        ddn_grad: bool,
        form: str,
        guarded: bool,
        bound: float,
        schedule: tuple,
        h,
        weight,
        mean,
        *tensors,
    ):
        # tensors: scale, unit_average, average_norm, mix, inverse_counts, inverse_total,
        # scatter, then the solve's saved factors (the order :meth:`backward` unpacks).
        weight_h, mean_h = weight.to(h.dtype), mean.to(h.dtype)  # no copies when h is float64
        logits = torch.addmm(weight_h @ mean_h, h, weight_h.transpose(0, 1), beta=-1)
        ctx.save_for_backward(h, weight_h, mean_h, *tensors)
        ctx.temperature, ctx.ddn_grad, ctx.input_dtype = temperature, ddn_grad, features.dtype
        ctx.form, ctx.guarded, ctx.bound, ctx.schedule = form, guarded, bound, schedule
        return logits

    @staticmethod
    def backward(ctx, grad_logits):
        (
            h,
            weight,
            mean,
            scale,
            unit_average,
            average_norm,
            mix,
            inverse_counts,
            inverse_total,
            scatter,
            *saved,
        ) = ctx.saved_tensors
        compute = unit_average.dtype
        if grad_logits.dtype != h.dtype:
            grad_logits = grad_logits.to(h.dtype)
        column_sums = grad_logits.sum(dim=0)  # sum_i Gz_i (K,)
        grad_mean = (column_sums @ weight).to(compute)  # minus dL/dmu through b = -W mu
        if ctx.ddn_grad:
            num_classes = weight.shape[0]
            grad_weight = torch.addr(grad_logits.transpose(0, 1) @ h, column_sums, mean, alpha=-1)
            # W = sqrt(K/(K-1)) (P M)^T: dL/dP = sqrt(K/(K-1)) dW^T M
            grad_frame = grad_weight.transpose(0, 1).to(compute)
            grad_frame = (grad_frame - grad_frame.mean(dim=1, keepdim=True)).mul_(
                math.sqrt(num_classes / (num_classes - 1))
            )
            factors = PolarFactors(
                saved[0], ctx.form, tuple(saved), ctx.guarded, ctx.bound, ctx.schedule
            )
            grad_unit = polar_factors_backward(factors, grad_frame, center=True)  # dL/dY
            radial = (grad_unit * unit_average).sum()
            grad_batch = (grad_unit - radial * unit_average) * (mix / average_norm)  # (d, K)
            grad_mean = grad_mean + grad_batch.sum(dim=1)
            grad_sums = grad_batch.transpose(0, 1) * inverse_counts.unsqueeze(1)
            grad_sums = grad_sums - grad_mean * inverse_total  # every sample's share of dmu
        else:
            grad_sums = (grad_mean * -inverse_total).expand(inverse_counts.shape[0], -1)
        (grad_sums,) = all_reduce_sums(grad_sums)
        grad_h = _scaled_sample_gradient(grad_logits, weight, grad_sums.to(h.dtype), scatter, scale)
        # h = scale f with scale = tau / ||f||: the radial part of dh does not reach f. (Rows
        # with 0 < ||f|| < eps, whose clamped norm has no gradient, would need a mask: such
        # rows do not occur in training, and an all-zero row has h = 0, so it gets scale dh.)
        radial = torch.linalg.vecdot(grad_h, h).unsqueeze(1) / ctx.temperature**2
        grad_features = grad_h.addcmul_(radial, h, value=-1.0)
        if grad_features.dtype != ctx.input_dtype:
            grad_features = grad_features.to(ctx.input_dtype)
        return (grad_features, *([None] * (16 + len(saved))))


#: Up to this K the backward forms ``scale_i (W^T Gz_i + dS_{y_i})`` as one product with a
#: one-hot matrix (the (B, d) gradient written once); above it the one-hot product's 4BKd flops
#: cost more than the two extra passes over (B, d) of gathering the rows (UFM-200, K = 200:
#: 130 against 151 ms a step).
ONE_HOT_BACKWARD_MAX_CLASSES = 32


def _scaled_sample_gradient(
    grad_logits: torch.Tensor,
    weight: torch.Tensor,
    grad_sums: torch.Tensor,
    scatter: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """``scale_i (W^T Gz_i + dS_{y_i})`` for every sample: (B, d), zero class rows for
    out-of-range labels. ``scatter`` is :class:`ClassStatistics`' (the class index with K for
    out-of-range labels, or the one-hot matrix).

    Shape: grad_logits (B, K), weight and grad_sums (K, d), scale (B, 1) -> (B, d)."""
    num_classes = weight.shape[0]
    if scatter.dim() == 1 and num_classes > ONE_HOT_BACKWARD_MAX_CLASSES:
        rows = F.pad(grad_sums, (0, 0, 0, 1)).index_select(0, scatter)
        return torch.addmm(rows, grad_logits, weight).mul_(scale)
    if scatter.dim() == 1:
        scatter = F.one_hot(scatter, num_classes + 1)[:, :num_classes]
    onehot = scatter.to(grad_logits.dtype)
    # One product of the row-scaled [Gz | one-hot] (B, 2K) with [W; dS] (2K, d).
    return (torch.cat([grad_logits, onehot], dim=1) * scale) @ torch.cat([weight, grad_sums])


class ImplicitETFHead(_CentredETFHead):
    """The paper's implicit ETF head: W = the nearest simplex ETF of the class means, every step.

    Training step t = 1, 2, ... (method.md sections 2, 3, 5), with h = tau f/||f||:

    1. class means mu_k and global mean mu_G of the batch (summed over ranks), centred
       class means ``Ybar_batch = [mu_k - mu_G]`` (d x K; column 0 for absent classes);
    2. ``alpha_t = max(2/(t+1), alpha_floor)``; for classes present in the batch
       ``Ybar_t = alpha_t Ybar_batch + (1 - alpha_t) Ybar_{t-1}.detach()``; absent classes keep
       their previous column (0 if never seen);
    3. ``Y = Ybar_t / ||Ybar_t||_F``; ``P = nearest_etf(Y, prox=P_{t-1}, delta)`` (first step:
       ``P_0 = eye(d, K)``, the ``prox=None`` rule, which is what ``frame`` holds at t = 0);
    4. ``W = sqrt(K/(K-1)) M P^T``, ``b = -W mu_G``, logits ``W h + b``.

    Gradient flows through the logits, through b (via mu_G) and, with ``ddn_grad=True``, through
    the nearest-ETF layer into the current batch's class means. ``ddn_grad=False`` is the paper's
    forward-only variant: P is computed from ``Y.detach()``.

    Evaluation mode uses the last W and ``b = -W running_mean``, where ``running_mean`` tracks the
    training batches' global means (see :class:`FixedETFHead`). Before any training step W is the
    canonical simplex ETF and the running mean is 0.

    The step reads nothing on the host in deferred mode with ``solver="newton-schulz"`` (the
    default on accelerators): the statistics, the smoothing factor, the solve, its convergence
    flag and the commit are device tensors (docs/heads.md, "Sync-free step"). The previous frame
    is never re-validated (it is this head's own output); a frame loaded from a ``state_dict`` is
    checked once, with the tolerance of the dtype it was saved in.

    Args:
        num_features: d >= K.
        num_classes: K >= 2.
        temperature: tau > 0.
        delta: proximal coefficient >= 0 (paper eq. 7).
        ddn_grad: differentiate through the nearest-ETF layer (the "DDN gradient").
        alpha_floor: floor of the smoothing factor alpha_t, in (0, 1].
        running_mean_momentum: momentum of the running mean (None = cumulative average).
        solver: ``"auto"`` (Gram route on the CPU, Newton-Schulz on accelerators), ``"gram"``,
            ``"svd"``, ``"newton-schulz"`` or ``"trust-regions"`` (pymanopt; not compilable), see
            :func:`guided_nc.etf.nearest_etf`.
        device, dtype: of the buffers (float32 or float64).
        compute_dtype: dtype of the statistics and the solve: float64 (default) or float32 for
            devices with slow float64 (docs/etf.md, "compute_dtype").
        validation: ``"auto"``, ``"strict"`` or ``"deferred"`` (module docstring).

    State (persistent buffers): ``weight`` (K, d) last classifier, ``frame`` (d, K) last P,
    ``class_mean_average`` (d, K) Ybar_t, ``classes_seen`` (K,) bool, ``running_mean`` (d,),
    ``num_steps`` () long.

    Shape: features (B, d) float, labels (B,) int in [0, K) -> logits (B, K) in the features'
    dtype. ``labels`` is required in training mode.
    """

    frame: torch.Tensor
    class_mean_average: torch.Tensor
    classes_seen: torch.Tensor

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        temperature: float = 5.0,
        delta: float = 1e-3,
        ddn_grad: bool = True,
        alpha_floor: float = DEFAULT_ALPHA_FLOOR,
        running_mean_momentum: float | None = 0.1,
        solver: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        compute_dtype: torch.dtype = COMPUTE_DTYPE,
        validation: str = "auto",
    ) -> None:
        super().__init__(
            num_features,
            num_classes,
            temperature,
            running_mean_momentum,
            compute_dtype,
            validation,
            device,
        )
        delta = check_delta(delta)
        alpha_floor = check_number(
            "alpha_floor",
            alpha_floor,
            minimum=0,
            exclusive_minimum=True,
            maximum=1,
            hint="the default is 1e-4",
        )
        check_solver(solver)
        if solver == "newton-schulz" and delta == 0:
            raise ValueError(
                "solver='newton-schulz' needs delta > 0 (its step count comes from s_min(A) ~ "
                "delta); use solver='gram' or 'svd' for delta=0"
            )
        self.delta = float(delta)
        self.ddn_grad = bool(ddn_grad)
        self.alpha_floor = alpha_floor
        self.solver = solver
        dtype = _check_state_dtype(dtype, "implicit ETF head")
        factory = {"device": device, "dtype": dtype}
        d, k = num_features, num_classes
        self.register_buffer("weight", torch.empty(k, d, **factory))
        self.register_buffer("frame", torch.empty(d, k, **factory))
        self.register_buffer("class_mean_average", torch.empty(d, k, **factory))
        self.register_buffer("classes_seen", torch.empty(k, dtype=torch.bool, device=device))
        self.register_buffer("running_mean", torch.empty(d, **factory))
        self.register_buffer("num_steps", torch.empty((), dtype=torch.long, device=device))
        self.reset_state()

    def reset_state(self) -> None:
        """Forget all training statistics: W = canonical simplex ETF, averages 0, step 0."""
        d, k = self.num_features, self.num_classes
        canonical = torch.eye(d, k, dtype=COMPUTE_DTYPE)
        with torch.no_grad():
            self.frame.copy_(canonical)
            self.weight.copy_(etf_classifier(canonical))
            self.class_mean_average.zero_()
            self.classes_seen.zero_()
            self.running_mean.zero_()
            self.num_steps.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Validate a loaded frame once, with the tolerance of the dtype it was *saved* in (a
        # float32 checkpoint loaded into a float64 head is float32-accurate, and fine as the
        # proximal anchor); it is never re-validated per step. Not re-orthonormalised: it only
        # enters A = c Y M + delta P_prev, where a 1e-7 defect moves P by ~delta * 1e-7.
        frame = state_dict.get(prefix + "frame")
        if isinstance(frame, torch.Tensor):
            check_stiefel(
                frame, f"{prefix}frame in the state_dict", self.num_features, self.num_classes
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, K). Training mode needs ``labels`` and advances the state by one step."""
        check_batch_features(features, self.num_features)
        check_labels(labels, features.shape[0], required=self.training)
        self._check_state()
        if not self.training:
            return self._eval_logits(features, *_normalized(features, self.temperature)[:2])
        if labels.device != features.device:
            labels = labels.to(features.device)
        return self._training_step(features, labels)

    def _training_step(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One step of the method (docs/heads.md), its sections in order; no autograd until the
        logits, whose one backward (:class:`_ImplicitETFLogits`) differentiates them all."""
        compute = self.compute_dtype
        strict = self.strict(features.device)
        with torch.no_grad():
            # 1. Class statistics of the batch, summed over ranks; a bad batch is refused here.
            h, norms, scale = _normalized(features, self.temperature)
            stats = class_statistics(h, norms, labels, self.num_classes, compute)
            ok = self._screen(stats.flags, strict)
            total = stats.counts.sum()
            inverse_total = total.clamp_min(1.0).reciprocal()
            inverse_counts = stats.counts.clamp_min(1.0).reciprocal()
            mean = stats.sums.sum(dim=0) * inverse_total  # mu_G (d,)
            present = stats.counts.clamp_max(1.0)  # 1 for the classes in the batch, else 0
            # Ybar_batch^T (K, d): mu_k - mu_G for the classes present, 0 for the others.
            batch_centred = torch.addr(
                stats.sums * inverse_counts.unsqueeze(1), present, mean, alpha=-1
            )

            # 2. Moving average: Ybar_t = Ybar_{t-1} + alpha_t (Ybar_batch - Ybar_{t-1}) for the
            # classes present, with alpha_t = max(2/(t+1), floor) and t = num_steps + 1.
            # Strict mode reads the step count (a host read, as its value checks do); deferred
            # mode and torch.compile keep it on the device.
            steps_done = int(self.num_steps) if strict else self.num_steps
            mix = present * smoothing_factor(steps_done, self.alpha_floor, compute)  # (K,)
            average = torch.lerp(
                self.class_mean_average.to(compute), batch_centred.transpose(0, 1), mix
            )
            # Y = Ybar_t / ||Ybar_t||_F; a zero average (one class so far) stays 0: P = prox.
            average_norm = torch.linalg.matrix_norm(average)
            average_norm = average_norm + (average_norm == 0)
            unit_average = average / average_norm
            if ok is not None:  # a rejected batch's NaN must not reach the solver
                unit_average = torch.where(ok, unit_average, 0.0)

            # 3. The nearest simplex ETF, P = polar(Y M + (delta/c) P_prev), and W, b.
            factors = solve_nearest_etf(
                unit_average,
                self.frame,
                self.delta,
                resolve_solver(self.solver, features.device, self.delta, compute),
                compute_dtype=compute,
                result_dtype=self.frame.dtype,  # the Gram route's accuracy target
                feature_norm=1.0,  # ||Y||_F <= 1: Newton-Schulz needs no read of it
                strict=strict,
                finite=True,  # Y is unit-norm (or 0) and P_prev orthonormal
            )
            if factors.converged is not None:
                ok = factors.converged if ok is None else ok & factors.converged
            weight = etf_classifier(factors.frame)  # (K, d) in the compute dtype

        # 4. Logits W h - W mu_G, differentiable through every section above.
        logits = _ImplicitETFLogits.apply(
            features,
            self.temperature,
            self.ddn_grad,
            factors.form,
            factors.guarded,
            factors.bound,
            factors.schedule,
            h,
            weight,
            mean,
            scale,
            unit_average,
            average_norm,
            mix if self.ddn_grad else mix.new_zeros(()),
            inverse_counts,
            inverse_total,
            stats.scatter,
            *factors.saved,
        )

        # 5. Commit the state (deferred: only if the batch was clean and the solve converged).
        with torch.no_grad():
            self._commit(
                ok,
                {
                    "running_mean": self._running_mean_update(mean, steps_done),
                    "class_mean_average": average,
                    "frame": factors.frame,
                    "weight": weight,
                    "classes_seen": torch.logical_or(self.classes_seen, stats.counts),
                    "num_steps": self.num_steps + 1,
                },
            )
            if ok is not None:
                self._count(_reasons(stats.flags, factors.converged))
        return logits if logits.dtype == features.dtype else logits.to(features.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_features={self.num_features}, num_classes={self.num_classes}, "
            f"temperature={self.temperature}, delta={self.delta}, ddn_grad={self.ddn_grad}, "
            f"alpha_floor={self.alpha_floor}, "
            f"running_mean_momentum={self.running_mean_momentum}, solver={self.solver!r}, "
            f"compute_dtype={self.compute_dtype}, validation={self.validation!r}"
        )


HEADS = dict(zip(HEAD_NAMES, (LearnableHead, FixedETFHead, ImplicitETFHead), strict=True))


def build_head(
    method: str,
    num_features: int,
    num_classes: int,
    settings: HeadSettings | None = None,
    *,
    generator: torch.Generator | None = None,
    **options,
) -> nn.Module:
    """Build a head by method name (:data:`guided_nc.methods.METHOD_VARIANTS`): the one builder.

    ``"standard"``, ``"fixed"`` and ``"implicit"`` are the three heads; ``"fixed-haar"`` and
    ``"implicit-no-ddn"`` are the fixed head with a Haar rotation and the implicit head without
    the DDN gradient.

    Args:
        method: the method's name.
        num_features, num_classes: d and K (the ETF heads need d >= K).
        settings: a :class:`guided_nc.settings.HeadSettings` (a run configuration's head
            fields); default: its defaults. A field the head does not have is ignored by it.
        generator: draws the fixed head's Haar rotation (ignored by the other heads).
        **options: :class:`~guided_nc.settings.HeadSettings` fields by name (``temperature``,
            ``delta``, ``solver``, ``compute_dtype``, ``validation``, ...; they replace those of
            ``settings``), or other constructor keywords of the head (``device``, ``dtype``,
            ``bias``, ``rotation=tensor``). An option that contradicts the method's own (e.g.
            ``build_head("implicit-no-ddn", ddn_grad=True)``) is an error, not an override.

    Returns:
        the head, an ``nn.Module`` mapping features (B, d) and labels (B,) to logits (B, K).
    """
    if method not in METHOD_VARIANTS:
        raise ValueError(
            f"method={method!r} is not a head; use one of {list(METHOD_VARIANTS)} "
            f"('standard' = learnable, 'fixed' = fixed ETF, 'implicit' = nearest ETF)"
        )
    variant = METHOD_VARIANTS[method]
    for name, value in variant.options:
        given = options.get(name, value)
        if not isinstance(given, type(value)) or given != value:
            raise ValueError(
                f"{name}={given!r} conflicts with method={method!r}, which fixes {name}={value!r}; "
                f"drop {name}= or use method={variant.head!r}"
            )
    named = {item.name for item in dataclasses.fields(HeadSettings)}
    if isinstance(options.get("rotation"), torch.Tensor):
        named = named - {"rotation"}  # a given frame is a constructor option, not a setting
    chosen = {key: options.pop(key) for key in list(options) if key in named}
    settings = dataclasses.replace(settings or HeadSettings(), **chosen).for_method(method)
    head_class = HEADS[variant.head]
    arguments = {**settings.head_options(head_class), **options}
    if generator is not None and "generator" in inspect.signature(head_class.__init__).parameters:
        arguments["generator"] = generator
    return head_class(num_features, num_classes, **arguments)


def renormalize_heads_(module: nn.Module) -> int:
    """Call :meth:`LearnableHead.renormalize_` on every learnable head inside ``module``.

    Meant for the training loop, right after ``optimizer.step()``. Returns how many heads were
    renormalised (0 for models with ETF heads, which need nothing).
    """
    count = 0
    for child in module.modules():
        if isinstance(child, LearnableHead):
            child.renormalize_()
            count += 1
    return count
