"""``guided-nc`` command-line interface: one subcommand per capability.

Each module in :data:`COMMAND_MODULES` exposes ``register_cli(subparsers)``, which adds its
subcommand(s) and sets ``func`` (called with the parsed namespace; returns an exit code or None).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from guided_nc import __version__

#: Modules that contribute subcommands, in ``--help`` order.
COMMAND_MODULES = (
    "guided_nc.ufm",  # ufm, demo
    "guided_nc.train",  # train
    "guided_nc.compare",  # compare
    "guided_nc.bench",  # bench etf | metrics | step
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="guided-nc",
        description="Guiding neural collapse towards the nearest simplex ETF: experiments, "
        "training, comparisons and benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``guided-nc`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    code = args.func(args)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
