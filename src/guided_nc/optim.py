"""Automatic Gradient Descent (AGD, Bernstein et al. 2023) and optimiser/scheduler factories.

AGD is the optimiser of the paper (method.md section 4). It has no learning rate to tune: the
step size eta is computed from the gradient norms every step. It only knows how to scale 2-D
weights (and N-D convolution kernels), so models trained with it must have no 1-D parameters
(biases, norm-layer affine parameters).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from guided_nc._checks import check_validation

__all__ = ["AGD", "build_optimizer", "build_scheduler", "orthogonal_init_", "weight_scale"]


def weight_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """AGD's scale ``s(W) = sqrt(fan_out / fan_in)`` of a weight of shape (out, in, *kernel).

    For a kernel (more than 2 dimensions) the scale is additionally divided by
    ``sqrt(prod(kernel))`` (method.md section 4: 4-D ``/ sqrt(kh * kw)``).
    """
    fan_out, fan_in = shape[0], shape[1]
    kernel = math.prod(shape[2:])
    return math.sqrt(fan_out / fan_in) / math.sqrt(kernel)


def _slice_norms(tensor: torch.Tensor) -> torch.Tensor:
    """Frobenius norms of the (out, in) slices, one per kernel position: shape (1, 1, *kernel)."""
    return torch.linalg.vector_norm(tensor, dim=(0, 1), keepdim=True)


def _describe(index: int, name: str | None, tensor: torch.Tensor) -> str:
    label = f"parameter {name!r}" if name is not None else f"parameter #{index}"
    return f"{label} with shape {tuple(tensor.shape)}"


class AGD(torch.optim.Optimizer):
    r"""Automatic Gradient Descent for weights with at least 2 dimensions (method.md section 4).

    Pseudo-code of one :meth:`step` (L = number of tensors over all parameter groups)::

        for each tensor W_l with gradient g_l:
            s_l = sqrt(fan_out / fan_in) / sqrt(prod(kernel))       # weight_scale
            n_l = per-slice Frobenius norms of g_l[:, :, *k]        # one number for 2-D
        G   = (1/L) * sum_l s_l * sum(n_l)
        eta = log((1 + sqrt(1 + 4 G)) / 2)
        W_l <- W_l - lr * gain * (eta / L) * s_l * g_l / n_l        # per slice; 0 where n_l = 0

    The step runs under ``torch.no_grad()`` and never writes ``p.grad``. ``eta`` of the last step
    is kept in :attr:`last_eta` (0-dim tensor, None before the first step) and in the state_dict.

    A step with a non-finite gradient (NaN/Inf in some ``n_l``) is refused: **no weight changes**.
    ``validation="strict"`` raises ``ValueError`` at once, naming the parameter (one host read
    per step); ``"deferred"`` makes the update ``torch.where(ok, update, 0)`` on an on-device
    flag, counts the refusal per parameter and raises at the next :meth:`check` (also called by
    :meth:`state_dict`), so the step reads nothing on the host; ``"auto"`` (default) is strict
    when the gradients are on the CPU and deferred elsewhere (and while ``torch.compile``
    traces).

    Deviations from the release (``nc/optimisers/agd.py``), all documented in docs/heads.md:

    * ``lr`` (default 1) is a dimensionless multiplier of ``gain`` so that standard
      ``torch.optim.lr_scheduler`` schedules can scale the step; the paper uses no schedule.
    * ``gain`` is a constructor argument (hard-coded 10 in the release) and may differ per group.
    * Kernels with any number of spatial dimensions (conv1d, conv3d) are accepted, generalising
      the 4-D rule; the release supports 2-D and 4-D only.
    * A tensor without gradient contributes 0 to G and is not updated (the release would fail);
      it still counts in L, which is fixed by the parameter list, as in the release.
    * Weight decay is rejected by :func:`build_optimizer` rather than silently ignored.

    Args:
        params: tensors, ``(name, tensor)`` pairs (e.g. ``model.named_parameters()``), or
            parameter-group dicts, all with ``dim() >= 2``.
        gain: the paper's gain (10).
        lr: multiplier of the gain, for schedulers (1).
        validation: ``"auto"``, ``"strict"`` or ``"deferred"`` (above).

    Raises:
        ValueError: for a parameter with fewer than 2 dimensions, naming it; for a step with a
            non-finite gradient (strict), naming the parameter.
    """

    def __init__(
        self, params: Iterable, gain: float = 10.0, lr: float = 1.0, validation: str = "auto"
    ) -> None:
        gain = _check_number("gain", gain, positive=True)  # as build_optimizer refuses them
        lr = _check_number("lr", lr, positive=True)
        self.validation = check_validation(validation)
        self.last_eta: torch.Tensor | None = None
        self._num_checked = 0
        # Deferred refusals: steps refused and, per tensor (in parameter order), how often its
        # gradient was the non-finite one. Device tensors, read only by check().
        self._refused_steps: torch.Tensor | None = None
        self._refused_tensors: torch.Tensor | None = None
        super().__init__(params, {"gain": gain, "lr": lr})

    def add_param_group(self, param_group: dict) -> None:
        # Validate before the base class stores anything.
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for offset, item in enumerate(params):
            name, tensor = item if isinstance(item, tuple) else (None, item)
            if isinstance(tensor, torch.Tensor) and tensor.dim() < 2:
                raise ValueError(
                    f"AGD cannot optimise {_describe(self._num_checked + offset, name, tensor)}: "
                    f"it only scales weights with >= 2 dimensions (no rule for biases or "
                    f"norm-layer affine parameters). Exclude it (e.g. pass only parameters with "
                    f"p.dim() >= 2 and give the rest to another optimiser) or build the model "
                    f"without biases and with affine=False normalisation layers"
                )
        self._num_checked += len(params)
        param_group["params"] = params
        super().add_param_group(param_group)

    @property
    def num_tensors(self) -> int:
        """L, the number of tensors over all parameter groups."""
        return sum(len(group["params"]) for group in self.param_groups)

    def strict(self, device: torch.device) -> bool:
        """Whether a step whose gradients live on ``device`` raises at once (see the class)."""
        if torch.compiler.is_compiling():
            return False
        if self.validation == "auto":
            return device.type == "cpu"
        return self.validation == "strict"

    def _names(self) -> list[tuple[int, str | None, torch.Tensor]]:
        """(global index, name or None, tensor) of every parameter, in order."""
        described, index = [], 0
        for group in self.param_groups:
            names = group.get("param_names") or [None] * len(group["params"])
            for name, param in zip(names, group["params"], strict=True):
                described.append((index, name, param))
                index += 1
        return described

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        depth = self.num_tensors
        entries = []  # (param, gradient, slice norms, scale, group)
        indices, flags = [], []  # which tensors have gradients, and whether those are finite
        total = None
        positions = ((group, param) for group in self.param_groups for param in group["params"])
        for index, (group, param) in enumerate(positions):
            if param.grad is None:
                continue
            grad = param.grad
            norms = _slice_norms(grad)  # NaN/Inf anywhere in the gradient make these non-finite
            scale = weight_scale(param.shape)
            contribution = scale * norms.sum()
            total = contribution if total is None else total + contribution.to(total.device)
            entries.append((param, grad, norms, scale, group))
            indices.append(index)
            flags.append(~torch.isfinite(norms).all())
        if total is None:
            return loss
        bad = torch.stack([flag.to(total.device) for flag in flags])
        ok = None
        if self.strict(total.device):
            if bool(bad.any()):  # one host read; nothing has changed yet
                self._raise_refused(bad.tolist(), indices)
        else:
            ok = ~bad.any()
            # One flag per tensor (False where there is no gradient), built on the device: no
            # host-to-device copy of the index list.
            unflagged = torch.zeros((), dtype=torch.bool, device=total.device)
            slots = dict(zip(indices, bad.unbind(), strict=True))
            bad = torch.stack([slots.get(index, unflagged) for index in range(depth)])
        gradient_summary = total / depth  # G
        eta = torch.log((1 + torch.sqrt(1 + 4 * gradient_summary)) / 2)
        for param, grad, norms, scale, group in entries:
            direction = torch.where(norms > 0, grad / norms, torch.zeros_like(grad))
            step_size = group["lr"] * group["gain"] * scale / depth
            update = direction * (step_size * eta.to(param.device, param.dtype))
            if ok is not None:  # a refused step moves no weight (NaN * 0 would still be NaN)
                update = torch.where(ok.to(param.device), update, torch.zeros_like(update))
            param.sub_(update)
        if ok is None:
            self.last_eta = eta.detach()
        else:
            previous = (
                self.last_eta if self.last_eta is not None else torch.full_like(eta, math.nan)
            )
            self.last_eta = torch.where(ok, eta, previous.to(eta.device)).detach()
            self._count_refused(ok, bad)
        return loss

    def _count_refused(self, ok: torch.Tensor, bad: torch.Tensor) -> None:
        """Add a refused step (``~ok``) and its per-tensor flags ``bad`` (L,) to the counters."""
        if self._refused_steps is None or self._refused_steps.device != ok.device:
            self._refused_steps = torch.zeros((), dtype=torch.long, device=ok.device)
            self._refused_tensors = torch.zeros_like(bad, dtype=torch.long)
        self._refused_steps += (~ok).long()
        self._refused_tensors += bad.long()

    def _raise_refused(self, bad: list, indices: list[int], steps: int = 1) -> None:
        described = {index: (name, param) for index, name, param in self._names()}
        culprits = [
            _describe(index, *described[index])
            for index, flag in zip(indices, bad, strict=True)
            if flag
        ]
        raise ValueError(
            f"AGD refused {steps} step(s): the gradient of {', '.join(culprits)} is not finite "
            f"(NaN or Inf); no weight was changed by it. Check the loss and the features (e.g. "
            f"lower the gain or learning rate), or skip such batches"
        )

    def check(self) -> None:
        """Raise ``ValueError`` if steps were refused since the last check (deferred mode).

        One host read; the counters are reset before raising. :meth:`state_dict` calls it.
        """
        if self._refused_steps is None:
            return
        steps = int(self._refused_steps)
        if not steps:
            return
        counts = self._refused_tensors.tolist()
        self._refused_steps.zero_()
        self._refused_tensors.zero_()
        indices = list(range(len(counts)))
        self._raise_refused([count > 0 for count in counts], indices, steps)

    def state_dict(self) -> dict:
        self.check()  # a checkpoint is a host read: report deferred refusals first
        state = super().state_dict()
        state["last_eta"] = None if self.last_eta is None else self.last_eta.clone()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        last_eta = state_dict.pop("last_eta", None)
        super().load_state_dict(state_dict)
        self.last_eta = None if last_eta is None else last_eta.clone()


@torch.no_grad()
def orthogonal_init_(
    tensors: nn.Module | torch.Tensor | Iterable[torch.Tensor],
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """AGD's initialisation, in place: orthogonal (per kernel slice) times ``s(W)``.

    A 2-D weight becomes a (semi-)orthogonal matrix times ``sqrt(fan_out/fan_in)``; an N-D kernel
    gets an independent orthogonal (out, in) matrix at every kernel position, times
    :func:`weight_scale`. Orthogonal matrices come from :func:`torch.nn.init.orthogonal_`
    (QR of a Gaussian) drawn in float64 on the CPU from ``generator``, so a seeded generator
    reproduces them on every device.

    Args:
        tensors: a module (all its parameters with ``dim() >= 2``; 1-D ones are left alone), one
            tensor, or an iterable of tensors (each must have ``dim() >= 2``).
        generator: random generator (None = the global one).

    Returns the list of initialised tensors. Re-normalise learnable heads afterwards
    (:func:`guided_nc.heads.renormalize_heads_`).
    """
    if isinstance(tensors, nn.Module):
        targets = [p for p in tensors.parameters() if p.dim() >= 2]
    else:
        targets = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        for index, tensor in enumerate(targets):
            if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor)
                raise ValueError(
                    f"orthogonal_init_ got tensor #{index} with shape {shape}; only tensors with "
                    f">= 2 dimensions can be initialised (pass a module to skip 1-D ones)"
                )
    for tensor in targets:
        scale = weight_scale(tensor.shape)
        slice_shape = tuple(tensor.shape[:2])
        for position in _kernel_positions(tensor.shape[2:]):
            # Drawn in float64 on the CPU so that a seed gives the same weights on every device.
            matrix = torch.empty(slice_shape, dtype=torch.float64)
            nn.init.orthogonal_(matrix, generator=generator)
            tensor[(slice(None), slice(None), *position)] = (scale * matrix).to(tensor)
    return targets


def _kernel_positions(kernel: tuple[int, ...]) -> list[tuple[int, ...]]:
    positions: list[tuple[int, ...]] = [()]
    for size in kernel:
        positions = [(*position, i) for position in positions for i in range(size)]
    return positions


def _check_number(name: str, value: float, *, positive: bool) -> float:
    """A finite number, > 0 (``positive``) or >= 0; the error names the argument and the fix."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(
            f"{name}={value} must be a finite number {bound}; pass e.g. the default "
            f"(build_optimizer(name, params) without {name})"
        )
    return float(value)


