"""The one-shot device check runs on the CPU as a dry run (as CI runs it), so it cannot rot.

Truth: the check's own comparison against the CPU float64 solve must pass for every route and
head, and the 1-process torchrun must have joined a real process group (gloo on a CPU).
"""

from __future__ import annotations

import json

import pytest

from guided_nc.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_device_check_dry_run_on_the_cpu(tmp_path, capsys):
    code = main(
        [
            "bench",
            "device",
            "--device",
            "cpu",
            "--dry-run",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert code == 0, report
    routes = {(row["route"], row["compute_dtype"]) for row in report["routes"]}
    assert routes == {
        (r, d) for r in ("gram", "svd", "newton-schulz") for d in ("float64", "float32")
    }
    assert all(row["ok"] for row in report["routes"] + report["heads"])
    from guided_nc.methods import TIMED_METHODS

    assert {row["method"] for row in report["heads"]} == set(TIMED_METHODS)
    heads = report["table3"]["mlp"]["heads"]
    assert heads["standard"]["ratio"] == 1.0 and heads["implicit"]["time_per_step_s"] > 0
    assert "skipped" in report["syncs"]  # a CPU has no CUDA synchronisations to count
    assert report["torchrun"] == {
        **report["torchrun"],
        "ok": True,
        "backend": "gloo",
        "world_size": 1,
    }
    assert "## Routes against the CPU float64 SVD" in (tmp_path / "device_check.md").read_text()
    with pytest.raises(ValueError, match=r"--skip \['nope'\]"):
        main(["--debug", "bench", "device", "--device", "cpu", "--skip", "nope"])
