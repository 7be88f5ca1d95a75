"""Guard rails of the training steps, in one place: the heads and AGD share them.

A bad value (NaN/Inf features or gradients, labels out of range, an unconverged solve) never
changes state. How it is reported is the ``validation`` mode (:data:`VALIDATION_MODES`):

* ``"strict"`` raises at once: one host read per call;
* ``"deferred"`` commits the new state with ``torch.where`` on an on-device flag
  (:func:`committed`), adds the flags to a device counter (:func:`counted`) and raises at the
  next explicit check (:func:`drain` reads and resets the counter), so the step reads nothing on
  the host;
* ``"auto"`` is strict on the CPU and deferred elsewhere, and a graph being traced by
  ``torch.compile`` is always deferred (it cannot raise on values).

The maths (:mod:`guided_nc.etf`, the heads' step functions, :func:`guided_nc.optim.agd`) knows
nothing of these modes: it returns flags, and the modules guard with the functions here.
"""

from __future__ import annotations

import torch
from torch import nn

from guided_nc._checks import VALIDATION_MODES, check_validation

__all__ = [
    "VALIDATION_MODES",
    "check_validation",
    "committed",
    "counted",
    "drain",
    "is_strict",
    "store_buffer",
]


def is_strict(validation: str, device: torch.device) -> bool:
    """Whether a call on ``device`` raises at once (see the module docstring)."""
    if torch.compiler.is_compiling():
        return False
    if validation == "auto":
        return device.type == "cpu"
    return validation == "strict"


def committed(ok: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` where the on-device flag ``ok`` holds, else ``old``; ``new`` when ``ok`` is None
    (strict mode: the checks already passed on the host)."""
    return new if ok is None else torch.where(ok, new, old)


def counted(counter: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """``counter`` plus one for every non-zero entry of ``flags`` (same shape), on the device."""
    return counter + (flags > 0).to(counter.dtype)


def drain(counter: torch.Tensor) -> list[int]:
    """The counts (one host read), then the counter is zeroed in place; [] when all are 0.

    Zeroing before the caller raises lets a caller that catches the error go on.
    """
    counts = counter.tolist()
    if not any(counts):
        return []
    with torch.no_grad():
        counter.zero_()
    return counts


def store_buffer(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Store ``value`` in the buffer ``name`` of ``module`` (its dtype kept), under ``no_grad``.

    Eagerly this is ``copy_`` (in place, as batch norm updates its running statistics). While
    ``torch.compile`` traces, the buffer is rebound instead: AOTAutograd's partitioner may
    recompute in the backward a value read from a buffer that the forward mutates in place, and
    then reads the *updated* buffer (wrong gradients; pytorch/pytorch PR #197039, "Don't
    recompute reads of mutated inputs or mutable buffers", open for torch 2.14). Rebinding
    leaves the input unmutated (one graph, no recompilation; tested).
    """
    buffer = getattr(module, name)
    with torch.no_grad():
        if torch.compiler.is_compiling():
            setattr(module, name, value.to(buffer.dtype))
        else:
            buffer.copy_(value)
