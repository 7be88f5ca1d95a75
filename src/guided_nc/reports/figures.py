"""Band figures and histograms, saved atomically (matplotlib's file-only Agg backend).

:func:`series_from_rows` pivots long-format rows into per-group (x, runs x x) arrays and
:func:`plot_median_bands` draws a median line and a min-max band per group, the layout of the
paper's Figures 2-3.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; must precede the pyplot import

import matplotlib.pyplot as plt
import numpy as np

from guided_nc.reports.tables import is_missing
from guided_nc.runfiles import atomic_write_bytes

__all__ = ["plot_histograms", "plot_median_bands", "save_figure", "series_from_rows"]


def save_figure(figure: matplotlib.figure.Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically (format from the suffix, e.g. ``.png``) and close it."""
    path = Path(path)
    buffer = io.BytesIO()
    figure.savefig(buffer, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    plt.close(figure)
    return atomic_write_bytes(path, buffer.getvalue())


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
        if is_missing(value):
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
