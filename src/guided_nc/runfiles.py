"""Run files: the one atomic writer, CSV/JSON helpers, the environment record and run folders.

Runs write files and reports only read them (DomainBed's pattern), so everything that crosses
that line lives here:

* **Atomic writes.** :func:`atomic_write` writes to a temporary file in the target's folder, then
  ``os.replace`` moves it over the target (atomic on POSIX): a reader never sees half a file and
  a crash leaves the previous version; the folder is fsynced after the rename, so that the new
  name survives a power loss too. The file gets the permissions a plain ``open()`` would
  (``0666 & ~umask``, so 0644 under the default umask): results are readable by other users.
  A full, read-only or forbidden disk (``ENOSPC``, ``EDQUOT``, ``EROFS``, ``EACCES``,
  ``EPERM``) raises :class:`DiskError`, one line naming the file, its folder and the fix.
* **Locks.** :class:`RunLock` lets one process at a time write a run folder (``fcntl.flock`` on
  ``.<folder name>.lock`` beside the folder's resolved path, so a symbolic link and its target
  are one run; released by the kernel when the holder dies, even by ``kill -9``); a second
  writer gets an error naming the folder and the process holding it.
* **Kinds.** Every folder a command writes records the command's kind (:data:`KINDS`) in its
  ``kind`` file, written first; :func:`check_kind` refuses a folder of another kind, and infers
  the kind of folders written before kinds existed (:func:`folder_kind`).
* **Reading.** Every reader here (:func:`read_json`, :func:`read_config`, :func:`read_long_csv`,
  :func:`load_npy`, :func:`read_done`) turns a broken file (not text, not JSON, a JSON list
  where an object belongs, a garbage CSV row, text in a number cell, a garbage ``.npy``, a
  directory where a file belongs) into :class:`RunFileError`: one line naming the file, what
  is wrong and the fix.
* **Long-format CSV** (one row per observation, empty cell = missing) and JSON (NaN -> null).
* **The run-folder contract**, shared by ``guided-nc ufm``, ``train`` and ``compare``::

      <experiment>/runs/<method>/seed<seed>/
          kind           the folder's kind ("train", "compare", "ufm" or "bench"), written first
          config.json    {"config": {...}, "environment": {...}}
          metrics.csv    the run's rows (long format)
          done           JSON, written last: config digest, wall time, finish time

  :func:`find_runs` lists the finished runs of an experiment folder. It also reads the v0.1
  UFM layout (``runs/<method>-seed<seed>/done.json``), so old experiments still report.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import logging
import math
import os
import platform
import re
import socket
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
    "KINDS",
    "KIND_NAME",
    "LOCK_NAME",
    "RUN_TEXT_COLUMNS",
    "DiskError",
    "RunFileError",
    "RunFolder",
    "RunFolderKindError",
    "RunFolderLocked",
    "RunLock",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_kind",
    "config_digest",
    "csv_columns",
    "environment_info",
    "find_runs",
    "folder_kind",
    "load_npy",
    "make_folder",
    "mark_done",
    "mark_kind",
    "read_config",
    "read_done",
    "read_json",
    "read_long_csv",
    "reading",
    "remove_stale_temporaries",
    "run_folder",
    "save_npy",
    "unreadable",
    "write_long_csv",
]

#: Name of the marker a finished run writes last.
DONE_NAME = "done"

#: Name of a run folder's lock file, beside the folder (so that a run refused before it
#: starts leaves no folder behind): ``.<folder name>.lock``.
LOCK_NAME = ".{name}.lock"

#: Name of the file that records a folder's kind (written first, before anything else).
KIND_NAME = "kind"

#: The kinds of folder, one per command that writes one.
KINDS = ("train", "compare", "ufm", "bench")

#: The columns of a run's CSV files (metrics.csv, timings.csv) that hold text; every other
#: cell is a number or empty.
RUN_TEXT_COLUMNS = ("preset", "method")

#: errno values that mean "the disk cannot take this file": full, over quota, read-only, or
#: not ours to write.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}

#: The fix for a broken run file, unless the reader knows a better one.
_RESTORE = "restore it from a copy, or delete the run folder and run it again"

_LOGGER = logging.getLogger("guided_nc")


class DiskError(OSError):
    """A file could not be written: its disk is full, read-only or not ours to write.

    Its text is one line naming the file, its folder and the fix (no ``[Errno n]`` prefix).
    """

    def __str__(self) -> str:
        return str(self.strerror)


class RunFolderLocked(RuntimeError):
    """Another process is writing this run folder."""


class RunFileError(ValueError):
    """A run file that cannot be read (broken, truncated, binary, the wrong type): the text is
    one line naming the file, what is wrong and the fix."""


class RunFolderKindError(ValueError):
    """A command was pointed at a folder that another command wrote (names both kinds)."""


#: The v0.1 UFM run folders: ``runs/<method>-seed<seed>/done.json``.
_LEGACY_UFM_FOLDER = re.compile(r"^(?P<method>[a-z-]+)-seed(?P<seed>\d+)$")


# --- atomic files -----------------------------------------------------------------------------


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _RecordingStream:
    """A binary file whose ``write`` remembers the OSError it raised.

    ``torch.save`` writes through its own C++ zip writer, which turns the write error of a full
    disk into ``RuntimeError: ... unexpected pos``; the recorded OSError lets the caller say
    what really happened.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream, self.error = stream, None

    def write(self, data) -> int:
        try:
            return self._stream.write(data)
        except OSError as error:
            self.error = error
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _disk_error(error: OSError, path: Path, where: str = "") -> DiskError:
    """The one-line :class:`DiskError` for an ``OSError`` of :data:`_DISK_ERRNOS` on ``path``
    (``where``: what failed, default ``cannot write <name> in folder <parent>``)."""
    where = where or f"cannot write {path.name} in folder {str(path.parent)!r}"
    if error.errno == errno.EROFS:
        text = (
            f"{where}: the disk is read-only; choose an --out on a writable disk (for "
            "--report-only, copy the folder to one first), or remount this one read-write"
        )
    elif error.errno in (errno.EACCES, errno.EPERM):
        text = (
            f"{where}: permission denied; choose an --out you may write to (for --report-only, "
            "copy the folder there first), or fix the folder's permissions"
        )
    else:
        text = (
            f"{where}: the disk is full or over its quota ({os.strerror(error.errno)}); free "
            "some space or choose another --out, then run the command again (for "
            "`guided-nc train` add --resume-or-start: it continues from the last checkpoint, "
            "or starts anew when there is none)"
        )
    return DiskError(error.errno, text)


