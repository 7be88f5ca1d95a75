"""Time per training step and peak memory of each head (paper Table 3 / Figure 5).

Same as ``guided-nc bench step``; see ``guided_nc.bench.step`` for the options, e.g.::

    python benchmarks/bench_step.py --setting resnet18-cifar --batch-size 256 --repeats 3
    python benchmarks/bench_step.py --setting imagenet-head --repeats 10
"""

from __future__ import annotations

import argparse
import sys

from guided_nc.bench import step


def main(argv: list[str] | None = None) -> int:
    """Parse the flags of :mod:`guided_nc.bench.step` and run it."""
    parser = argparse.ArgumentParser(description=step.__doc__.split("\n\n")[0])
    step.add_arguments(parser)
    return step.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
