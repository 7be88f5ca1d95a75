"""Tests for guided_nc.report: summaries, tables, CSV round trips, atomic writes and figures.

Truth comes from hand-made data (values whose median and range are known by construction)
and Python's ``statistics`` module.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics

import numpy as np
import pytest

from guided_nc import report


def test_summarize_matches_statistics_module():
    generator = random.Random(0)
    for size in (1, 2, 5, 6):
        values = [generator.uniform(-3, 3) for _ in range(size)]
        summary = report.summarize(values)
        assert math.isclose(summary["median"], statistics.median(values))
        assert summary["min"] == min(values) and summary["max"] == max(values)


def test_summarize_missing_values():
    # Missing values are dropped by default...
    assert report.summarize([5, None, 1, float("nan"), 3]) == {"median": 3, "min": 1, "max": 5}
    assert report.summarize([None, None]) == {"median": None, "min": None, "max": None}
    assert report.summarize([]) == {"median": None, "min": None, "max": None}
    # ... or rank above every number ("never reached within the budget").
    assert report.summarize([4, 2, None], missing="largest") == {"median": 4, "min": 2, "max": None}
    assert report.summarize([4, None, None], missing="largest") == {
        "median": None,
        "min": 4,
        "max": None,
    }
    # Even count: the median is the mean of the middle two; one of them missing -> undefined.
    assert report.summarize([1, 3, None, None], missing="largest")["median"] is None
    assert report.summarize([1, 3, 10, None], missing="largest")["median"] == 6.5


def test_summarize_keeps_integers_integral():
    summary = report.summarize([10, 30, 20])
    assert summary == {"median": 20, "min": 10, "max": 30}
    assert all(isinstance(value, int) for value in summary.values())
    assert isinstance(report.summarize([1.0, 2.0, 4.0])["median"], float)


def test_summarize_rejects_bad_input():
    with pytest.raises(ValueError, match="missing='drop'"):
        report.summarize([1, 2], missing="drop")
    with pytest.raises(TypeError, match="numbers or None"):
        report.summarize([1, "two"])


def test_format_median_range():
    assert report.format_median_range([1.0, 2.0, 4.0], fmt="{:.1f}") == "2.0 [1.0, 4.0]"
    summary = {"median": 0.5, "min": 0.25, "max": None}
    assert report.format_median_range(summary, fmt="{:.2f}") == "0.50 [0.25, n/a]"
    assert report.format_median_range([None, None], missing_text="-") == "-"
    text = report.format_median_range([7, None, 9], fmt="{:d}", missing="largest")
    assert text == "9 [7, n/a]"
    with pytest.raises(ValueError, match="missing keys"):
        report.format_median_range({"median": 1.0})


def test_markdown_table_shape():
    header = ["method", "acc", "note"]
    rows = [["standard", "1 [0, 2]", None], ["fixed", 3, "a|b"]]
    lines = report.markdown_table(header, rows).rstrip("\n").split("\n")
    assert len(lines) == 2 + len(rows)
    assert lines[1] == "|---|---|---|"
    # Every line has one cell per column: count unescaped separators.
    for line in lines:
        assert line.replace(r"\|", "").count("|") == len(header) + 1
    assert lines[3] == r"| fixed | 3 | a\|b |"
    assert lines[2] == "| standard | 1 [0, 2] |  |"
    with pytest.raises(ValueError, match=r"rows\[1\] has 2 cells but header has 3"):
        report.markdown_table(header, [rows[0], ["x", "y"]])


def test_latex_table_booktabs():
    header = ["method", "acc_1 (%)"]
    rows = [["standard", "99 [98, 100]"], ["a&b", None]]
    text = report.latex_table(header, rows, caption="Top-1 50%", label="tab:x")
    lines = text.rstrip("\n").split("\n")
    assert lines[0] == r"\begin{table}[t]" and lines[-1] == r"\end{table}"
    assert r"\caption{Top-1 50\%}" in lines and r"\label{tab:x}" in lines
    assert r"\begin{tabular}{lr}" in lines
    order = [lines.index(rule) for rule in (r"\toprule", r"\midrule", r"\bottomrule")]
    assert order == sorted(order)
    body = lines[order[1] + 1 : order[2]]
    assert body == [r"standard & 99 [98, 100] \\", r"a\&b &  \\"]
    assert lines[order[0] + 1] == r"method & acc\_1 (\%) \\"
    with pytest.raises(ValueError, match="align='lrr'"):
        report.latex_table(header, rows, align="lrr")
    with pytest.raises(ValueError, match="header is empty"):
        report.latex_table([], [])


def test_long_csv_round_trip(tmp_path):
    rows = [
        {"method": "fixed", "seed": 0, "iteration": 1, "loss": 0.1 + 0.2, "nc1": None},
        {"method": "implicit", "seed": 1, "iteration": 2, "loss": float("nan"), "nc1": 1e-12},
    ]
    path = report.write_long_csv(tmp_path / "sub" / "metrics.csv", rows)
    back = report.read_long_csv(path)
    assert back[0] == {"method": "fixed", "seed": 0, "iteration": 1, "loss": 0.1 + 0.2, "nc1": None}
    assert back[1]["loss"] is None and back[1]["nc1"] == 1e-12
    assert isinstance(back[1]["seed"], int)
    with pytest.raises(ValueError, match="not in fieldnames"):
        report.write_long_csv(tmp_path / "x.csv", rows, fieldnames=["method"])
    assert not (tmp_path / "x.csv").exists()


def test_atomic_write_leaves_no_temporary_and_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "summary.json"
    report.atomic_write_json(target, {"a": float("inf"), "b": [np.float32(1.5)]})
    assert json.loads(target.read_text()) == {"a": None, "b": [1.5]}

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        report.atomic_write_json(target, {"a": Unserialisable()})
    assert json.loads(target.read_text()) == {"a": None, "b": [1.5]}
    assert sorted(os.listdir(tmp_path)) == ["summary.json"]
    # Same permissions as a plain open() under the current umask (mkstemp would give 0600).
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


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


def test_plot_histograms_writes_png(tmp_path):
    path = tmp_path / "hist.png"
    samples = {"a": np.linspace(0, 1, 100), "b": [np.nan, 0.5, 0.7]}
    report.plot_histograms(samples, path=path, reference=1.1, bins=10)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_load_run_folders(tmp_path):
    for name, done in (("run-a", True), ("run-b", False)):
        folder = tmp_path / name
        report.write_long_csv(folder / "metrics.csv", [{"step": 1, "loss": 0.5}])
        report.atomic_write_json(folder / "config.json", {"name": name})
        if done:
            report.atomic_write_text(folder / "done", "")
    runs = report.load_run_folders(tmp_path)
    assert [run["config"]["name"] for run in runs] == ["run-a", "run-b"]
    finished = report.load_run_folders(tmp_path, marker="done")
    assert [run["path"].name for run in finished] == ["run-a"]
    assert finished[0]["rows"] == [{"step": 1, "loss": 0.5}]
    with pytest.raises(ValueError, match="is not a folder"):
        report.load_run_folders(tmp_path / "missing")
