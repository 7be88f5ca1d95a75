"""Independent numpy oracles of the nearest-ETF problem, written from the maths (method.md
sections 1-2), not from guided_nc; shared by the ETF, solver and head tests."""

from __future__ import annotations

import math

import numpy as np


def numpy_centering(num_classes: int) -> np.ndarray:
    """M = I_K - 1 1^T / K, (K, K) float64."""
    return np.eye(num_classes) - np.ones((num_classes, num_classes)) / num_classes


def numpy_polar(matrix: np.ndarray) -> np.ndarray:
    """The polar factor U V^T of a (d, K) matrix, from numpy's SVD."""
    u, _, vh = np.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def objective(y: np.ndarray, frame: np.ndarray, prox: np.ndarray, delta: float) -> float:
    """Paper eq. 6 + eq. 7: ||Y - P M/sqrt(K-1)||^2 + (delta/2)||P - prox||^2, in numpy."""
    num_classes = y.shape[1]
    residual = y - frame @ numpy_centering(num_classes) / math.sqrt(num_classes - 1)
    return float(np.sum(residual**2) + 0.5 * delta * np.sum((frame - prox) ** 2))


def random_stiefel(dim: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random (d, K) orthonormal frame: QR with the sign fix."""
    q, r = np.linalg.qr(rng.standard_normal((dim, num_classes)))
    return q * np.sign(np.diag(r))


def random_problem(dim: int, num_classes: int, seed: int):
    """(Y with ||Y||_F = 1, a random prox frame, the generator), all float64 numpy."""
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((dim, num_classes))
    y /= np.linalg.norm(y)
    return y, random_stiefel(dim, num_classes, rng), rng
