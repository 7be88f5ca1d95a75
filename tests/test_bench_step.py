"""Smoke test of `guided-nc bench step` (tiny sizes; real numbers in docs/benchmarks.md)."""

from __future__ import annotations

import json

import pytest
import torch

from guided_nc.bench.step import HEADS, measure_steps
from guided_nc.cli import main
from guided_nc.models import build_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_measure_steps_times_every_head_and_trains_it():
    torch.manual_seed(0)
    backbone = build_backbone("mlp", input_shape=(1, 8, 8), affine=False, bias=False, width=16)
    inputs, labels = torch.randn(12, 1, 8, 8), torch.arange(12) % 4
    original = [p.detach().clone() for p in backbone.parameters()]
    results = measure_steps(backbone, 4, inputs, labels, repeats=2, warmup=1)
    assert tuple(results) == HEADS
    for name, result in results.items():
        assert 0 < result["time_min_s"] <= result["time_per_step_s"] <= result["time_max_s"], name
        assert result["peak_memory_mb"] > 0 and result["memory_kind"] == "saved_for_backward"
    assert results["standard"]["overhead_percent"] == 0.0
    # The DDN backward keeps the polar factor's SVD for the backward pass: more saved memory.
    assert results["implicit"]["peak_memory_mb"] > results["implicit-no-ddn"]["peak_memory_mb"]
    # Each head trained its own copy: the caller's backbone is untouched.
    for before, after in zip(original, backbone.parameters(), strict=True):
        assert torch.equal(before, after)


def test_unknown_head_is_rejected():
    backbone = build_backbone("mlp", input_shape=(4,), affine=False, bias=False, width=8)
    with pytest.raises(ValueError, match=r"heads=\['learned'\] unknown"):
        measure_steps(backbone, 2, torch.randn(4, 4), torch.arange(4) % 2, heads=("learned",))


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
    assert "| implicit |" in capsys.readouterr().out
