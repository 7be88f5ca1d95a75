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
rank builds the same W and b. Decisions and the exact update rules are in ``docs/heads.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from guided_nc._checks import (
    COMPUTE_DTYPE,
    check_batch_features,
    check_delta,
    check_head_sizes,
    check_labels,
    check_positive,
)
from guided_nc.distributed import all_reduce_sum_with_grad
from guided_nc.etf import check_solver, etf_classifier, nearest_etf, simplex_etf
from guided_nc.methods import HEAD_NAMES, METHOD_VARIANTS

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


def normalize_features(features: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample normalisation ``h = tau * f / ||f||_2`` (method.md section 1).

    Uses :func:`torch.nn.functional.normalize` (eps 1e-12), so an all-zero feature maps to 0.

    Shape: features (B, d) -> (B, d), same dtype and device; differentiable.
    """
    return temperature * F.normalize(features, dim=-1)


def _value_errors(
    features: torch.Tensor, labels: torch.Tensor | None, num_classes: int
) -> torch.Tensor:
    """A float64 2-vector [features non-finite?, labels out of range?] (0/1), without a sync."""
    bad_features = (~torch.isfinite(features)).any()
    if labels is None:
        bad_labels = torch.zeros((), dtype=torch.bool, device=features.device)
    else:
        bad_labels = ((labels < 0) | (labels >= num_classes)).any()
    return torch.stack([bad_features, bad_labels.to(features.device)]).to(COMPUTE_DTYPE)


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


class _Head(nn.Module):
    """What every head shares: the feature normalisation it applies to its input."""

    temperature: float

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        """The features this head classifies: ``tau f / ||f||`` (B, d), differentiable.

        Metrics and evaluation take their features from here, so that they see exactly what
        the head sees.
        """
        return normalize_features(features, self.temperature)


class LearnableHead(_Head):
    """Standard head: a learnable linear classifier with unit-norm rows (method.md section 1).

    ``logits = W h (+ b)`` with ``h = tau f / ||f||``. The rows of W are renormalised to unit norm
    at initialisation and whenever :meth:`renormalize_` is called; **the training loop must call
    ``head.renormalize_()`` (or :func:`renormalize_heads_` on the model) after every optimiser
    step**, and after any re-initialisation such as :func:`guided_nc.optim.orthogonal_init_`.

    Args:
        num_features: d, the backbone's feature width.
        num_classes: K >= 2.
        temperature: tau > 0, the norm of every normalised feature.
        bias: add a learnable bias (zero-initialised). Off by default, as in the paper.
        device, dtype: of the parameters.

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
    ) -> None:
        super().__init__()
        check_head_sizes(num_features, num_classes, needs_stiefel=False)
        self.num_features = num_features
        self.num_classes = num_classes
        self.temperature = check_positive("temperature", temperature)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_classes, num_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_classes, **factory)) if bias else None
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
        h = self.normalize(features)
        return F.linear(h, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"num_features={self.num_features}, num_classes={self.num_classes}, "
            f"temperature={self.temperature}, bias={self.bias is not None}"
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
    ) -> None:
        super().__init__()
        check_head_sizes(num_features, num_classes, needs_stiefel=True)
        if running_mean_momentum is not None:
            momentum = check_positive("running_mean_momentum", running_mean_momentum)
            if momentum > 1:
                raise ValueError(
                    f"running_mean_momentum={running_mean_momentum} must lie in (0, 1] (0.1 is "
                    f"batch norm's default) or be None for a cumulative average"
                )
        self.num_features = num_features
        self.num_classes = num_classes
        self.temperature = check_positive("temperature", temperature)
        self.running_mean_momentum = running_mean_momentum

    @property
    def bias(self) -> torch.Tensor:
        """The evaluation bias ``b = -W running_mean`` (K,), detached (like nn.Linear.bias)."""
        return -(self.weight @ self.running_mean)

    def _running_mean_update(self, batch_mean: torch.Tensor) -> torch.Tensor:
        """The new running mean (not yet stored). The first training step copies the batch mean
        (no bias towards the zero initialisation); later steps use the momentum, or a cumulative
        average when ``running_mean_momentum`` is None (as in batch norm)."""
        old = self.running_mean.to(COMPUTE_DTYPE)
        batch_mean = batch_mean.detach()
        steps = int(self.num_steps)
        if steps == 0:
            return batch_mean
        weight = (
            1.0 / (steps + 1)
            if self.running_mean_momentum is None
            else float(self.running_mean_momentum)
        )
        return old + weight * (batch_mean - old)

    def _eval_logits(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(h.dtype)
        return F.linear(h, weight, -(weight @ self.running_mean.to(h.dtype)))


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
            from ``generator``) or a (d, K) tensor with orthonormal columns.
        generator: random generator for ``"haar"``.
        running_mean_momentum: momentum of the running mean (None = cumulative average).
        bias_gradient: whether the training bias carries gradient through the batch mean.
        device, dtype: of the buffers.

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
    ) -> None:
        super().__init__(num_features, num_classes, temperature, running_mean_momentum)
        dtype = dtype or torch.get_default_dtype()
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
        h = self.normalize(features)
        if not self.training:
            if not torch.isfinite(features).all():
                _raise_value_errors(torch.tensor([1.0, 0.0]), self.num_classes)
            return self._eval_logits(h)
        errors = _value_errors(features, labels, self.num_classes)
        h64 = h.to(COMPUTE_DTYPE)
        count = torch.full((1,), float(h.shape[0]), dtype=COMPUTE_DTYPE, device=h.device)
        # One all-reduce: [sum of h | count | error flags] (identity without a process group).
        local = torch.cat([h64.sum(dim=0), count, errors])
        total = all_reduce_sum_with_grad(local)
        _raise_value_errors(total[-2:].detach(), self.num_classes)
        d = self.num_features
        batch_mean = total[:d] / total[d].detach()
        if not self.bias_gradient:
            batch_mean = batch_mean.detach()
        weight = self.weight.to(h.dtype)
        bias = -(weight @ batch_mean.to(h.dtype))
        with torch.no_grad():
            self.running_mean.copy_(self._running_mean_update(batch_mean))
            self.num_steps += 1
        return F.linear(h, weight, bias)

    def extra_repr(self) -> str:
        return (
            f"num_features={self.num_features}, num_classes={self.num_classes}, "
            f"temperature={self.temperature}, rotation={self.rotation!r}, "
            f"running_mean_momentum={self.running_mean_momentum}, "
            f"bias_gradient={self.bias_gradient}"
        )


