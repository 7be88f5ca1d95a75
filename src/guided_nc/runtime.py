"""Where and how a run executes: device choice, seeding, synchronisation and peak memory.

Used by every command that runs something (training, UFM experiments, benchmarks), so that the
same flag means the same device and the same seed means the same numbers everywhere.
"""

from __future__ import annotations

import os
import random
import resource
import sys

import numpy as np
import torch

__all__ = ["DEVICES", "peak_memory_mb", "resolve_device", "seed_everything", "synchronize"]

#: Values of the ``device`` option.
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (CUDA if available, else CPU), ``"cpu"`` or ``"cuda"``.

    Under torchrun each process takes the GPU of its ``LOCAL_RANK``.

    Raises:
        ValueError: an unknown name, or ``"cuda"`` without CUDA.
    """
    if name not in DEVICES:
        raise ValueError(f"device={name!r} is not one of {list(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available; use --device cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed the global generators: Python's ``random``, numpy's legacy one and torch's.

    Model initialisation and third-party code draw from them; the samplers and the in-memory
    augmentation own seeded generators of their own.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (third-party code may use it)
    torch.manual_seed(seed)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU. Only for timing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: CUDA max allocated on a GPU, else the process's max resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux and bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
