"""guided-nc: guiding neural collapse towards the nearest simplex ETF.

The public API is re-exported here; see README.md and docs/.

>>> import torch, guided_nc
>>> W = guided_nc.simplex_etf(3, 4, dtype=torch.float64)
>>> torch.allclose(W @ W.T, 1.5 * guided_nc.centering_matrix(3, dtype=torch.float64))
True
"""

# Importing the solvers registers nearest_etf(..., solver="trust-regions") (pymanopt loads lazily).
from guided_nc import solvers as _solvers  # noqa: F401
from guided_nc._version import __version__
from guided_nc.etf import (
    centering_matrix,
    etf_classifier,
    etf_distance,
    haar_stiefel,
    nearest_etf,
    polar_factor,
    simplex_etf,
)
from guided_nc.heads import (
    FixedETFHead,
    ImplicitETFHead,
    LearnableHead,
    build_head,
    normalize_features,
    renormalize_heads_,
)
from guided_nc.optim import AGD, build_optimizer, build_scheduler, orthogonal_init_
from guided_nc.sampler import StratifiedBatchSampler

#: Names loaded on first use: the metrics subclass torchmetrics.Metric, and importing
#: torchmetrics takes seconds (it loads its audio and image domains), and the models import
#: torchvision; ``import guided_nc`` and ``guided-nc --help`` should not pay for them.
_LAZY = {
    "Classifier": "guided_nc.models",
    "replace_classifier": "guided_nc.models",
    "NeuralCollapseMetrics": "guided_nc.metrics",
    "ce_lower_bound": "guided_nc.metrics",
    "collect_metrics": "guided_nc.metrics",
    "FitResult": "guided_nc.train",
    "load_run": "guided_nc.train",
    "train_model": "guided_nc.train",
}


def __getattr__(name: str):
    """Import the lazily exported names on first access (PEP 562)."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'guided_nc' has no attribute {name!r}")


__all__ = [
    "AGD",
    "Classifier",
    "FitResult",
    "FixedETFHead",
    "ImplicitETFHead",
    "LearnableHead",
    "NeuralCollapseMetrics",
    "StratifiedBatchSampler",
    "__version__",
    "build_head",
    "build_optimizer",
    "build_scheduler",
    "ce_lower_bound",
    "centering_matrix",
    "collect_metrics",
    "etf_classifier",
    "etf_distance",
    "haar_stiefel",
    "load_run",
    "nearest_etf",
    "normalize_features",
    "orthogonal_init_",
    "polar_factor",
    "renormalize_heads_",
    "replace_classifier",
    "simplex_etf",
    "train_model",
]
