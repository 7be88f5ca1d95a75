"""Smoke test of ``guided-nc bench metrics`` on a tiny case (two short subprocesses)."""

from __future__ import annotations

import pytest
import torch

from guided_nc.bench import metrics as bench_metrics
from guided_nc.cli import build_parser


def test_bench_metrics_runs_and_both_routes_agree(capsys):
    args = build_parser().parse_args(
        ["bench", "metrics", "--sizes", "300x8x3", "--batch-size", "64", "--markdown"]
    )
    assert args.func(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 300 ")]
    assert len(lines) == 1, lines
    cells = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert cells[:3] == ["300", "8", "3"]
    assert float(cells[3]) >= 0 and float(cells[5]) >= 0  # both timings present, no error
    assert float(cells[-1]) < 1e-9  # NC1 of the streaming route equals the naive baseline's


def test_synthetic_loader_repeats_its_batches():
    loader = bench_metrics.SyntheticLoader(50, 4, 3, 16, 5.0, seed=1)
    first, second = list(loader), list(loader)
    assert len(first) == len(loader) == 4
    for (f1, y1), (f2, y2) in zip(first, second, strict=True):
        assert torch.equal(f1, f2) and torch.equal(y1, y2)
    norms = torch.linalg.vector_norm(torch.cat([f for f, _ in first]), dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, 5.0))


@pytest.mark.parametrize(
    ("text", "match"),
    [("60000x512", r"not of the form NxdxK"), ("100x4x8", r"needs K >= 2, d >= K")],
)
def test_parse_sizes_errors(text, match):
    with pytest.raises(ValueError, match=match):
        bench_metrics.parse_sizes(text)
