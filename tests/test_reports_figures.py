"""Tests for guided_nc.reports.figures: pivots of long-format rows, band plots, histograms.

Truth: hand-made rows whose medians and ranges are known, and numpy's own histogram of the same
samples on the same bins.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from guided_nc.reports import figures as report


def test_series_from_rows_pivot():
    rows = [
        {"method": "a", "seed": 1, "it": 0, "v": 1.0},
        {"method": "a", "seed": 0, "it": 0, "v": 2.0},
        {"method": "a", "seed": 0, "it": 5, "v": 3.0},
        {"method": "a", "seed": 0, "it": 3, "v": None},
        {"method": "b", "seed": 0, "it": 0, "v": 4.0},
    ]
    series = report.series_from_rows(rows, x="it", y="v", group="method", run="seed")
    assert list(series) == ["a", "b"]
    xs, values = series["a"]
    np.testing.assert_array_equal(xs, [0, 5])
    np.testing.assert_array_equal(values, [[2.0, 3.0], [1.0, np.nan]])
    only_b = report.series_from_rows(rows, "it", "v", "method", "seed", where={"method": "b"})
    assert list(only_b) == ["b"]


def test_plot_median_bands_draws_median_and_range(tmp_path):
    xs = np.arange(4.0)
    values = np.array([[1.0, 2.0, 3.0, np.nan], [3.0, 2.0, 1.0, np.nan], [2.0, 5.0, 2.0, np.nan]])
    path = tmp_path / "bands.png"
    ax = report.plot_median_bands(
        {"m": (xs, values)}, reference=0.5, reference_label="bound", log_y=True
    )
    line = ax.get_lines()[0]
    # The all-NaN last column is dropped; median per column of the rest.
    np.testing.assert_array_equal(line.get_xdata(), [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(line.get_ydata(), [2.0, 2.0, 2.0])
    band = ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == 1.0 and band[:, 1].max() == 5.0
    assert ax.get_yscale() == "log"
    assert ax.get_lines()[1].get_ydata()[0] == 0.5
    report.plot_median_bands({"m": (xs, values)}, path=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"values of shape \(runs, len\(x\)\)"):
        report.plot_median_bands({"m": (xs, values[:, :2])})


def test_plot_histograms_draws_densities_on_shared_bins(tmp_path):
    first, second = np.linspace(0.0, 1.0, 101), np.array([np.nan, 0.5, 0.7, 0.7])
    ax = report.plot_histograms(
        {"a": first, "b": second}, reference=1.1, reference_label="ETF", bins=10
    )
    # Shared bins from the smallest value to the reference (1.1); one step patch per series.
    edges = np.linspace(0.0, 1.1, 11)
    patches = ax.patches
    assert len(patches) == 2
    for patch, values in zip(patches, (first, second[np.isfinite(second)]), strict=True):
        vertices = patch.get_path().vertices
        expected, _ = np.histogram(values, bins=edges, density=True)
        # The step outline's horizontal segments, left to right, are the bins' tops.
        tops = [
            (start[0], end[0], start[1])
            for start, end in itertools.pairwise(vertices)
            if start[1] == end[1] and end[0] > start[0]
        ]
        np.testing.assert_allclose([top[:2] for top in tops], np.c_[edges[:-1], edges[1:]])
        np.testing.assert_allclose([top[2] for top in tops], expected, rtol=1e-12)
        assert float(np.sum(expected * np.diff(edges))) == pytest.approx(1.0)
    assert ax.get_lines()[-1].get_xdata()[0] == 1.1  # the reference line
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["a", "b", "ETF"]
    path = tmp_path / "hist.png"
    report.plot_histograms({"a": first}, path=path, bins=10)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
