"""Smoke test of `guided-nc bench step` (tiny sizes; real numbers in docs/benchmarks.md).

The timer itself is tested in test_timing.py.
"""

from __future__ import annotations

import json

import pytest

from guided_nc.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cli_runs_resnet18_cifar_with_a_small_batch(tmp_path, capsys):
    out = tmp_path / "step.json"
    code = main(
        "bench step --setting resnet18-cifar --batch-size 10 --repeats 1 --warmup 0 "
        f"--heads standard,implicit --json {out}".split()
    )
    assert code == 0
    report = json.loads(out.read_text())
    heads = report["settings"]["resnet18-cifar"]["heads"]
    assert (
        set(heads) == {"standard", "implicit"} and report["settings"]["resnet18-cifar"]["backbone"]
    )
    output = capsys.readouterr().out
    assert "| implicit |" in output
    ratio = heads["implicit"]["time_per_step_s"] / heads["standard"]["time_per_step_s"]
    assert heads["implicit"]["ratio"] == pytest.approx(ratio)
    assert f"{ratio:.2f}x" in output


def test_head_alone_setting_times_and_counts_every_head():
    from guided_nc.bench.step import measure_head_alone

    results = measure_head_alone(16, 4, 8, ("standard", "implicit"), repeats=2, warmup=1)
    assert results["standard"]["ratio"] == 1.0
    assert results["implicit"]["time_per_step_s"] > 0
    # The implicit head does strictly more than the standard one: class statistics and a solve.
    assert results["implicit"]["ops_per_step"] > results["standard"]["ops_per_step"] > 0
    # The accelerator route's row: Newton-Schulz iterates where the CPU route calls eigh.
    accelerator = results["implicit (accelerator route)"]
    assert accelerator["ops_per_step"] > results["implicit"]["ops_per_step"]
