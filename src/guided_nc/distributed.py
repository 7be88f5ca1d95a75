"""The only module that talks to :mod:`torch.distributed`.

Heads, metrics and training call these helpers, so a single process (no process group) and a
``torchrun`` job run the same code. Tests can monkeypatch :func:`all_reduce_sum`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_sum",
    "all_reduce_sum_with_grad",
    "all_reduce_sums",
    "backend",
    "barrier",
    "destroy_process_group",
    "init_from_environment",
    "is_distributed",
    "is_main_process",
    "rank",
    "world_size",
]


def is_distributed() -> bool:
    """True when a default process group is initialised (e.g. under ``torchrun``)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group (0 without a group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the default group (1 without a group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0: the only rank that logs, writes checkpoints and writes reports."""
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place, and return it.

    A no-op without a process group. The tensor keeps its dtype and device; with the gloo
    backend a CUDA tensor is not supported, so callers reduce CPU or NCCL-compatible tensors.
    Autograd does not flow through the reduction: callers reduce detached statistics or use
    :func:`all_reduce_sum_with_grad`.
    """
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_sums(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Sum several tensors of one dtype over all ranks with one collective; returns new tensors
    of the same shapes (the inputs themselves, untouched, without a process group)."""
    if not is_distributed():
        return tensors
    flat = torch.cat([tensor.reshape(-1) for tensor in tensors])  # a copy: inputs untouched
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    sizes = [tensor.numel() for tensor in tensors]
    pieces = flat.split(sizes)
    return tuple(piece.view_as(tensor) for piece, tensor in zip(pieces, tensors, strict=True))


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce: forward sums over ranks; backward sums the incoming gradients.

    Every rank computes the same loss function of the reduced tensor, and DDP averages parameter
    gradients over ranks, so the gradient of the *global* objective w.r.t. this rank's input is
    the sum over ranks of each rank's upstream gradient (each rank's loss is its own shard's mean).
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Out-of-place sum over ranks that autograd can differentiate (identity without a group)."""
    if not is_distributed():
        return tensor
    return _AllReduceSum.apply(tensor)


def barrier() -> None:
    """Wait for every rank (no-op without a group)."""
    if is_distributed():
        dist.barrier()


def backend() -> str | None:
    """The default group's backend (``"nccl"``, ``"gloo"``), or None without a group."""
    return str(dist.get_backend()) if is_distributed() else None


def init_from_environment(device_type: str = "cpu") -> bool:
    """Join the process group described by torchrun's environment.

    Under torchrun (``TORCHELASTIC_RUN_ID`` set), even with one process, so that a
    ``--nproc_per_node=1`` run exercises the distributed path; otherwise when ``WORLD_SIZE > 1``.
    Uses NCCL for CUDA and gloo for CPU, reads ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/
    ``WORLD_SIZE`` from the environment (``init_method="env://"``). Returns True when this call
    created the group; False when running single-process or a group already exists (tests).
    """
    import os

    launched = "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if is_distributed() or not launched:
        return False
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return True


def destroy_process_group() -> None:
    """Leave the default process group (no-op without one)."""
    if is_distributed():
        dist.destroy_process_group()
