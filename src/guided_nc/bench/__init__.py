"""``guided-nc bench {etf,metrics,step}``: benchmarks that time their baseline in the same run.

Each submodule exposes ``add_arguments(parser)`` and ``run(args) -> int``; results and the
machine they were measured on are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import importlib

BENCHMARKS = {
    "etf": ("guided_nc.bench.etf", "nearest-ETF forward/backward vs the paper's solver"),
    "metrics": ("guided_nc.bench.metrics", "streaming NC metrics vs a hold-everything baseline"),
    "step": ("guided_nc.bench.step", "time per training step and peak memory of each head"),
}


def register_cli(subparsers) -> None:
    """Add ``bench`` and its sub-benchmarks to the CLI."""
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark",
        description="Benchmarks that time the baseline in the same run and print the ratios.",
    )
    inner = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        sub = inner.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)
