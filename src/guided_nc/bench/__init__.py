"""Benchmarks that time their baseline in the same run: ``guided-nc bench {etf,metrics,step}``.

Each submodule exposes ``add_arguments(parser)`` and ``run(args) -> int``; the command line
(``guided_nc.cli``) registers them. Results and the machine they were measured on are recorded
in docs/benchmarks.md.
"""
