"""Neural-collapse metrics benchmark: ``python benchmarks/bench_metrics.py [--markdown ...]``.

The same code as ``guided-nc bench metrics`` (:mod:`guided_nc.bench.metrics`).
"""

import sys

from guided_nc.bench.metrics import main

if __name__ == "__main__":
    sys.exit(main())
