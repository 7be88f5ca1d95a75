"""Tests for guided_nc.ufm: a tiny unconstrained-feature experiment end to end.

Independent truth: the CE bound and the convergence iterations are recomputed here from
metrics.csv with the csv and statistics modules; the initial features are checked against the
defining property of AGD's initialisation (F^T F = (N/d) I for a semi-orthogonal N x d matrix
times sqrt(N/d)); determinism by comparing the bytes of two runs.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics

import numpy as np
import pytest
import torch

from guided_nc import runfiles as report
from guided_nc import ufm
from guided_nc.cli import _demo_command, build_parser, main, ufm_configs
from guided_nc.config import PRESETS, Preset, UFMConfig, parse_preset
from guided_nc.methods import METHODS
from guided_nc.reports import ufm as ufm_report

# K=3, N=24, d=6 with tau=2: every method reaches 100 % accuracy and the CE bound within ~25
# full-batch AGD steps, so both convergence counts are exercised with real numbers.
TINY = parse_preset("3:24:6")
TINY_CONFIG = UFMConfig(preset=TINY, seeds=(0, 1), iterations=30, eval_interval=10, temperature=2.0)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ufm")
    assert ufm.run_preset(TINY_CONFIG, out, progress=False) == out
    assert ufm_report.build_report(out) == out / "report.md"
    return out


def _read_csv(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def _median_never_last(values):
    """Median with None ranked above every number ("never" = beyond the run); None if it lands
    on a None."""
    ranked = [math.inf if value is None else value for value in values]
    middle = statistics.median(ranked)
    return None if math.isinf(middle) else middle


def test_every_output_file_with_structure(tiny_run):
    for name in ("config.json", "metrics.csv", "timings.csv", "final_margins.npz", "report.md"):
        assert (tiny_run / name).is_file(), name
    for stem, *_ in ufm_report.FIGURES:
        assert (tiny_run / f"{stem}.png").read_bytes()[:8] == PNG
    for name in ("overview.png", "margin_distribution.png"):
        assert (tiny_run / name).read_bytes()[:8] == PNG
    # report.md links only figures that exist.
    text = (tiny_run / "report.md").read_text()
    for line in text.splitlines():
        if line.startswith("!["):
            assert (tiny_run / line.split("(")[-1].rstrip(")")).is_file()

    rows = _read_csv(tiny_run / "metrics.csv")
    assert list(rows[0]) == list(ufm.METRICS_FIELDS)
    iterations = TINY_CONFIG.iterations
    assert len(rows) == len(METHODS) * 2 * (iterations + 1)
    evaluated = set(ufm.evaluation_iterations(iterations, TINY_CONFIG.eval_interval))
    assert evaluated == {0, 1, 2, 5, 10, 20, 30}
    for row in rows:
        assert row["loss"] != "" and row["acc1"] != ""
        has_collapse = row["nc1"] != ""
        assert has_collapse == (int(row["iteration"]) in evaluated)
    timings = _read_csv(tiny_run / "timings.csv")
    assert len(timings) == len(METHODS) * 2 * iterations
    assert all(float(row["step_seconds"]) > 0 for row in timings)

    with np.load(tiny_run / "final_margins.npz") as archive:
        assert sorted(archive.files) == sorted(f"{m}/{s}" for m in METHODS for s in (0, 1))
        assert all(archive[key].shape == (TINY.num_samples,) for key in archive.files)

    summary = json.loads((tiny_run / "summary.json").read_text())
    assert set(summary["methods"]) == set(METHODS)
    for data in summary["methods"].values():
        for key in ("iters_to_full_acc", "iters_to_bound", "seconds_per_iteration"):
            assert set(data[key]) == {"median", "min", "max"}
        assert set(data["final"]) >= {"loss", "acc1", "nc1", "nc2_w", "nc3", "margin_mean"}
        assert all(set(value) == {"median", "min", "max"} for value in data["final"].values())


def test_summary_agrees_with_metrics_csv(tiny_run):
    tau, classes = TINY_CONFIG.temperature, TINY.num_classes
    bound = math.log(1 + (classes - 1) * math.exp(-tau * classes / (classes - 1)))
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["ce_lower_bound"] == pytest.approx(bound, rel=1e-12)
    rows = _read_csv(tiny_run / "metrics.csv")
    for method in METHODS:
        to_accuracy, to_bound, final_nc1 = [], [], []
        for seed in ("0", "1"):
            mine = sorted(
                (r for r in rows if r["method"] == method and r["seed"] == seed),
                key=lambda r: int(r["iteration"]),
            )
            to_accuracy.append(
                next((int(r["iteration"]) for r in mine if float(r["acc1"]) == 100.0), None)
            )
            to_bound.append(
                next((int(r["iteration"]) for r in mine if float(r["loss"]) <= 1.01 * bound), None)
            )
            final_nc1.append(float(mine[-1]["nc1"]))
        data = summary["methods"][method]
        assert data["per_seed"]["iters_to_full_acc"] == to_accuracy
        assert data["per_seed"]["iters_to_bound"] == to_bound
        assert None not in to_bound  # the tiny problem is chosen so that every run gets there
        for key, values in (("iters_to_full_acc", to_accuracy), ("iters_to_bound", to_bound)):
            assert data[key]["median"] == _median_never_last(values)
            assert data[key]["min"] == min(values) and data[key]["max"] == max(values)
        assert data["final"]["nc1"]["median"] == pytest.approx(statistics.median(final_nc1))
        assert data["final"]["nc1"]["max"] == max(final_nc1)


def test_summarize_metrics_never_reached():
    def rows(seed, accuracies, losses):
        return [
            {"method": "fixed", "seed": seed, "iteration": i, "acc1": a, "loss": l}
            for i, (a, l) in enumerate(zip(accuracies, losses, strict=True))
        ]

    metrics = (
        rows(0, [50, 100, 100], [1.0, 0.5, 0.0])
        + rows(1, [50, 90, 100], [1.0, 0.9, 0.8])
        + rows(2, [90, 95, 99], [1.0, 0.9, 0.8])
    )
    summary = ufm_report.summarize_metrics(metrics, [], num_classes=3, temperature=2.0)
    data = summary["methods"]["fixed"]
    assert data["per_seed"]["iters_to_full_acc"] == [1, 2, None]
    assert data["iters_to_full_acc"] == {"median": 2, "min": 1, "max": None}
    assert data["per_seed"]["iters_to_bound"] == [2, None, None]
    assert data["iters_to_bound"] == {"median": None, "min": 2, "max": None}
    assert data["reached_full_acc"] == 2 and data["reached_bound"] == 1


def test_same_seed_gives_identical_metrics_csv(tmp_path):
    config = UFMConfig(preset=TINY, seeds=(3,), iterations=8, eval_interval=4, batch_size=12)
    paths = []
    for attempt, seed in enumerate((3, 3, 4)):
        rows, _, _ = ufm.train_run(config, "implicit", seed)
        paths.append(report.write_long_csv(tmp_path / f"{attempt}.csv", rows, ufm.METRICS_FIELDS))
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()


def test_methods_share_initial_features_and_batches(tiny_run, monkeypatch):
    preset = parse_preset("3:30:5")
    features, labels = ufm.initial_features(preset, 7)
    # AGD's init: semi-orthogonal times sqrt(N/d)  <=>  F^T F = (N/d) I_d (N >= d).
    gram = features.double().T @ features.double()
    expected = preset.num_samples / preset.num_features * torch.eye(preset.num_features).double()
    torch.testing.assert_close(gram, expected, atol=1e-5, rtol=0)
    assert torch.bincount(labels).tolist() == [10, 10, 10]
    again, _ = ufm.initial_features(preset, 7)
    assert torch.equal(features, again)
    assert not torch.allclose(features, ufm.initial_features(preset, 8)[0])

    # Iteration 0 (before any step): feature-only metrics are identical across methods.
    rows = _read_csv(tiny_run / "metrics.csv")
    for seed in ("0", "1"):
        initial = [r for r in rows if r["seed"] == seed and r["iteration"] == "0"]
        assert len(initial) == len(METHODS)
        for key in ("nc1", "nc2_h", "cv_h", "etf_distance"):
            assert len({r[key] for r in initial}) == 1, key
    seeds_differ = {r["nc1"] for r in rows if r["iteration"] == "0"}
    assert len(seeds_differ) == 2

    # Minibatches: every method's training steps see the same batches for a seed (recorded where
    # the features are looked up, so any method-dependent batching would show).
    from guided_nc.methods import METHOD_VARIANTS
    from guided_nc.models import FreeFeatures

    real_forward = FreeFeatures.forward
    seen: dict[str, list] = {}

    def recording(self, index=None):
        if index is not None:  # training steps; evaluation asks for all N features
            seen.setdefault(current[0], []).append(index.clone())
        return real_forward(self, index)

    monkeypatch.setattr(FreeFeatures, "forward", recording)
    config = UFMConfig(preset=TINY, seeds=(5,), iterations=5, eval_interval=5, batch_size=6)
    current = [None]
    for method in METHOD_VARIANTS:
        current[0] = method
        ufm.train_run(config, method, 5)
    logs = list(seen.values())
    assert list(seen) == list(METHOD_VARIANTS) and all(len(log) == 5 for log in logs)
    for log in logs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(logs[0], log, strict=True))
    assert not all(torch.equal(logs[0][0], batch) for batch in logs[0][1:])  # batches differ
    # Each batch is stratified: every class present (B=6 >= K=3).
    labels = torch.arange(TINY.num_samples) % TINY.num_classes
    assert all(set(labels[index].tolist()) == {0, 1, 2} for index in logs[0][:5])


def test_rerun_resumes_and_report_rebuilds_from_files(tiny_run, monkeypatch):
    before = (tiny_run / "summary.json").read_text()

    def must_not_train(*args, **kwargs):
        raise AssertionError("finished runs must not be trained again")

    monkeypatch.setattr(ufm, "train_run", must_not_train)
    for name in ("summary.json", "report.md", "loss.png", "metrics.csv"):
        (tiny_run / name).unlink()
    ufm.run_preset(TINY_CONFIG, tiny_run, progress=False)  # every run is finished: no training
    ufm_report.build_report(tiny_run)  # merges the run folders, rebuilds from files only
    assert (tiny_run / "summary.json").read_text() == before
    assert (tiny_run / "loss.png").read_bytes()[:8] == PNG

    changed = UFMConfig(preset=TINY, seeds=(0,), iterations=31, eval_interval=10, temperature=2.0)
    with pytest.raises(ValueError, match="different configuration"):
        ufm.run_preset(changed, tiny_run, progress=False)


def test_one_call_per_seed_into_one_folder_equals_one_call(tiny_run, tmp_path):
    """As parallel processes would: each call writes config.json with its own seeds."""
    for seed in (1, 0):
        ufm.run_preset(dataclasses.replace(TINY_CONFIG, seeds=(seed,)), tmp_path, progress=False)
    ufm_report.build_report(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["config"]
    assert saved["seeds"] == [0, 1] and saved["methods"] == list(METHODS)
    assert (tmp_path / "metrics.csv").read_text() == (tiny_run / "metrics.csv").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(data["seeds"] == [0, 1] for data in summary["methods"].values())


def test_scaling_report(tiny_run, tmp_path):
    other = UFMConfig(
        preset=parse_preset("4:16:4"),
        methods=("standard", "implicit"),
        seeds=(0,),
        iterations=6,
        eval_interval=3,
        temperature=2.0,
    )
    ufm.run_preset(other, tmp_path / "small", progress=False)
    ufm_report.build_report(tmp_path / "small")
    path = ufm_report.build_scaling_report(tmp_path, [tiny_run, tmp_path / "small"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["presets"]) == [TINY.name, "ufm-4x16x4"]  # sorted by K
    assert "fixed" not in summary["presets"]["ufm-4x16x4"]["methods"]
    assert (tmp_path / "convergence_vs_classes.png").read_bytes()[:8] == PNG
    text = path.read_text()
    assert TINY.name in text and "ufm-4x16x4" in text


def _parser():
    return build_parser()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ufm", "--preset", "ufm-7"], r"preset='ufm-7' is not known; use one of"),
        (["ufm", "--preset", "ufm-10,2:1:4"], r"needs K >= 2, N >= K and d >= K"),
        (["ufm", "--methods", "standard,foo"], r"contains unknown \['foo'\]"),
        (["ufm", "--seeds", "0"], r"--seeds: 0 must be >= 1"),
        (["ufm", "--batch-size", "x"], r"--batch-size: 'x' is not an integer"),
    ],
)
def test_cli_parse_errors_are_clear(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        _parser().parse_args(argv)
    assert error.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_cli_defaults():
    args = _parser().parse_args(["ufm"])
    configs = ufm_configs(args)
    assert len(configs) == 1
    config = configs[0]
    assert config.preset == PRESETS["ufm-10"] and config.methods == METHODS
    assert config.seeds == (0, 1, 2, 3, 4) and config.iterations == 2000
    assert config.optimizer == "agd" and config.gain == 10.0 and config.full_batch
    args = _parser().parse_args(["ufm", "--preset", "ufm-100,ufm-200", "--no-ddn-grad"])
    assert [c.preset.num_classes for c in ufm_configs(args)] == [100, 200]
    assert not ufm_configs(args)[0].ddn_grad
    demo = _parser().parse_args(["demo"])
    assert demo.func is _demo_command and demo.out == "runs/demo" and demo.threads == 1


def test_measure_step_times_interleaves_every_variant():
    config = UFMConfig(preset=TINY, methods=("standard", "implicit"), seeds=(2,))
    times = ufm.measure_step_times(config, steps=3, warmup=1)
    assert list(times) == ["standard", "implicit", "implicit-no-ddn"]
    assert all(len(values) == 3 and min(values) > 0 for values in times.values())


def test_ufm_command_reports_bad_config(tmp_path, capsys):
    code = main(["ufm", "--preset", "3:6:3", "--batch-size", "7", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "guided-nc ufm: error: batch_size=7 exceeds N=6" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"methods": ("standard", "nope")}, r"contains unknown \['nope'\]"),
        ({"methods": ()}, "methods is empty"),
        ({"seeds": (1, 1)}, "must be non-empty and distinct"),
        ({"iterations": 0}, "iterations=0 must be an integer >= 1"),
        ({"batch_size": 25}, "batch_size=25 exceeds N=24"),
        ({"schedule": "step"}, "schedule='step' is not one of \\['none', 'cosine'\\]"),
        ({"temperature": 0.0}, r"temperature=0.0 must be a finite number > 0"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UFMConfig(preset=TINY, **kwargs)


def test_parse_preset():
    assert parse_preset("ufm-1000") == Preset("ufm-1000", 1000, 10000, 1024)
    assert parse_preset("5:50:7") == Preset("ufm-5x50x7", 5, 50, 7)
    with pytest.raises(ValueError, match="needs K >= 2, N >= K and d >= K"):
        parse_preset("4:40:3")
