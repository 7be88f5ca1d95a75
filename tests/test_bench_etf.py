"""Smoke test of ``guided-nc bench etf`` at one tiny size (each measurement is a subprocess)."""

from __future__ import annotations

import argparse
import re

import pytest

from guided_nc.bench import etf as bench_etf

NUMBER = r"[\d.]+ (ms|s)"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_etf.add_arguments(parser)
    return parser.parse_args(argv)


def test_bench_runs_every_route_against_svd_and_the_baseline(capsys):
    args = parse(["--sizes", "12x4", "--repeats", "1", "--markdown", "--threads", "1"])
    assert bench_etf.run(args) == 0
    out = capsys.readouterr().out
    assert "d=12 K=4: svd(A)" in out and "baseline forward" in out
    for route in bench_etf.ROUTES:
        assert f"{route} forward" in out
    table = [line for line in out.splitlines() if line.startswith("| 12 | 4 |")]
    assert [line.split("|")[3].strip() for line in table] == list(bench_etf.ROUTES)
    cells = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert len(cells) == 15
    header = next(line for line in out.splitlines() if line.startswith("| d | K |"))
    assert "| polar+autograd / fwd+bwd | fwd+bwd / floor |" in header
    # Timings and memory are numbers with units; ratios and speed-ups are positive numbers.
    assert re.fullmatch(rf"{NUMBER} \(CPU {NUMBER}\)", cells[3])
    for ratio in cells[5:9]:  # to one SVD (forward, fwd+bwd), polar + autograd, the floor
        assert re.fullmatch(r"[\d.]+x", ratio)
    assert re.fullmatch(rf"{NUMBER} \(\d+ it\.\)", cells[10])
    assert re.fullmatch(r"[\d,]+x \((gram|svd|newton-schulz)\)", cells[13])
    assert re.fullmatch(r"[\d,]+x", cells[14])
    assert re.search(rf"svd\(A\), float64, same processes: 12x4: {NUMBER}", out)
    assert re.search(rf"12x4: polar {NUMBER}, floor {NUMBER}", out)


def test_bench_routes_and_compute_dtype_flags(capsys):
    flags = ["--sizes", "12x4", "--repeats", "1", "--no-baseline", "--threads", "1", "--markdown"]
    args = parse([*flags, "--routes", "svd", "--compute-dtype", "float32"])
    assert bench_etf.run(args) == 0
    out = capsys.readouterr().out
    assert "compute float32" in out and "svd forward" in out and "gram forward" not in out
    table = [line for line in out.splitlines() if line.startswith("| 12 | 4 |")]
    assert len(table) == 1 and len(table[0].strip("|").split("|")) == 10
    assert bench_etf.run(parse(["--sizes", "12x4", "--routes", "qr"])) == 2
    assert "--routes='qr': use a subset of gram,svd,newton-schulz" in capsys.readouterr().err


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
