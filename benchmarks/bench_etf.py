"""Nearest-ETF benchmark: ``python benchmarks/bench_etf.py [--markdown ...]``.

The same code as ``guided-nc bench etf`` (:mod:`guided_nc.bench.etf`).
"""

import sys

from guided_nc.bench.etf import main

if __name__ == "__main__":
    sys.exit(main())
