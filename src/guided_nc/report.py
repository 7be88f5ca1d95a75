"""Reports from files: median [range] summaries, markdown / LaTeX tables and band figures.

Runs write files (long-format CSVs, JSON); reports only read them, so a report can be rebuilt
without rerunning anything (DomainBed's ``collect_results`` pattern). This module is generic:
it knows nothing of neural collapse, and both the unconstrained-feature experiments
(:mod:`guided_nc.ufm`) and the real-network comparisons use it.

Conventions
-----------
* A *long-format* CSV has one row per observation, e.g. ``method, seed, iteration, loss, acc1``.
  Empty cells are missing values (``None`` after :func:`read_long_csv`).
* A *summary* is ``{"median": m, "min": lo, "max": hi}`` over runs (seeds); see :func:`summarize`.
* Every file is written atomically: a temporary file in the target's folder, then ``os.replace``,
  so a reader never sees half a file and an interrupted run leaves the previous version.
* Figures use matplotlib's non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; must precede the pyplot import

import matplotlib.pyplot as plt
import numpy as np

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "format_median_range",
    "latex_escape",
    "latex_table",
    "load_run_folders",
    "markdown_table",
    "plot_histograms",
    "plot_median_bands",
    "read_json",
    "read_long_csv",
    "save_figure",
    "series_from_rows",
    "summarize",
    "write_long_csv",
]

_MISSING_MODES = ("ignore", "largest")


# --- atomic files ---------------------------------------------------------------------------


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder + ``os.replace``).

    Creates missing parent folders. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        # mkstemp creates 0600; give the file the permissions a plain open() would (umask).
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, path)
    except BaseException:
        # Leave no temporary file behind; the previous version of ``path`` is untouched.
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically. Returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_safe(value: Any) -> Any:
    # JSON has no NaN/Inf: store them as null, the file's convention for "missing".
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


def save_figure(figure: matplotlib.figure.Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically (format from the suffix, e.g. ``.png``) and close it."""
    path = Path(path)
    buffer = io.BytesIO()
    figure.savefig(buffer, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    plt.close(figure)
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


def load_run_folders(
    root: str | os.PathLike,
    *,
    metrics_name: str = "metrics.csv",
    config_name: str = "config.json",
    marker: str | None = None,
) -> list[dict[str, Any]]:
    """Collect every run folder under ``root`` (searched recursively, sorted by path).

    A run folder is one that holds ``metrics_name`` (and ``marker``, when given: e.g. a ``done``
    file written last, so unfinished runs are skipped).

    Returns a list of ``{"path": Path, "config": dict | None, "rows": list[dict]}``; ``config``
    is the parsed ``config_name`` when present.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"root={str(root)!r} is not a folder; pass the folder holding the runs")
    runs = []
    for metrics_path in sorted(root.rglob(metrics_name)):
        folder = metrics_path.parent
        if marker is not None and not (folder / marker).exists():
            continue
        config_path = folder / config_name
        runs.append(
            {
                "path": folder,
                "config": read_json(config_path) if config_path.exists() else None,
                "rows": read_long_csv(metrics_path),
            }
        )
    return runs


# --- summaries and tables -------------------------------------------------------------------


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _as_number(value: Any) -> Any:
    # Keep integers integral (iteration counts read better as 120 than 120.0).
    if (
        isinstance(value, (float, np.floating))
        and math.isfinite(value)
        and float(value).is_integer()
    ):
        return int(value)
    return float(value) if isinstance(value, np.floating) else value


def summarize(values: Iterable[Any], missing: str = "ignore") -> dict[str, Any]:
    """Median and range of ``values`` (one per run/seed), aware of missing values.

    Args:
        values: numbers, ``None`` or NaN (missing).
        missing: ``"ignore"`` drops missing values (all missing -> all ``None``).
            ``"largest"`` ranks a missing value above every number: use it for "iterations until
            X" where missing means "never within the budget"; then the median (or max) is
            ``None`` when it falls on a missing value, and the min is ``None`` only if all are.

    Returns:
        ``{"median": m, "min": lo, "max": hi}``; integral results are ints, ``None`` where
        undefined (no values).

    >>> summarize([3, 1, None, 2])
    {'median': 2, 'min': 1, 'max': 3}
    >>> summarize([10, None, None], missing="largest")
    {'median': None, 'min': 10, 'max': None}
    """
    if missing not in _MISSING_MODES:
        raise ValueError(f"missing={missing!r} is not supported; use one of {_MISSING_MODES}")
    values = list(values)
    for value in values:
        if not _is_missing(value) and not isinstance(value, (int, float, np.number)):
            raise TypeError(
                f"summarize needs numbers or None, got {value!r} ({type(value).__name__})"
            )
    present = [float(value) for value in values if not _is_missing(value)]
    if missing == "largest":
        present += [math.inf] * (len(values) - len(present))
    if not present:
        return {"median": None, "min": None, "max": None}
    array = np.asarray(present, dtype=np.float64)
    result = {"median": np.median(array), "min": array.min(), "max": array.max()}
    all_integers = all(
        isinstance(value, (int, np.integer)) for value in values if not _is_missing(value)
    )
    out = {}
    for key, value in result.items():
        value = float(value)
        if not math.isfinite(value):
            out[key] = None
        elif all_integers:
            out[key] = _as_number(value)
        else:
            out[key] = value
    return out


def format_median_range(
    summary: Mapping[str, Any] | Iterable[Any],
    fmt: str = "{:.4g}",
    missing_text: str = "n/a",
    missing: str = "ignore",
) -> str:
    """Format a summary (or raw values, summarised with ``missing``) as ``"m [lo, hi]"``.

    Each of the three numbers is formatted with ``fmt``; undefined ones print as ``missing_text``.
    If all three are undefined the result is just ``missing_text``.

    >>> format_median_range([1.0, 2.0, 4.0], fmt="{:.1f}")
    '2.0 [1.0, 4.0]'
    """
    if isinstance(summary, Mapping):
        absent = {"median", "min", "max"} - set(summary)
        if absent:
            raise ValueError(
                f"summary is missing keys {sorted(absent)}; pass the dict from summarize() or a "
                f"list of values"
            )
    else:
        summary = summarize(summary, missing=missing)

    def text(value: Any) -> str:
        return missing_text if _is_missing(value) else fmt.format(value)

    if all(_is_missing(summary[key]) for key in ("median", "min", "max")):
        return missing_text
    return f"{text(summary['median'])} [{text(summary['min'])}, {text(summary['max'])}]"


def _check_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> list[list[str]]:
    width = len(header)
    if width == 0:
        raise ValueError("header is empty; pass at least one column name")
    cells = []
    for index, row in enumerate(rows):
        row = list(row)
        if len(row) != width:
            raise ValueError(
                f"rows[{index}] has {len(row)} cells but header has {width} columns; give every "
                f"row one cell per column"
            )
        cells.append(["" if _is_missing(cell) else str(cell) for cell in row])
    return cells


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (header, separator, one line per row), ending in a newline.

    ``|`` inside cells is escaped; ``None`` cells are empty. Raises ValueError when a row's
    length differs from the header's.
    """
    cells = _check_table(header, rows)

    def line(items: Sequence[str]) -> str:
        return "| " + " | ".join(str(item).replace("|", r"\|") for item in items) + " |"

    lines = [line([str(name) for name in header]), "|" + "|".join("---" for _ in header) + "|"]
    lines += [line(row) for row in cells]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters in plain text."""
    return "".join(_LATEX_SPECIAL.get(char, char) for char in str(text))


def latex_table(
    header: Sequence[Any],
    rows: Sequence[Sequence[Any]],
    caption: str | None = None,
    label: str | None = None,
    align: str | None = None,
) -> str:
    """A booktabs LaTeX table (``table`` + ``tabular`` with top/mid/bottom rules).

    Args:
        header: column names (escaped).
        rows: cells (escaped; ``None`` -> empty).
        caption: optional caption (escaped). label: optional ``\\label`` key (not escaped).
        align: column specification, default ``l`` then ``r`` for every further column.

    Needs ``\\usepackage{booktabs}``. Raises ValueError for ragged rows or a wrong ``align``.
    """
    cells = _check_table(header, rows)
    if align is None:
        align = "l" + "r" * (len(header) - 1)
    if len([char for char in align if char.isalpha()]) != len(header):
        raise ValueError(
            f"align={align!r} describes a different number of columns than header "
            f"({len(header)}); give one letter per column"
        )
    lines = [r"\begin{table}[t]", r"\centering"]
    if caption is not None:
        lines.append(rf"\caption{{{latex_escape(caption)}}}")
    if label is not None:
        lines.append(rf"\label{{{label}}}")
    lines += [
        rf"\begin{{tabular}}{{{align}}}",
        r"\toprule",
        " & ".join(latex_escape(name) for name in header) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(latex_escape(cell) for cell in row) + r" \\" for row in cells]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# --- figures --------------------------------------------------------------------------------


def series_from_rows(
    rows: Iterable[Mapping[str, Any]],
    x: str,
    y: str,
    group: str,
    run: str,
    where: Mapping[str, Any] | None = None,
) -> dict[Any, tuple[np.ndarray, np.ndarray]]:
    """Pivot long-format rows into ``{group value: (x values, Y)}`` for :func:`plot_median_bands`.

    Rows whose ``y`` is missing are skipped, so sparse columns (metrics evaluated every n
    iterations) give their own x grid. ``Y`` has one row per run (sorted by run value) and one
    column per x value (sorted); NaN where a run has no value at that x.

    Args:
        rows: long-format rows (e.g. from :func:`read_long_csv`).
        x, y: column names of the abscissa and the value.
        group: column that separates curves (e.g. ``"method"``); order of first appearance.
        run: column that separates repeats within a group (e.g. ``"seed"``).
        where: optional ``{column: value}`` filter.
    """
    table: dict[Any, dict[Any, dict[Any, float]]] = {}
    for row in rows:
        if where is not None and any(row.get(key) != value for key, value in where.items()):
            continue
        value = row.get(y)
        if _is_missing(value):
            continue
        table.setdefault(row[group], {}).setdefault(row[run], {})[row[x]] = float(value)
    series = {}
    for name, runs in table.items():
        xs = sorted({key for values in runs.values() for key in values})
        matrix = np.full((len(runs), len(xs)), np.nan)
        position = {key: index for index, key in enumerate(xs)}
        for row_index, run_key in enumerate(sorted(runs)):
            for key, value in runs[run_key].items():
                matrix[row_index, position[key]] = value
        series[name] = (np.asarray(xs, dtype=np.float64), matrix)
    return series


def plot_median_bands(
    series: Mapping[Any, tuple[Sequence[float], Any]],
    *,
    ax: matplotlib.axes.Axes | None = None,
    path: str | os.PathLike | None = None,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    reference: float | None = None,
    reference_label: str | None = None,
    log_x: bool = False,
    log_y: bool = False,
    colors: Mapping[Any, str] | None = None,
    marker: str | None = None,
    legend: bool = True,
) -> matplotlib.axes.Axes:
    """Median line and min-max band over runs, one per series.

    Args:
        series: ``{label: (x, Y)}`` with x of length T and Y of shape (runs, T) or (T,);
            NaN entries are ignored per x (a column with no values is left out).
        ax: axes to draw on; default a new figure.
        path: if given, save the figure there (atomically, then close it).
        title, xlabel, ylabel: text.
        reference: optional horizontal line (e.g. a loss lower bound), drawn dashed black.
        log_x, log_y: logarithmic axes (non-positive values are masked by matplotlib).
        colors: optional ``{label: color}``; default matplotlib's cycle in order.
        marker: optional marker for the median line (useful with few x values).
        legend: draw a legend.

    Returns the axes.
    """
    if ax is None:
        _figure, ax = plt.subplots(figsize=(5.0, 3.6))
    for index, (label, (xs, values)) in enumerate(series.items()):
        xs = np.asarray(xs, dtype=np.float64)
        values = np.asarray(values, dtype=np.float64)
        if values.ndim == 1:
            values = values[None, :]
        if values.ndim != 2 or values.shape[1] != xs.shape[0]:
            raise ValueError(
                f"series[{label!r}] has x of length {xs.shape[0]} but values of shape "
                f"{values.shape}; pass values of shape (runs, len(x))"
            )
        keep = ~np.all(np.isnan(values), axis=0)
        xs, values = xs[keep], values[:, keep]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            median = np.nanmedian(values, axis=0)
            low, high = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
        color = _series_color(colors, label, index)
        ax.plot(xs, median, color=color, label=str(label), marker=marker, linewidth=1.5)
        ax.fill_between(xs, low, high, color=color, alpha=0.25, linewidth=0)
    if reference is not None:
        ax.axhline(reference, color="black", linestyle="--", linewidth=1.0, label=reference_label)
    if log_x:
        ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    return _finish_axes(ax, title, xlabel, ylabel, legend, path)


def plot_histograms(
    samples: Mapping[Any, Any],
    *,
    ax: matplotlib.axes.Axes | None = None,
    path: str | os.PathLike | None = None,
    bins: int = 50,
    title: str | None = None,
    xlabel: str | None = None,
    reference: float | None = None,
    reference_label: str | None = None,
    colors: Mapping[Any, str] | None = None,
    legend: bool = True,
) -> matplotlib.axes.Axes:
    """Overlaid step histograms (density) of 1-D samples, one per label, on shared bins.

    ``reference`` draws a dashed vertical line (e.g. the simplex-ETF margin). Returns the axes;
    saves and closes the figure when ``path`` is given.
    """
    if ax is None:
        _figure, ax = plt.subplots(figsize=(5.0, 3.6))
    arrays = {
        label: np.asarray(values, dtype=np.float64).ravel() for label, values in samples.items()
    }
    finite = [values[np.isfinite(values)] for values in arrays.values()]
    finite = [values for values in finite if values.size]
    if finite:
        joined = np.concatenate(finite)
        low, high = float(joined.min()), float(joined.max())
        if reference is not None:
            low, high = min(low, reference), max(high, reference)
        if high <= low:
            low, high = low - 0.5, high + 0.5
        edges = np.linspace(low, high, bins + 1)
        for index, (label, values) in enumerate(arrays.items()):
            values = values[np.isfinite(values)]
            if values.size == 0:
                continue
            color = _series_color(colors, label, index)
            ax.hist(
                values, bins=edges, density=True, histtype="step", color=color, label=str(label)
            )
    if reference is not None:
        ax.axvline(reference, color="black", linestyle="--", linewidth=1.0, label=reference_label)
    return _finish_axes(ax, title, xlabel, "density", legend, path)


def _series_color(colors: Mapping[Any, str] | None, label: Any, index: int) -> str:
    """``colors[label]`` if given, else matplotlib's cycle colour ``C<index>``."""
    return (colors or {}).get(label) or f"C{index}"


def _finish_axes(
    ax: matplotlib.axes.Axes,
    title: str | None,
    xlabel: str | None,
    ylabel: str | None,
    legend: bool,
    path: str | os.PathLike | None,
) -> matplotlib.axes.Axes:
    """Labels, grid and legend shared by every plot; save and close when ``path`` is given."""
    if title:
        ax.set_title(title)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(fontsize="small")
    if path is not None:
        save_figure(ax.figure, path)
    return ax
