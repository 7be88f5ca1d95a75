"""guided-nc: guiding neural collapse towards the nearest simplex ETF.

The public API is re-exported here; see README.md and docs/.
"""

__version__ = "0.1.0"

from guided_nc.etf import (  # noqa: E402
    centering_matrix,
    etf_classifier,
    etf_distance,
    haar_stiefel,
    nearest_etf,
    polar_factor,
    simplex_etf,
)

__all__ = [
    "__version__",
    "centering_matrix",
    "etf_classifier",
    "etf_distance",
    "haar_stiefel",
    "nearest_etf",
    "polar_factor",
    "simplex_etf",
]
