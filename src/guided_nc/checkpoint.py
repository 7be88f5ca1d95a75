"""Atomic checkpoints and the random-number-generator state a resumed run needs.

A checkpoint is written with :func:`guided_nc.runfiles.atomic_write` (a temporary file in the same
folder, moved over the old one with :func:`os.replace`, atomic on POSIX), so a crash mid-write
leaves the previous checkpoint intact.
It is read back with ``torch.load(..., weights_only=True)``: every value stored here is a tensor,
a number, a string, ``None`` or a list/dict of those (numpy's and Python's generator states are
converted to tensors and lists for that reason).

Every checkpoint carries a SHA-256 checksum of its contents (:func:`state_checksum`: every
tensor's bytes, dtype and shape, every key and value, in order) under :data:`CHECKSUM_KEY`,
and :func:`load_checkpoint` recomputes it: a flipped byte in the tensor data (which the zip
format's CRCs do not catch when torch reads it) is refused. Checkpoints of earlier versions
have no checksum; they load with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from guided_nc.runfiles import RunFileError, atomic_write

__all__ = [
    "CHECKSUM_KEY",
    "CheckpointError",
    "capture_rng_state",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "state_checksum",
]

#: The key under which a checkpoint stores :func:`state_checksum` of the rest of it.
CHECKSUM_KEY = "sha256"

_LOGGER = logging.getLogger("guided_nc")


def _feed(digest, value: Any) -> None:
    """Add ``value`` to ``digest``: a type tag, then the bytes (tensors: dtype, shape, data)."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}:".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}:".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__[0]}{len(value)}:".encode())
        for item in value:
            _feed(digest, item)
    else:  # numbers, strings, None, bools: repr round-trips them exactly
        text = repr(value)
        digest.update(f"V{type(value).__name__}{len(text)}:{text}".encode())


def state_checksum(state: dict[str, Any]) -> str:
    """SHA-256 (hex) of a checkpoint's contents: keys, values and every tensor's bytes."""
    digest = hashlib.sha256()
    _feed(digest, state)
    return digest.hexdigest()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Save ``state`` and its :func:`state_checksum` with :func:`torch.save`, atomically (temp
    file, fsync, :func:`os.replace`, fsync of the folder).

    ``state`` must be loadable with ``weights_only=True``: tensors, numbers, strings, ``None``
    and (nested) lists, tuples and dicts of those; and must not use the key
    :data:`CHECKSUM_KEY`.
    """
    if CHECKSUM_KEY in state:
        raise ValueError(f"state has the key {CHECKSUM_KEY!r}, which the checksum uses; rename it")
    stored = {**state, CHECKSUM_KEY: state_checksum(state)}
    atomic_write(path, lambda file: torch.save(stored, file))


class CheckpointError(RunFileError):
    """A checkpoint that cannot be used: empty, truncated, corrupt (checksum), foreign, a
    directory, or missing keys."""


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    required_keys: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: one line naming the path, what is wrong (empty, truncated or corrupt,
            contents that do not match its checksum, objects that ``weights_only`` refuses, not
            a dict, a directory, missing ``required_keys``) and the fix (delete it to restart,
            or restore it).

    Returns the state without its checksum.
    """
    path = Path(path)

    def unusable(what: str) -> CheckpointError:
        return CheckpointError(
            f"cannot resume from {str(path)!r}: it {what}. Delete it to restart the run from "
            "scratch, or restore the file from a backup"
        )

    if path.is_dir():
        raise unusable("is a directory, not a file")
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} does not exist; train without --resume first"
        )
    if path.stat().st_size == 0:
        raise unusable("is empty (a write was interrupted before its first byte)")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its index is at the end
        raise unusable(
            "is truncated or corrupt (not a complete zip archive, the format torch.save writes)"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = " ".join(str(error).split())  # torch's whole refusal, on one line
        raise unusable(
            f"holds objects that weights_only loading refuses (not a guided-nc checkpoint?): "
            f"{reason}"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error)
        raise unusable(f"is truncated or corrupt ({reason})") from error
    if not isinstance(state, dict):
        raise unusable(f"is not a guided-nc checkpoint (it holds a {type(state).__name__})")
    stored = state.pop(CHECKSUM_KEY, None)
    if stored is None:
        _LOGGER.warning("%s has no checksum (written by an earlier version?): not verified", path)
    elif stored != state_checksum(state):
        raise unusable(
            "does not match the checksum stored in it: its bytes changed after it was written "
            "(a disk or copy error)"
        )
    missing = [key for key in required_keys if key not in state]
    if missing:
        raise unusable(f"is not a guided-nc training checkpoint (missing keys {missing})")
    return state


def capture_rng_state() -> dict[str, Any]:
    """The global generators' states: torch CPU, every CUDA device, numpy and Python ``random``.

    Returns a dict of tensors and lists that :func:`torch.save` stores with ``weights_only``.
    """
    numpy_kind, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()  # noqa: NPY002 (the global state is what we save)
    python_version, python_internal, python_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(numpy_kind),
            "keys": torch.from_numpy(np.asarray(numpy_keys, dtype=np.int64)),
            "pos": int(numpy_pos),
            "has_gauss": int(numpy_has_gauss),
            "cached_gaussian": float(numpy_gauss),
        },
        "python": {
            "version": int(python_version),
            "internal": list(python_internal),
            "gauss_next": python_gauss,
        },
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators captured by :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    numpy_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate(
        (python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"])
    )
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
