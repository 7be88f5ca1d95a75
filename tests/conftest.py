"""Shared pytest configuration: one torch thread per test process keeps runs predictable on
small CI machines, and tests import their helpers from this folder."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(int(os.environ.get("GUIDED_NC_TEST_THREADS", "2")))

_approx = pytest.approx


def _approx_without_tensors(expected, *args, **kwargs):
    """``pytest.approx`` that refuses tensors: pytest >= 9.2 iterates ``expected``, which fails on
    a 0-d tensor, and for larger tensors the outcome depends on pytest's version. Tensors are
    compared with ``torch.testing.assert_close``; approx gets Python floats (``.item()``)."""
    if isinstance(expected, torch.Tensor):
        raise TypeError(
            f"pytest.approx got a tensor ({tuple(expected.shape)}); use "
            "torch.testing.assert_close, or compare Python floats via .item()"
        )
    return _approx(expected, *args, **kwargs)


pytest.approx = _approx_without_tensors


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: bit-exact comparisons (resume, 1 vs 2 processes) need a
    fixed thread count, and CI has 2 cores. Use with ``pytest.mark.usefixtures``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
