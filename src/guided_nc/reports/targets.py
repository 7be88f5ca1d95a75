"""Time to a target and spread across seeds: the arithmetic behind the reports' speed tables.

The paper's argument is speed, so the reports count, per run, the steps *and* the training
seconds until a target is first met (100 % train accuracy, loss <= 1.01 L*, 95 % top-1, ...).
The seconds are the run's own measured step times (training steps only, no evaluation), summed
up to that point, so they include each head's per-step cost from the same run.

Pure functions of long-format rows; :mod:`guided_nc.reports.ufm` and
:mod:`guided_nc.reports.compare` call them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "cumulative_seconds",
    "etf_margin_fraction",
    "first_reached",
    "seconds_at_step_cost",
    "spread_at",
]

Row = Mapping[str, Any]


def first_reached(
    rows: Sequence[Row], predicate: Callable[[Row], bool], position: str = "iteration"
) -> int | None:
    """The smallest ``row[position]`` whose row satisfies ``predicate`` (None: never).

    Rows whose tested values are missing (``None``) never satisfy it.

    >>> first_reached([{"iteration": 2, "acc1": 100.0}, {"iteration": 1, "acc1": 90.0}],
    ...               lambda row: row["acc1"] >= 100.0)
    2
    """
    for row in sorted(rows, key=lambda row: row[position]):
        try:
            if predicate(row):
                return int(row[position])
        except TypeError:  # a missing value (None) compared with a number
            continue
    return None


def cumulative_seconds(step_seconds: Mapping[int, float]) -> dict[int, float]:
    """``{t: seconds of steps 1..t}`` from the seconds of each step (or epoch) ``t``.

    >>> cumulative_seconds({1: 0.5, 2: 0.25, 3: 0.25})
    {1: 0.5, 2: 0.75, 3: 1.0}
    """
    ordered = sorted(step_seconds.items())
    totals = itertools.accumulate(seconds for _, seconds in ordered)
    return {position: float(total) for (position, _), total in zip(ordered, totals, strict=True)}


def seconds_at_step_cost(
    counts: Sequence[int | None], seconds_per_step: float | None
) -> list[float | None]:
    """Steps to a target times one step's cost (an interleaved measurement): seconds that do not
    depend on how loaded the machine was while each run trained. None where the target was never
    met or the step was not timed.

    >>> seconds_at_step_cost([10, None, 4], 0.5)
    [5.0, None, 2.0]
    """
    return [
        None if count is None or seconds_per_step is None else count * seconds_per_step
        for count in counts
    ]


def spread_at(values: Sequence[float | None]) -> dict[str, float | None]:
    """The spread of one quantity across seeds: ``min``, ``max``, ``width = max - min`` and
    ``ratio = max / min`` (for positive values on a log scale, e.g. NC1); None if no value."""
    present = [float(value) for value in values if value is not None]
    if not present:
        return {"min": None, "max": None, "width": None, "ratio": None}
    low, high = min(present), max(present)
    return {
        "min": low,
        "max": high,
        "width": high - low,
        "ratio": high / low if low > 0 else None,
    }


def etf_margin_fraction(margins: np.ndarray, num_classes: int, tolerance: float = 0.01) -> float:
    """Fraction of samples whose cosine margin is within ``tolerance`` of the simplex-ETF value.

    The ETF margin is K/(K-1) (method.md section 6), the largest a margin can be; a sample
    counts when ``margin >= (1 - tolerance) K/(K-1)`` (paper Fig. 15c). NaN margins do not count.

    >>> etf_margin_fraction(np.array([10 / 9, 1.1, 0.5, 1.0]), 10)
    0.5
    """
    margins = np.asarray(margins, dtype=np.float64)
    if margins.size == 0:
        return float("nan")
    threshold = (1.0 - tolerance) * num_classes / (num_classes - 1)
    return float(np.mean(margins >= threshold))