class ImplicitETFHead(_CentredETFHead):
    """The paper's implicit ETF head: W = the nearest simplex ETF of the class means, every step.

    Training step t = 1, 2, ... (method.md sections 2, 3, 5), with h = tau f/||f||:

    1. class means mu_k and global mean mu_G of the batch (summed over ranks), centred
       class means ``Ybar_batch = [mu_k - mu_G]`` (d x K; column 0 for absent classes);
    2. ``alpha_t = max(2/(t+1), alpha_floor)``; for classes present in the batch
       ``Ybar_t = alpha_t Ybar_batch + (1 - alpha_t) Ybar_{t-1}.detach()``; absent classes keep
       their previous column (0 if never seen);
    3. ``Y = Ybar_t / ||Ybar_t||_F``; ``P = nearest_etf(Y, prox=P_{t-1}, delta)`` (first step:
       ``prox=None``, i.e. eye(d, K));
    4. ``W = sqrt(K/(K-1)) M P^T``, ``b = -W mu_G``, logits ``W h + b``.

    Gradient flows through the logits, through b (via mu_G) and, with ``ddn_grad=True``, through
    the nearest-ETF layer into the current batch's class means. ``ddn_grad=False`` is the paper's
    forward-only variant: P is computed from ``Y.detach()``.

    Evaluation mode uses the last W and ``b = -W running_mean``, where ``running_mean`` tracks the
    training batches' global means (see :class:`FixedETFHead`). Before any training step W is the
    canonical simplex ETF and the running mean is 0.

    Statistics and the solve run in float64; the state buffers have the module's dtype.

    Args:
        num_features: d >= K.
        num_classes: K >= 2.
        temperature: tau > 0.
        delta: proximal coefficient >= 0 (paper eq. 7).
        ddn_grad: differentiate through the nearest-ETF layer (the "DDN gradient").
        alpha_floor: floor of the smoothing factor alpha_t, in (0, 1].
        running_mean_momentum: momentum of the running mean (None = cumulative average).
        solver: ``"svd"`` (closed form) or ``"trust-regions"`` (pymanopt), see
            :func:`guided_nc.etf.nearest_etf`.
        device, dtype: of the buffers.

    State (persistent buffers): ``weight`` (K, d) last classifier, ``frame`` (d, K) last P,
    ``class_mean_average`` (d, K) Ybar_t, ``classes_seen`` (K,) bool, ``running_mean`` (d,),
    ``num_steps`` () long.

    Shape: features (B, d) float, labels (B,) int in [0, K) -> logits (B, K) in the features'
    dtype. ``labels`` is required in training mode.
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        temperature: float = 5.0,
        delta: float = 1e-3,
        ddn_grad: bool = True,
        alpha_floor: float = DEFAULT_ALPHA_FLOOR,
        running_mean_momentum: float | None = 0.1,
        solver: str = "svd",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, num_classes, temperature, running_mean_momentum)
        delta = check_delta(delta)
        alpha_floor = check_positive("alpha_floor", alpha_floor)
        if alpha_floor > 1:
            raise ValueError(f"alpha_floor={alpha_floor} must lie in (0, 1] (default 1e-4)")
        check_solver(solver)
        self.delta = float(delta)
        self.ddn_grad = bool(ddn_grad)
        self.alpha_floor = alpha_floor
        self.solver = solver
        dtype = dtype or torch.get_default_dtype()
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

    def smoothing_factor(self, step: int) -> float:
        """alpha_t = max(2/(t+1), alpha_floor) for the 1-based training step t."""
        return max(2.0 / (step + 1), self.alpha_floor)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, K). Training mode needs ``labels`` and advances the state by one step."""
        check_batch_features(features, self.num_features)
        check_labels(labels, features.shape[0], required=self.training)
        h = self.normalize(features)
        if not self.training:
            if not torch.isfinite(features).all():
                _raise_value_errors(torch.tensor([1.0, 0.0]), self.num_classes)
            return self._eval_logits(h)
        return self._training_step(features, h, labels)

    def _training_step(
        self, features: torch.Tensor, h: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        d, k = self.num_features, self.num_classes
        errors = _value_errors(features, labels, k)
        labels = labels.to(h.device).clamp(0, k - 1)  # in range even for a batch we will reject
        h64 = h.to(COMPUTE_DTYPE)
        class_sums = torch.zeros(k, d, dtype=COMPUTE_DTYPE, device=h.device).index_add(
            0, labels, h64
        )
        counts = torch.bincount(labels, minlength=k).to(COMPUTE_DTYPE)
        # One all-reduce of [class sums | counts] plus a row of error flags (identity without a
        # process group); the gradient of the sums flows back to every rank's features.
        flags = torch.cat([errors, errors.new_zeros(d - 1)])
        local = torch.cat(
            [torch.cat([class_sums, counts.unsqueeze(1)], dim=1), flags.unsqueeze(0)], dim=0
        )
        total = all_reduce_sum_with_grad(local)
        _raise_value_errors(total[k, :2].detach(), k)  # every rank raises together
        class_sums, counts = total[:k, :d], total[:k, d].detach()
        present = counts > 0
        global_mean = class_sums.sum(dim=0) / counts.sum()  # (d,)
        class_means = class_sums / counts.clamp_min(1.0).unsqueeze(1)
        batch_centred = ((class_means - global_mean) * present.unsqueeze(1)).T  # Ybar_batch (d, K)

        step = int(self.num_steps) + 1
        alpha = self.smoothing_factor(step)
        previous = self.class_mean_average.to(COMPUTE_DTYPE)  # a buffer: no gradient
        average = torch.where(present, alpha * batch_centred + (1 - alpha) * previous, previous)
        norm = torch.linalg.matrix_norm(average)
        # A zero average (e.g. one class in the first batch) stays 0: P is then the prox point.
        target = average / torch.where(norm > 0, norm, torch.ones_like(norm))
        if not self.ddn_grad:
            target = target.detach()
        prox = self.frame if step > 1 else None
        frame = nearest_etf(target, prox=prox, delta=self.delta, solver=self.solver)
        weight = etf_classifier(frame)  # (K, d) float64
        bias = -(weight @ global_mean)
        logits = F.linear(h, weight.to(h.dtype), bias.to(h.dtype))

        with torch.no_grad():  # all checks passed and the solve succeeded: commit the state
            self.running_mean.copy_(self._running_mean_update(global_mean))
            self.class_mean_average.copy_(average)
            self.frame.copy_(frame)
            self.weight.copy_(weight)
            self.classes_seen |= present
            self.num_steps += 1
        return logits

    def extra_repr(self) -> str:
        return (
            f"num_features={self.num_features}, num_classes={self.num_classes}, "
            f"temperature={self.temperature}, delta={self.delta}, ddn_grad={self.ddn_grad}, "
            f"alpha_floor={self.alpha_floor}, "
            f"running_mean_momentum={self.running_mean_momentum}, solver={self.solver!r}"
        )


HEADS = dict(zip(HEAD_NAMES, (LearnableHead, FixedETFHead, ImplicitETFHead), strict=True))


def build_head(method: str, num_features: int, num_classes: int, **kwargs) -> nn.Module:
    """Build a head by method name (:data:`guided_nc.methods.METHOD_VARIANTS`).

    ``"standard"``, ``"fixed"`` and ``"implicit"`` are the three heads; ``"fixed-haar"`` and
    ``"implicit-no-ddn"`` are the fixed head with a Haar rotation and the implicit head without
    the DDN gradient. Extra keyword arguments go to the head's constructor (e.g.
    ``temperature``, ``delta``) and override the method's own options.
    """
    if method not in METHOD_VARIANTS:
        raise ValueError(
            f"method={method!r} is not a head; use one of {list(METHOD_VARIANTS)} "
            f"('standard' = learnable, 'fixed' = fixed ETF, 'implicit' = nearest ETF)"
        )
    variant = METHOD_VARIANTS[method]
    options = {**variant.head_options(), **kwargs}
    return HEADS[variant.head](num_features, num_classes, **options)


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