@contextlib.contextmanager
def _writing(path: Path, where: str = ""):
    """Turn an ``OSError`` of :data:`_DISK_ERRNOS` raised inside into :class:`DiskError`."""
    try:
        yield
    except DiskError:
        raise
    except OSError as error:
        if error.errno in _DISK_ERRNOS:
            raise _disk_error(error, path, where) from error
        raise


def make_folder(folder: str | os.PathLike) -> Path:
    """``mkdir -p folder``; a full, read-only or forbidden disk raises :class:`DiskError`."""
    folder = Path(folder)
    with _writing(folder, f"cannot create folder {str(folder)!r}"):
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def _fsync_folder(folder: Path) -> None:
    """fsync a directory, so that a rename in it survives a power loss (no-op where the file
    system cannot fsync directories)."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(handle)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(binary_file)`` on a temporary file next to ``path``, then ``os.replace`` it.

    Creates missing parent folders. The file is flushed and fsynced before the rename, gets
    mode ``0666 & ~umask`` (``mkstemp`` would leave 0600), and its folder is fsynced after the
    rename (durable against power loss). On any exception, including KeyboardInterrupt, the
    temporary file is removed and ``path`` keeps its previous content; a full, read-only or
    forbidden disk raises :class:`DiskError` naming the file and folder. Returns the path.
    """
    path = Path(path)
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
    stream = None
    try:
        with os.fdopen(handle, "wb") as raw:
            stream = _RecordingStream(raw)
            write(stream)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, path)
        _fsync_folder(path.parent)
    except BaseException as error:
        # Why BaseException: a KeyboardInterrupt mid-write must not leave temp files behind.
        if os.path.exists(temporary):
            os.unlink(temporary)
        cause = stream.error if stream is not None and stream.error is not None else error
        if isinstance(cause, OSError) and cause.errno in _DISK_ERRNOS:
            raise _disk_error(cause, path) from error
        raise
    return path


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files an interrupted :func:`atomic_write` left in ``folder``.

    A ``kill -9`` mid-write leaves ``.<name>.<random>.tmp`` behind (up to a checkpoint's size
    each). Call this only on a folder this process has locked (:class:`RunLock`), where no
    other writer can be mid-write. Returns the removed paths (each is also logged).
    """
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for path in folder.glob(".*.tmp"):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
                _LOGGER.info("removed %s, left by an interrupted write", path)
    return removed


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


def unreadable(path: str | os.PathLike, problem: str, fix: str = _RESTORE) -> RunFileError:
    """The one-line error for a run file that cannot be used: ``cannot read <path>: <problem>;
    <fix>`` (the default fix: restore a copy, or delete the run folder and rerun it)."""
    return RunFileError(f"cannot read {str(path)!r}: {problem}; {fix}")


@contextlib.contextmanager
def reading(path: str | os.PathLike, fix: str = _RESTORE):
    """Turn what reading a broken ``path`` raises inside into one-line :class:`RunFileError`s.

    Binary data where text belongs, invalid JSON or CSV, a directory where a file belongs and
    other OS errors (permission, I/O) become :func:`unreadable` errors naming ``path``; a
    missing file stays :class:`FileNotFoundError` (callers check for it and say what to do).
    """
    try:
        yield
    except (FileNotFoundError, RunFileError):
        raise
    except UnicodeDecodeError as error:
        raise unreadable(path, "it is binary data, not text", fix) from error
    except json.JSONDecodeError as error:
        where = f"{error.msg}: line {error.lineno}, column {error.colno}"
        raise unreadable(path, f"it is not valid JSON ({where}; cut short?)", fix) from error
    except csv.Error as error:
        raise unreadable(path, f"it is not a valid CSV file ({error})", fix) from error
    except IsADirectoryError as error:
        raise unreadable(path, "it is a directory, not a file", fix) from error
    except OSError as error:
        raise unreadable(path, error.strerror or str(error), fix) from error


def _json_type(value: Any) -> str:
    names = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def read_json(path: str | os.PathLike, expect: type | None = None, fix: str = _RESTORE) -> Any:
    """Read a JSON file; with ``expect=dict`` it must hold an object.

    Raises:
        FileNotFoundError: no file.
        RunFileError: not text, not JSON, or not ``expect`` (one line naming the file and fix).
    """
    with reading(path, fix):
        with open(path, encoding="utf-8") as stream:
            value = json.load(stream)
    if expect is not None and not isinstance(value, expect):
        raise unreadable(path, f"it holds {_json_type(value)}, not a JSON object", fix)
    return value


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The configuration in a run's ``config.json``: its ``"config"`` object, or the whole
    object (v0.1 UFM run folders stored the fields at the top). RunFileError if broken."""
    saved = read_json(path, expect=dict)
    config = saved.get("config", saved)
    if not isinstance(config, dict):
        raise unreadable(path, f'its "config" is {_json_type(config)}, not a JSON object')
    return config


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Save one array as ``.npy`` (no pickle), atomically."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return atomic_write_bytes(path, buffer.getvalue())


