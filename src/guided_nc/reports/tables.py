"""Median [range] summaries and paste-ready tables (markdown, booktabs LaTeX).

Generic: nothing here knows about neural collapse. Conventions: a *summary* is
``{"median": m, "min": lo, "max": hi}`` over runs (seeds), see :func:`summarize`; missing values
are ``None`` or NaN. LaTeX tables need ``\\usepackage{booktabs}`` in the document.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "format_median_range",
    "is_missing",
    "latex_escape",
    "latex_table",
    "markdown_table",
    "summarize",
]

_MISSING_MODES = ("ignore", "largest")


def is_missing(value: Any) -> bool:
    """Whether a cell is missing: ``None`` or NaN."""
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
        if not is_missing(value) and not isinstance(value, (int, float, np.number)):
            raise TypeError(
                f"summarize needs numbers or None, got {value!r} ({type(value).__name__})"
            )
    present = [float(value) for value in values if not is_missing(value)]
    if missing == "largest":
        present += [math.inf] * (len(values) - len(present))
    if not present:
        return {"median": None, "min": None, "max": None}
    array = np.asarray(present, dtype=np.float64)
    result = {"median": np.median(array), "min": array.min(), "max": array.max()}
    all_integers = all(
        isinstance(value, (int, np.integer)) for value in values if not is_missing(value)
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
        return missing_text if is_missing(value) else fmt.format(value)

    if all(is_missing(summary[key]) for key in ("median", "min", "max")):
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
        cells.append(["" if is_missing(cell) else str(cell) for cell in row])
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
