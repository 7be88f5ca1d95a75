"""The one training step's timer: every timed step is a real training step of its own model.

Truth: the models' own state after timing (parameters moved, the implicit head's step count,
the loss of the timed model against an untimed copy), and the arithmetic of the summaries.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from guided_nc.heads import build_head
from guided_nc.methods import TIMED_METHODS
from guided_nc.models import Classifier, build_backbone
from guided_nc.optim import build_optimizer
from guided_nc.timing import StepRun, measure_heads, summarize_times, time_steps

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _runs(methods, backbone, inputs, labels):
    runs = {}
    for name in methods:
        model = Classifier(copy.deepcopy(backbone), build_head(name, 16, 4))
        optimizer = build_optimizer("agd", list(model.parameters()))
        runs[name] = StepRun(model, optimizer, inputs, labels)
    return runs


def test_time_steps_trains_every_run_once_per_round():
    torch.manual_seed(0)
    backbone = build_backbone("mlp", input_shape=(1, 8, 8), affine=False, bias=False, width=16)
    inputs, labels = torch.randn(12, 1, 8, 8), torch.arange(12) % 4
    runs = _runs(TIMED_METHODS, backbone, inputs, labels)
    untouched = copy.deepcopy(runs)
    results = time_steps(runs, repeats=3, warmup=2, measure_memory=True)
    assert list(results) == list(TIMED_METHODS)
    for name, result in results.items():
        assert len(result["seconds"]) == 3 and min(result["seconds"]) > 0
        assert result["peak_memory_mb"] > 0 and result["memory_kind"] == "saved_for_backward"
        model, before = runs[name].model, untouched[name].model
        # 5 real optimiser steps happened: every backbone tensor moved, and the loss dropped.
        for new, old in zip(model.backbone.parameters(), before.backbone.parameters(), strict=True):
            assert not torch.equal(new, old), name
        model.eval(), before.eval()
        with torch.no_grad():
            losses = [F.cross_entropy(m(inputs), labels).item() for m in (model, before)]
        assert losses[0] < losses[1], name
        if name.startswith("implicit"):
            assert int(model.head.num_steps) == 5
    # The DDN backward keeps the polar factor's factors for the backward pass: more saved memory.
    assert results["implicit"]["peak_memory_mb"] > results["implicit-no-ddn"]["peak_memory_mb"]
    with pytest.raises(ValueError, match="repeats=0 must be >= 1"):
        time_steps(runs, repeats=0)


def test_summaries_are_medians_and_ratios_to_the_standard_head():
    results = {
        "standard": {"seconds": [2.0, 1.0, 3.0], "peak_memory_mb": 1.0, "memory_kind": "x"},
        "implicit": {"seconds": [5.0, 3.0, 4.0], "peak_memory_mb": 2.0, "memory_kind": "x"},
    }
    summary = summarize_times(results)
    assert summary["standard"]["time_per_step_s"] == 2.0
    assert summary["implicit"]["time_min_s"] == 3.0 and summary["implicit"]["time_max_s"] == 5.0
    assert summary["implicit"]["ratio"] == 2.0 and summary["implicit"]["overhead_percent"] == 100.0
    assert "ratio" not in summarize_times({"implicit": results["implicit"]})["implicit"]


def test_measure_heads_leaves_the_callers_backbone_alone():
    torch.manual_seed(0)
    backbone = build_backbone("mlp", input_shape=(1, 8, 8), affine=False, bias=False, width=16)
    original = [p.detach().clone() for p in backbone.parameters()]
    inputs, labels = torch.randn(12, 1, 8, 8), torch.arange(12) % 4
    results = measure_heads(backbone, 4, inputs, labels, repeats=2, warmup=1)
    assert tuple(results) == TIMED_METHODS
    for result in results.values():
        assert 0 < result["time_min_s"] <= result["time_per_step_s"] <= result["time_max_s"]
    assert results["standard"]["overhead_percent"] == 0.0
    for before, after in zip(original, backbone.parameters(), strict=True):
        assert torch.equal(before, after)
    with pytest.raises(ValueError, match=r"heads=\['learned'\] unknown"):
        measure_heads(backbone, 4, inputs, labels, methods=("learned",))


def test_count_top_level_ops_counts_what_a_step_dispatches():
    """Hand-counted: ones, add and mul are three top-level operations (their inner empty and
    fill_ are not); a matrix product through autograd adds its backward's products."""
    from guided_nc.timing import count_top_level_ops

    assert count_top_level_ops(lambda: torch.ones(3).add(1).mul(2)) == 3
    weight = torch.ones(2, 2, requires_grad=True)
    # forward: ones, mm, sum; backward: ones_like (the seed), expand, mm's t + mm for the weight
    ops = count_top_level_ops(lambda: (torch.ones(4, 2) @ weight).sum().backward())
    assert ops > 3
