"""Smoke test of ``guided-nc bench etf`` at one tiny size (each measurement is a subprocess)."""

from __future__ import annotations

import argparse
import re

import pytest

from guided_nc.bench import etf as bench_etf


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_etf.add_arguments(parser)
    return parser.parse_args(argv)


def test_bench_runs_closed_form_and_baseline(capsys):
    args = parse(["--sizes", "12x4", "--repeats", "1", "--markdown", "--threads", "1"])
    assert bench_etf.run(args) == 0
    out = capsys.readouterr().out
    assert "d=12 K=4: forward" in out and "baseline forward" in out
    table = [line for line in out.splitlines() if line.startswith("| 12 | 4 |")]
    assert len(table) == 1
    cells = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert len(cells) == 10
    # Timings and memory are numbers with units; the speed-ups are positive ratios.
    assert re.fullmatch(r"[\d.]+ (ms|s) \(CPU [\d.]+ (ms|s)\)", cells[2]) and re.fullmatch(
        r"[\d.]+ (ms|s) \(\d+ it\.\)", cells[5]
    )
    assert re.fullmatch(r"[\d,]+x", cells[8]) and re.fullmatch(r"[\d,]+x", cells[9])


def test_bench_skips_a_baseline_that_does_not_fit(capsys):
    args = parse(["--sizes", "12x4", "--repeats", "1", "--baseline-max-gib", "0", "--threads", "1"])
    assert bench_etf.run(args) == 0
    out = capsys.readouterr().out
    assert "dense backward needs 0 GiB > --baseline-max-gib 0" in out


def test_bench_rejects_bad_sizes(capsys):
    assert bench_etf.run(parse(["--sizes", "10x20"])) == 2
    assert "needs K >= 2 and d >= K" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--sizes entry 'abc' is not of the form DxK"):
        bench_etf.parse_sizes("abc")
    assert bench_etf.parse_sizes("512x10, 1024X100") == [(512, 10), (1024, 100)]