def load_npy(path: str | os.PathLike) -> np.ndarray:
    """Load one ``.npy`` array (never a pickle); RunFileError naming the file if it is not one."""
    with reading(path):
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, EOFError) as error:  # numpy's text would advise allow_pickle=True
            raise unreadable(path, "it is not a .npy array (garbage or cut)") from error
    if not isinstance(array, np.ndarray):
        array.close()  # an .npz archive
        raise unreadable(path, "it is an .npz archive, not a .npy array")
    return array


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


def read_long_csv(
    path: str | os.PathLike, text_columns: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Read a long-format CSV: one dict per row; numbers parsed (int, else float), empty -> None.

    Text cells stay strings, so a column of method names reads back as written. With
    ``text_columns`` (e.g. :data:`RUN_TEXT_COLUMNS`) every other cell must be a number or
    empty. Blank lines are skipped.

    Raises:
        RunFileError: not text, no header, a row with another number of cells than the header
            (a garbage or cut row), or text in a number column; the line is named.
    """
    rows = []
    with reading(path):
        with open(path, newline="", encoding="utf-8") as stream:
            reader = csv.reader(stream)
            header = next(reader, None)
            if not header:
                raise unreadable(path, "it has no header row (empty?)")
            for cells in reader:
                if not cells:
                    continue
                if len(cells) != len(header):
                    raise unreadable(
                        path,
                        f"line {reader.line_num} has {len(cells)} cells but the header has "
                        f"{len(header)} (a garbage or cut row)",
                    )
                row = {key: _parse_cell(cell) for key, cell in zip(header, cells, strict=True)}
                for key, value in row.items():
                    if text_columns is not None and isinstance(value, str):
                        if key not in text_columns:
                            raise unreadable(
                                path,
                                f"line {reader.line_num}, column {key!r} holds {value!r} "
                                "where a number belongs",
                            )
                rows.append(row)
    return rows


def csv_columns(path: str | os.PathLike) -> list[str]:
    """The header of a CSV file (RunFileError naming the file if it cannot be read)."""
    with reading(path):
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
    ``{}`` or their JSON content. A marker that is not text raises :class:`RunFileError`.
    """
    folder = Path(folder)
    fix = (
        "delete it and the run counts as unfinished: the next `compare` or `ufm`, or "
        "`train --resume-or-start`, continues it"
    )
    for name in (DONE_NAME, "done.json"):
        path = folder / name
        if path.is_file():
            with reading(path, fix):
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
        """The run's ``metrics.csv`` rows (numbers but in :data:`RUN_TEXT_COLUMNS`)."""
        return read_long_csv(self.path / "metrics.csv", RUN_TEXT_COLUMNS)


def _run_config(path: Path) -> dict[str, Any]:
    return read_config(path / "config.json") if (path / "config.json").exists() else {}


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


# --- kinds -------------------------------------------------------------------------------------


def _holds_preset(config_path: Path) -> bool:
    return config_path.is_file() and "preset" in read_config(config_path)


def _inferred_kind(folder: Path) -> tuple[str, str] | None:
    """The kind of a folder written before kinds were recorded, and the file that shows it."""
    if (folder / "device_check.json").exists():
        return "bench", "device_check.json"
    for name in ("checkpoint.pt", "tensorboard"):
        if (folder / name).exists():
            return "train", name
    if _holds_preset(folder / "config.json"):
        return "ufm", "config.json with a UFM preset"
    if (folder / "config.json").is_file():
        return "train", "config.json"
    if (folder / "runs").is_dir():
        return "compare", "runs/ without a config.json"
    summary = folder / "summary.json"
    if summary.is_file() and "presets" in read_json(summary, expect=dict):
        return "ufm", "summary.json of several UFM presets"
    for child in sorted(folder.iterdir()):  # a multi-preset UFM folder holds preset folders
        try:
            if child.is_dir() and _holds_preset(child / "config.json"):
                return "ufm", f"{child.name}/config.json with a UFM preset"
        except RunFileError:  # a broken file in some other folder says nothing about this one
            continue
    return None


def folder_kind(folder: str | os.PathLike) -> tuple[str, str] | None:
    """``(kind, how it is known)`` of a folder, or None for a missing or unclaimed folder.

    The kind is the word in its ``kind`` file. A folder without one (written by an earlier version)
    gets the kind its files show, in this order: ``device_check.json`` -> bench;
    ``checkpoint.pt`` or ``tensorboard/`` -> train; a ``config.json`` whose configuration has a
    ``preset`` -> ufm, any other ``config.json`` -> train; ``runs/`` -> compare; a folder with
    a ``summary.json`` of several presets, or a UFM preset folder in it -> ufm (several
    presets). Else None: the folder is free.

    Raises:
        RunFileError: a ``kind`` file that does not hold one of :data:`KINDS`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    path = folder / KIND_NAME
    if path.exists():
        fix = f"write one of {', '.join(KINDS)} into it (the command that made the folder)"
        with reading(path, fix):
            kind = path.read_text(encoding="utf-8").strip()
        if kind not in KINDS:
            raise unreadable(path, f"it holds {kind[:40]!r}, not a folder kind", fix)
        return kind, f"its {KIND_NAME} file"
    return _inferred_kind(folder)


def check_kind(folder: str | os.PathLike, kind: str) -> None:
    """Refuse ``folder`` unless it is free or of ``kind`` (reads only; call before writing).

    Raises:
        RunFolderKindError: one line naming the folder, its kind, how that is known and the fix.
    """
    found = folder_kind(folder)
    if found is not None and found[0] != kind:
        raise RunFolderKindError(
            f"{str(folder)!r} is a {found[0]} folder (from {found[1]}), not a {kind} folder: "
            f"`guided-nc {kind}` does not use it; choose another --out"
        )


def mark_kind(folder: str | os.PathLike, kind: str) -> Path:
    """Create ``folder`` and record its kind, unless recorded already (the first write)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    folder = make_folder(folder)
    if not (folder / KIND_NAME).exists():
        atomic_write_text(folder / KIND_NAME, kind + "\n")
    return folder


# --- locks ------------------------------------------------------------------------------------


class RunLock:
    """An exclusive lock on a run folder, for the process that writes it.

    ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``.<name>.lock`` beside the folder's resolved path
    (``os.path.realpath``: a symbolic link and its target take one lock): the kernel releases
    it when the holder exits for any reason (``kill -9`` included), so a lock can never outlive
    its process (on NFS, Linux maps flock to POSIX locks, which the server also releases). The
    file also records who holds it (host, PID, start time, command line), so that a second
    writer is told whom it waits for, and the next holder can say that it takes over from a
    process that was killed. The file stays after release (deleting it would race with a
    process that opened it); an empty file means a clean release.

    Use as a context manager, or :meth:`acquire` / :meth:`release`. Under torchrun only rank 0
    takes it (the caller's job).

    Raises:
        RunFolderLocked: another process holds the lock.
    """

    def __init__(self, folder: str | os.PathLike, wait: float = 0.0) -> None:
        self.folder = Path(folder)
        resolved = Path(os.path.realpath(self.folder))
        self.path = resolved.parent / LOCK_NAME.format(name=resolved.name)
        same = os.path.abspath(self.folder) == str(resolved)
        self._shown = repr(str(self.folder)) + ("" if same else f" (= {str(resolved)!r})")
        self.wait = wait
        self._handle: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, waiting up to ``wait`` seconds for another holder; returns self."""
        import fcntl

        with _writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
            holder = self._holder(handle)
            os.close(handle)
            raise RunFolderLocked(
                f"run folder {self._shown} is in use by {holder}; wait for it to finish, "
                "stop it, or choose another --out"
            ) from None
        previous = self._read(handle)
        if previous.get("pid"):
            _LOGGER.warning(
                "%s: taking over the lock of %s, which is no longer running (killed?)",
                self.folder,
                self._describe(previous),
            )
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(handle, 0)
        os.pwrite(handle, json.dumps(record).encode(), 0)
        self._handle = handle
        return self

    def release(self) -> None:
        """Clear the record and unlock (idempotent)."""
        if self._handle is None:
            return
        import fcntl

        os.ftruncate(self._handle, 0)
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        os.close(self._handle)
        self._handle = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    @staticmethod
    def _read(handle: int) -> dict[str, Any]:
        text = os.pread(handle, 65536, 0).decode("utf-8", "replace").strip()
        try:
            value = json.loads(text) if text else {}
        except json.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}

    def _holder(self, handle: int) -> str:
        record = self._read(handle)
        if not record.get("pid"):
            return "another process (it has not written its name yet)"
        return self._describe(record)

    @staticmethod
    def _describe(record: dict[str, Any]) -> str:
        text = f"PID {record.get('pid')} on host {record.get('host')}"
        if record.get("started"):
            text += f" since {record['started']}"
        if record.get("command"):
            text += f" ({record['command']})"
        return text
