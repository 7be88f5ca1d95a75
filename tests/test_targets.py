"""Time to target, spread across seeds and the ETF-margin fraction, on hand-made numbers.

Every expected value below is worked out by hand from the rows written in the test.
"""

from __future__ import annotations

import numpy as np
import pytest

from guided_nc.reports.compare import _targets_table
from guided_nc.reports.targets import (
    cumulative_seconds,
    etf_margin_fraction,
    first_reached,
    spread_at,
)
from guided_nc.reports.ufm import summarize_metrics


def test_first_reached_and_cumulative_seconds():
    rows = [
        {"iteration": 3, "acc1": 100.0},
        {"iteration": 1, "acc1": 50.0},
        {"iteration": 2, "acc1": None},
        {"iteration": 4, "acc1": 100.0},
    ]
    assert first_reached(rows, lambda row: row["acc1"] >= 100.0) == 3
    assert first_reached(rows, lambda row: row["acc1"] >= 101.0) is None
    assert cumulative_seconds({2: 0.25, 1: 0.5, 3: 1.0}) == {1: 0.5, 2: 0.75, 3: 1.75}


def test_spread_and_margin_fraction():
    expected = {"min": 0.25, "max": 1.0, "width": 0.75, "ratio": 4.0}
    assert spread_at([0.5, None, 0.25, 1.0]) == expected
    assert spread_at([None]) == {"min": None, "max": None, "width": None, "ratio": None}
    assert spread_at([0.0, 1.0])["ratio"] is None
    etf = 4 / 3  # K = 4
    margins = np.array([etf, 0.995 * etf, 0.98 * etf, -1.0, np.nan])
    assert etf_margin_fraction(margins, 4) == pytest.approx(2 / 5)
    assert np.isnan(etf_margin_fraction(np.array([]), 4))


def test_ufm_seconds_to_target_from_hand_made_metrics_and_timings():
    # K = 2, tau = 1: L* = log(1 + exp(-2)) = 0.126928; 1.01 L* = 0.128197.
    def run(seed, accuracies, losses, steps):
        rows = [
            {"method": "implicit", "seed": seed, "iteration": i, "acc1": a, "loss": l}
            for i, (a, l) in enumerate(zip(accuracies, losses, strict=True))
        ]
        for row in rows:  # NC1 at the even iterations only, 1 / (iteration + 1)
            row["nc1"] = 1.0 / (row["iteration"] + 1) if row["iteration"] % 2 == 0 else None
        timings = [
            {"method": "implicit", "seed": seed, "iteration": i, "step_seconds": s}
            for i, s in enumerate(steps, start=1)
        ]
        return rows, timings

    rows_a, times_a = run(0, [50, 100, 100, 100], [1.0, 0.5, 0.128, 0.127], [0.5, 0.25, 0.25])
    rows_b, times_b = run(1, [50, 90, 100, 100], [1.0, 0.9, 0.8, 0.7], [1.0, 1.0, 1.0])
    summary = summarize_metrics(rows_a + rows_b, times_a + times_b, 2, 1.0)
    data = summary["methods"]["implicit"]
    assert data["per_seed"]["iters_to_full_acc"] == [1, 2]
    assert data["per_seed"]["seconds_to_full_acc"] == [0.5, 2.0]  # 0.5; 1.0 + 1.0
    assert data["per_seed"]["iters_to_bound"] == [2, None]  # 0.128 <= 0.128197
    assert data["per_seed"]["seconds_to_bound"] == [0.75, None]
    assert data["seconds_to_bound"] == {"median": None, "min": 0.75, "max": None}
    # Spread at iteration 1 and at the last (3): losses [0.5, 0.9] and [0.127, 0.7]; NC1 at
    # the last evaluation at or before each: iteration 0 (1.0) and iteration 2 (1/3).
    spread = data["spread"]
    assert list(spread) == ["1", "3"]
    assert spread["1"]["loss"]["width"] == pytest.approx(0.4)
    assert spread["3"]["loss"]["min"] == 0.127 and spread["3"]["loss"]["max"] == 0.7
    assert spread["1"]["nc1"]["min"] == 1.0 and spread["1"]["nc1_iterations"] == [0]
    assert spread["3"]["nc1"]["max"] == pytest.approx(1 / 3)


def test_compare_steps_and_seconds_to_target_from_hand_made_runs():
    def run(method, seed, train, test, epoch_seconds):
        return {
            "method": method,
            "seed": seed,
            "rows": [
                {"epoch": e, "train_acc1": a, "test_acc1": t}
                for e, (a, t) in enumerate(zip(train, test, strict=True), start=1)
            ],
            "summary": {
                "steps_per_epoch": 10,
                "per_epoch": [
                    {"epoch": e, "epoch_time_s": s} for e, s in enumerate(epoch_seconds, start=1)
                ],
            },
        }

    runs = [
        run("standard", 0, [90, 96, 99.5], [80, 85, 86], [1.0, 1.0, 1.0]),
        run("implicit", 0, [96, 98, 99.0], [84, 86, 87], [2.0, 2.0, 2.0]),
        run("implicit", 1, [93, 97, 98.0], [83, 85, 85], [2.0, 3.0, 3.0]),
    ]
    header, rows = _targets_table(runs, ["standard", "implicit"])
    # The test bar: median of the runs' best test top-1 (86, 87, 85) minus 0.5 = 85.5 %.
    titles = ["train top-1 >= 95 %", "train top-1 >= 99 %", "test top-1 >= 85.50 %"]
    assert header == ["method"] + [
        f"{what} to {t}" for t in titles for what in ("steps", "seconds")
    ]
    standard, implicit = rows
    expected = ["20 [20, 20]", "2 [2, 2]", "30 [30, 30]", "3 [3, 3]", "30 [30, 30]", "3 [3, 3]"]
    assert standard[1:] == expected
    # implicit: 95 % at epochs 1 and 2 (10, 20 steps; 2 s, 5 s); 99 % only seed 0 at epoch 3
    # (median lands on "never"); 85.5 % test: seed 0 at epoch 2 (4 s), seed 1 never.
    assert implicit[1:3] == ["15 [10, 20]", "3.5 [2, 5]"]
    assert implicit[3:5] == ["never [30, never]", "never [6, never]"]
    assert implicit[5:7] == ["never [20, never]", "never [4, never]"]
