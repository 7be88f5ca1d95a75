"""Multi-seed comparison: runs write files, the report only reads them, finished runs skip."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest

from guided_nc import compare as compare_module
from guided_nc import train as train_module
from guided_nc.cli import main
from guided_nc.compare import run_comparison
from guided_nc.config import TrainConfig
from guided_nc.reports.compare import write_report
from guided_nc.runfiles import read_long_csv, run_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


BASE = TrainConfig(
    dataset="digits",
    model="mlp",
    width=16,
    depth=1,
    epochs=2,
    batch_size=100,
    eval_epochs=(1,),
    progress=False,
)
METHODS = ("standard", "fixed", "implicit")


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    assert run_comparison(BASE, methods=METHODS, seeds=(0, 1), out=out, timing_repeats=1) == out
    return out, write_report(out)


def test_comparison_writes_tables_figures_and_report(comparison):
    out, report = comparison
    assert report == out / "report.md"
    for name in ("tables.md", "tables.tex", "timing.json", "figures/accuracy.png"):
        assert (out / name).is_file(), name
    assert (out / "figures" / "nc_metrics.png").stat().st_size > 1000
    text = report.read_text()
    assert "![accuracy](figures/accuracy.png)" in text
    # Table cells are median [min, max] over seeds of the runs' own metrics.csv files.
    for method, label in (("standard", "Standard"), ("implicit", "Implicit ETF")):
        for split in ("train", "test"):
            values = [
                read_long_csv(run_folder(out, method, seed) / "metrics.csv")[-1][f"{split}_acc1"]
                for seed in (0, 1)
            ]
            cell = f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"
            row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
            assert cell in row, (method, split, cell, row)
    tex = (out / "tables.tex").read_text()
    assert r"\begin{tabular}" in tex and "Implicit ETF" in tex
    # Table 3 layout: with and without the DDN gradient, and the cost relative to standard.
    assert "Implicit ETF, no DDN gradient" in text and "vs standard" in text


@pytest.fixture
def fit_calls(monkeypatch) -> list[TrainConfig]:
    """The configs that compare passes to train.fit, in order (fit still runs)."""
    calls = []
    real_fit = train_module.fit

    def recording_fit(config):
        calls.append(config)
        return real_fit(config)

    monkeypatch.setattr(train_module, "fit", recording_fit)
    return calls


def test_finished_runs_are_skipped_and_interrupted_ones_resumed(comparison, fit_calls):
    out, _ = comparison
    calls = fit_calls
    run_comparison(BASE, methods=METHODS, seeds=(0, 1), out=out, timing_repeats=1)
    assert calls == []  # every run has its done marker
    folder = run_folder(out, "fixed", 1)
    before = (folder / "metrics.csv").read_text()
    (folder / "done").unlink()  # as if killed after its last checkpoint
    run_comparison(BASE, methods=METHODS, seeds=(0, 1), out=out, timing_repeats=1)
    assert [(c.method, c.seed, c.resume) for c in calls] == [("fixed", 1, True)]
    assert (folder / "done").exists() and (folder / "metrics.csv").read_text() == before


def test_a_longer_epochs_extends_finished_runs(comparison, tmp_path, fit_calls):
    out = tmp_path / "copy"
    shutil.copytree(comparison[0], out)
    calls = fit_calls
    longer = TrainConfig(**{**BASE.to_dict(), "epochs": 3})
    run_comparison(longer, methods=("standard",), seeds=(0,), out=out, timing_repeats=0)
    assert [(c.method, c.seed, c.resume, c.epochs) for c in calls] == [("standard", 0, True, 3)]
    rows = read_long_csv(run_folder(out, "standard", 0) / "metrics.csv")
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert (run_folder(out, "standard", 0) / "done").exists()


def test_cost_table_measures_every_head_whatever_methods_trains(tmp_path):
    one_epoch = TrainConfig(**{**BASE.to_dict(), "epochs": 1})
    run_comparison(one_epoch, methods=("fixed",), seeds=(0,), out=tmp_path, timing_repeats=1)
    timing = json.loads((tmp_path / "timing.json").read_text())
    assert sorted(timing["heads"]) == [
        "fixed",
        "fixed-haar",
        "implicit",
        "implicit-no-ddn",
        "standard",
    ]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["fixed"]


def test_report_is_rebuilt_from_files_only(comparison, tmp_path, monkeypatch):
    out, _ = comparison
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for path in (copy / "report.md", copy / "tables.md"):
        path.unlink()

    def no_training(config):
        raise AssertionError("the report must not train")

    monkeypatch.setattr(train_module, "fit", no_training)
    assert main(["compare", "--out", str(copy), "--report-only"]) == 0
    assert (copy / "report.md").read_text() == (out / "report.md").read_text()


def test_report_without_finished_runs_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"no finished run .* without --report-only first"):
        write_report(tmp_path)


def test_bad_methods_are_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"methods=\['learned'\] must be a non-empty subset"):
        run_comparison(BASE, methods=("learned",), out=tmp_path)


def test_compare_cli_trains_methods_times_seeds(tmp_path, monkeypatch):
    configs = []

    def fake_fit(config):  # the CLI's job is to build the right configurations
        configs.append(config)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "fit", fake_fit)
    monkeypatch.setattr(compare_module, "measure_heads", lambda *a, **k: {})
    with pytest.raises(KeyboardInterrupt):
        main(
            "compare --dataset digits --model mlp --methods implicit --seeds 2 --first-seed 3 "
            f"--epochs 4 --eval-epochs 2 --out {tmp_path} --no-progress".split()
        )
    (config,) = configs
    assert (config.method, config.seed, config.epochs, config.eval_epochs) == (
        "implicit",
        3,
        4,
        (2,),
    )
    assert config.out == str(run_folder(tmp_path, "implicit", 3)) and config.resume is False
