"""Tests for guided_nc.reports.tables: median [range] summaries and markdown / LaTeX tables.

Truth comes from hand-made data (values whose median and range are known by construction)
and Python's ``statistics`` module.
"""

from __future__ import annotations

import math
import random
import statistics

import pytest

from guided_nc.reports import tables as report


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
