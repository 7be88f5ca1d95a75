"""Reports rebuild from run folders written by guided-nc 0.1 (DomainBed's collect_results test).

``tests/data/ufm-v0.1`` and ``tests/data/compare-v0.1`` are tiny experiments that version 0.1
wrote (a UFM on K=4, N=40, d=8 for 6 iterations; a digits/MLP comparison for 2 epochs), one
seed each. A change of a file format that breaks old runs fails here. Truth: the runs' own CSV
files, read with the csv module, and the formulas of the tables (recomputed here).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest

from guided_nc.reports.compare import write_report
from guided_nc.reports.ufm import build_report

DATA = Path(__file__).parent / "data"
METHODS = ("standard", "fixed", "implicit")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def test_the_ufm_report_rebuilds_from_a_v01_folder(tmp_path):
    folder = tmp_path / "ufm"
    shutil.copytree(DATA / "ufm-v0.1", folder)
    report = build_report(folder)
    assert report == folder / "report.md" and (folder / "overview.png").stat().st_size > 1000

    # The merged metrics.csv is the runs' rows, method by method.
    merged = _rows(folder / "metrics.csv")
    expected = [
        row for m in METHODS for row in _rows(folder / "runs" / f"{m}-seed0" / "metrics.csv")
    ]
    assert merged == expected

    # Iterations to 100 % accuracy and to 1.01 L*, recomputed from each run's own rows.
    saved = json.loads((folder / "config.json").read_text())["config"]
    classes, tau = saved["preset"]["num_classes"], saved["temperature"]
    bound = math.log(1 + (classes - 1) * math.exp(-tau * classes / (classes - 1)))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["config"]["seeds"] == [0] and summary["config"]["methods"] == list(METHODS)
    assert summary["ce_lower_bound"] == pytest.approx(bound, rel=1e-12)
    text = report.read_text()
    for method in METHODS:
        rows = _rows(folder / "runs" / f"{method}-seed0" / "metrics.csv")
        first = next((int(r["iteration"]) for r in rows if float(r["acc1"]) >= 100.0), None)
        reached = (int(r["iteration"]) for r in rows if float(r["loss"]) <= 1.01 * bound)
        to_bound = next(reached, None)
        data = summary["methods"][method]
        assert data["per_seed"]["iters_to_full_acc"] == [first]
        assert data["per_seed"]["iters_to_bound"] == [to_bound]
        assert data["final"]["loss"]["median"] == float(rows[-1]["loss"])
        assert data["final"]["nc1"]["median"] == float(rows[-1]["nc1"])
    assert "## Convergence" in text and "Implicit ETF" in text


def test_the_comparison_report_rebuilds_from_a_v01_folder(tmp_path):
    folder = tmp_path / "compare"
    shutil.copytree(DATA / "compare-v0.1", folder)
    report = write_report(folder, table_epochs=(1, 2))
    text = report.read_text()
    labels = {"standard": "Standard", "fixed": "Fixed ETF", "implicit": "Implicit ETF"}
    for method, label in labels.items():
        rows = {
            int(r["epoch"]): r for r in _rows(folder / "runs" / method / "seed0" / "metrics.csv")
        }
        line = next(line for line in text.splitlines() if line.startswith(f"| {label} | 1 |"))
        for split in ("train", "test"):
            for epoch in (1, 2):
                value = float(rows[epoch][f"{split}_acc1"])  # one seed: median = min = max
                assert f"{value:.2f} [{value:.2f}, {value:.2f}]" in line, (method, split, epoch)
    timing = json.loads((folder / "timing.json").read_text())["heads"]
    overhead = timing["implicit"]["overhead_percent"]
    assert f"{overhead:+.1f} %" in text
    # Accuracy, NC (train), NC (test), time to target, cost: five booktabs tables.
    assert (folder / "tables.tex").read_text().count(r"\toprule") == 5
    # Time to target: steps = first epoch with train top-1 >= 95 % x steps per epoch, seconds =
    # the run's epoch times summed to it (summary.json); "never" when no epoch gets there.
    section = text.split("### Time to target")[1].split("###")[0]
    for method, label in labels.items():
        run = folder / "runs" / method / "seed0"
        rows = _rows(run / "metrics.csv")
        summary = json.loads((run / "summary.json").read_text())
        epoch = next((int(r["epoch"]) for r in rows if float(r["train_acc1"]) >= 95.0), None)
        line = next(x for x in section.splitlines() if x.startswith(f"| {label} |"))
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if epoch is None:
            assert cells[1] == cells[2] == "never"
        else:
            steps = epoch * summary["steps_per_epoch"]
            seconds = sum(e["epoch_time_s"] for e in summary["per_epoch"] if e["epoch"] <= epoch)
            assert cells[1] == f"{steps} [{steps}, {steps}]"
            assert cells[2] == f"{seconds:.3g} [{seconds:.3g}, {seconds:.3g}]"
    # The NC tables: NC1 at each table epoch, per split, from the run's own rows.
    for method, label in labels.items():
        rows = {
            int(r["epoch"]): r for r in _rows(folder / "runs" / method / "seed0" / "metrics.csv")
        }
        for split in ("train", "test"):
            section = text.split(f"### NC metrics, {split} split")[1].split("###")[0]
            for epoch in (1, 2):
                value = float(rows[epoch][f"{split}_nc1"])
                line = next(
                    x for x in section.splitlines() if x.startswith(f"| {label} | {epoch} |")
                )
                assert f"{value:.3g} [{value:.3g}, {value:.3g}]" in line, (method, split, epoch)
    assert (folder / "figures" / "nc_metrics_test.png").stat().st_size > 1000
    assert (folder / "figures" / "accuracy.png").stat().st_size > 1000


def test_interleaved_seconds_are_iterations_times_the_interleaved_step_time(tmp_path):
    folder = tmp_path / "ufm"
    shutil.copytree(DATA / "ufm-v0.1", folder)
    medians = {"standard": 0.5, "fixed": 0.25, "implicit": 2.0}
    (folder / "step_times.json").write_text(
        json.dumps(
            {
                "steps": 3,
                "median_seconds": medians,
                "seconds": {},
                "environment": {"torch_threads": 1},
            }
        )
    )
    summary = json.loads((build_report(folder).parent / "summary.json").read_text())
    for method, cost in medians.items():
        data = summary["methods"][method]
        for target in ("full_acc", "bound"):
            iterations = data["per_seed"][f"iters_to_{target}"]
            expected = [None if i is None else i * cost for i in iterations]
            assert data["per_seed"][f"interleaved_seconds_to_{target}"] == expected
    assert "interleaved seconds to bound" in (folder / "report.md").read_text()
