"""Run a function in 2 CPU processes on the gloo backend and collect what each rank returns.

Used by every distributed test: ``run_distributed(worker, world_size=2, args=(...))`` calls
``worker(rank, world_size, *args)`` in each process after ``init_process_group("gloo")`` with one
thread per process (two torch processes with default threads slow each other down badly on a
2-core machine). Each worker's return value (tensors, numbers, dicts/lists of them) comes back in a
list indexed by rank. The worker must be a module-level function so that ``spawn`` can pickle it.
"""

from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, worker, args) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = worker(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(worker, world_size: int = 2, args: tuple = ()) -> list:
    """Run ``worker(rank, world_size, *args)`` on ``world_size`` gloo processes; return results."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(
            _entry,
            args=(world_size, free_port(), out_dir, worker, args),
            nprocs=world_size,
            join=True,
        )
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True)
            for r in range(world_size)
        ]