OPTIMIZERS = ("agd", "sgd", "adam", "adamw")
DEFAULT_LR = {"agd": 1.0, "sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}
DEFAULT_WEIGHT_DECAY = {"agd": 0.0, "sgd": 0.0, "adam": 0.0, "adamw": 0.01}


def build_optimizer(
    name: str,
    params: Iterable,
    lr: float | None = None,
    weight_decay: float | None = None,
    momentum: float = 0.9,
    gain: float = 10.0,
) -> torch.optim.Optimizer:
    """Build ``"agd"``, ``"sgd"``, ``"adam"`` or ``"adamw"``.

    Args:
        name: optimiser name (lower case).
        params: tensors, (name, tensor) pairs or parameter groups.
        lr: learning rate; None = default (agd 1.0 = gain multiplier, sgd 0.05, adam/adamw 1e-3).
        weight_decay: None = default (0; adamw 0.01). AGD rejects a non-zero value.
        momentum: SGD momentum.
        gain: AGD gain (paper: 10).

    Raises:
        ValueError: unknown name; lr or gain not finite or <= 0; momentum or weight_decay not
            finite or < 0 (each error names the argument). TypeError: a non-number.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer name={name!r} is not supported; use one of {OPTIMIZERS}")
    lr = _check_number("lr", DEFAULT_LR[name] if lr is None else lr, positive=True)
    weight_decay = DEFAULT_WEIGHT_DECAY[name] if weight_decay is None else weight_decay
    weight_decay = _check_number("weight_decay", weight_decay, positive=False)
    momentum = _check_number("momentum", momentum, positive=False)
    gain = _check_number("gain", gain, positive=True)
    if name == "agd":
        if weight_decay != 0:
            raise ValueError(
                f"weight_decay={weight_decay} is not supported by AGD (it has no weight decay "
                f"rule); use weight_decay=0 or another optimiser"
            )
        return AGD(params, gain=gain, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


SCHEDULES = ("none", "cosine", "step")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str = "none",
    total_steps: int | None = None,
    step_size: int | None = None,
    gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Build a per-step learning-rate schedule (call ``scheduler.step()`` after each step).

    * ``"none"``: constant (a ``ConstantLR`` with factor 1, so loops can call it uniformly);
    * ``"cosine"``: ``CosineAnnealingLR(T_max=total_steps)`` down to 0;
    * ``"step"``: ``StepLR(step_size, gamma)``.

    For :class:`AGD` the schedule scales the gain (through the group's ``lr`` multiplier).
    """
    if name not in SCHEDULES:
        raise ValueError(f"scheduler name={name!r} is not supported; use one of {SCHEDULES}")
    schedulers = torch.optim.lr_scheduler
    if name == "none":
        return schedulers.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if name == "cosine":
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(
                f"total_steps={total_steps!r} must be a positive int for the cosine schedule "
                f"(epochs x batches per epoch)"
            )
        return schedulers.CosineAnnealingLR(optimizer, T_max=total_steps)
    if not isinstance(step_size, int) or step_size < 1:
        raise ValueError(f"step_size={step_size!r} must be a positive int for the step schedule")
    if not math.isfinite(gamma) or not 0 < gamma <= 1:
        raise ValueError(f"gamma={gamma} must lie in (0, 1] for the step schedule")
    return schedulers.StepLR(optimizer, step_size=step_size, gamma=gamma)
