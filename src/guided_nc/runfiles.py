"""Run files: the one atomic writer, CSV/JSON helpers, the environment record and run folders.

Runs write files and reports only read them (DomainBed's pattern), so everything that crosses
that line lives here:

* **Atomic writes.** :func:`atomic_write` writes to a temporary file in the target's folder, then
  ``os.replace`` moves it over the target (atomic on POSIX): a reader never sees half a file and
  a crash leaves the previous version. The file gets the permissions a plain ``open()`` would
  (``0666 & ~umask``, so 0644 under the default umask): results are readable by other users.
* **Long-format CSV** (one row per observation, empty cell = missing) and JSON (NaN -> null).
* **The run-folder contract**, shared by ``guided-nc ufm``, ``train`` and ``compare``::

      <experiment>/runs/<method>/seed<seed>/
          config.json    {"config": {...}, "environment": {...}}
          metrics.csv    the run's rows (long format)
          done           JSON, written last: config digest, wall time, finish time

  :func:`find_runs` lists the finished runs of an experiment folder. It also reads the v0.1
  UFM layout (``runs/<method>-seed<seed>/done.json``), so old experiments still report.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = [
    "DONE_NAME",
    "RunFolder",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "config_digest",
    "csv_columns",
    "environment_info",
    "find_runs",
    "mark_done",
    "read_done",
    "read_json",
    "read_long_csv",
    "run_folder",
    "save_npy",
    "write_long_csv",
]

#: Name of the marker a finished run writes last.
DONE_NAME = "done"

#: The v0.1 UFM run folders: ``runs/<method>-seed<seed>/done.json``.
_LEGACY_UFM_FOLDER = re.compile(r"^(?P<method>[a-z-]+)-seed(?P<seed>\d+)$")


# --- atomic files -----------------------------------------------------------------------------


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(binary_file)`` on a temporary file next to ``path``, then ``os.replace`` it.

    Creates missing parent folders. The file is flushed and fsynced before the rename, and gets
    mode ``0666 & ~umask`` (``mkstemp`` would leave 0600). On any exception, including
    KeyboardInterrupt, the temporary file is removed and ``path`` keeps its previous content.
    Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, path)
    except BaseException:
        # Why BaseException: a KeyboardInterrupt mid-write must not leave temp files behind.
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`). Returns the path."""
    return atomic_write(path, lambda stream: stream.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically. Returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_safe(value: Any) -> Any:
    # JSON has no NaN/Inf: store them as null, the files' convention for "missing".
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically; NaN and Inf become ``null``. Returns the path."""
    text = json.dumps(_json_safe(obj), indent=2, sort_keys=False, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Save one array as ``.npy`` (no pickle), atomically."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return atomic_write_bytes(path, buffer.getvalue())


# --- long-format CSV ------------------------------------------------------------------------


def _format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)  # repr round-trips floats exactly
    if isinstance(value, np.generic):
        return _format_cell(value.item())
    return str(value)


def write_long_csv(
    path: str | os.PathLike,
    rows: Iterable[Mapping[str, Any]],
    fieldnames: Sequence[str] | None = None,
) -> Path:
    """Write rows (dicts) as a long-format CSV atomically.

    Args:
        path: target file.
        rows: one mapping per observation. ``None`` and NaN become empty cells.
        fieldnames: column order; default: keys in order of first appearance over all rows.
            A row with a key outside ``fieldnames`` is an error (ValueError).

    Returns the path.
    """
    rows = list(rows)
    if fieldnames is None:
        fieldnames = list(dict.fromkeys(key for row in rows for key in row))
    else:
        fieldnames = list(fieldnames)
        allowed = set(fieldnames)
        for index, row in enumerate(rows):
            extra = set(row) - allowed
            if extra:
                raise ValueError(
                    f"rows[{index}] has columns {sorted(extra)} that are not in fieldnames="
                    f"{fieldnames}; add them to fieldnames or drop them from the row"
                )
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(fieldnames)
    for row in rows:
        writer.writerow([_format_cell(row.get(name)) for name in fieldnames])
    return atomic_write_text(path, buffer.getvalue())


def _parse_cell(text: str) -> Any:
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def read_long_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a long-format CSV: one dict per row; numbers parsed (int, else float), empty -> None.

    Text cells stay strings, so a column of method names reads back as written.
    """
    with open(path, newline="", encoding="utf-8") as stream:
        return [
            {key: _parse_cell(value) for key, value in row.items()}
            for row in csv.DictReader(stream)
        ]


def csv_columns(path: str | os.PathLike) -> list[str]:
    """The header of a CSV file."""
    with open(path, newline="", encoding="utf-8") as stream:
        return next(csv.reader(stream), [])


# --- the environment of a run -------------------------------------------------------------------


def environment_info() -> dict[str, Any]:
    """Versions of the interpreter and libraries a run used, and the machine (saved with it)."""
    import torch

    from guided_nc._version import __version__

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "guided_nc": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover - torchvision is a dependency
        info["torchvision"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --- run folders ---------------------------------------------------------------------------------


def run_folder(experiment: str | os.PathLike, method: str, seed: int) -> Path:
    """Folder of one run of an experiment: ``<experiment>/runs/<method>/seed<seed>``.

    An experiment written by v0.1 of the UFM keeps its ``runs/<method>-seed<seed>`` folders:
    when that folder exists, it is the run's folder (so a rerun skips it instead of training
    it again elsewhere).
    """
    legacy = Path(experiment) / "runs" / f"{method}-seed{seed}"
    if legacy.is_dir():
        return legacy
    return Path(experiment) / "runs" / method / f"seed{seed}"


def config_digest(config: Mapping[str, Any]) -> str:
    """A short, order-independent fingerprint of a configuration dict (16 hex digits)."""
    text = json.dumps(_json_safe(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def mark_done(folder: str | os.PathLike, config: Mapping[str, Any], wall_seconds: float) -> Path:
    """Write the ``done`` marker, last: the run is complete and matches ``config``."""
    info = {
        "config_digest": config_digest(config),
        "wall_seconds": wall_seconds,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return atomic_write_json(Path(folder) / DONE_NAME, info)


def read_done(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``done`` marker of a run folder (None if unfinished).

    The v0.1 markers (``done`` holding the text "done", or the UFM's ``done.json``) read as
    ``{}`` or their JSON content.
    """
    folder = Path(folder)
    for name in (DONE_NAME, "done.json"):
        path = folder / name
        if path.is_file():
            text = path.read_text(encoding="utf-8").strip()
            try:
                value = json.loads(text) if text else {}
            except json.JSONDecodeError:
                return {}  # v0.1 train/compare marker: the word "done"
            return value if isinstance(value, dict) else {}
    return None


@dataclass(frozen=True)
class RunFolder:
    """A run folder found by :func:`find_runs`."""

    path: Path
    method: str
    seed: int
    config: dict[str, Any]
    done: dict[str, Any] | None

    @property
    def finished(self) -> bool:
        """Whether the run wrote its ``done`` marker."""
        return self.done is not None

    def rows(self) -> list[dict[str, Any]]:
        """The run's ``metrics.csv`` rows."""
        return read_long_csv(self.path / "metrics.csv")


def _run_config(path: Path) -> dict[str, Any]:
    saved = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    return saved.get("config", saved)


def find_runs(experiment: str | os.PathLike, *, finished_only: bool = True) -> list[RunFolder]:
    """Every run folder of an experiment, sorted by (method, seed) as strings then numbers.

    Reads ``<experiment>/runs/<method>/seed<seed>/`` and the v0.1 UFM layout
    ``<experiment>/runs/<method>-seed<seed>/``. Unfinished runs (no ``done``) are skipped unless
    ``finished_only=False``. Returns an empty list when there is no ``runs`` folder.
    """
    root = Path(experiment) / "runs"
    if not root.is_dir():
        return []
    found = []
    for child in sorted(root.iterdir()):
        if not child.is_dir():
            continue
        legacy = _LEGACY_UFM_FOLDER.match(child.name)
        if legacy is not None:  # no method name ends in "-seed<digits>"
            folders = [(child, legacy["method"], int(legacy["seed"]))]
        else:
            folders = [
                (folder, child.name, int(folder.name[4:]))
                for folder in child.iterdir()
                if folder.is_dir() and re.fullmatch(r"seed\d+", folder.name)
            ]
        for path, method, seed in folders:
            done = read_done(path)
            if finished_only and done is None:
                continue
            found.append(RunFolder(path, method, seed, _run_config(path), done))
    return sorted(found, key=lambda run: (run.method, run.seed))
