"""Tests of guided_nc.solvers: the paper's trust-region forward and the dense Proposition-1
backward, against a literal Kronecker-product construction, a full dense KKT solve, finite
differences and the closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import numpy_oracles
from guided_nc.etf import nearest_etf
from guided_nc.solvers import (
    constraint_jacobian,
    dense_ddn_backward,
    dense_ddn_bytes,
    trust_region_nearest_etf,
)


def random_problem(dim: int, num_classes: int, seed: int):
    """:func:`numpy_oracles.random_problem` as float64 tensors (and the generator)."""
    y, prox, rng = numpy_oracles.random_problem(dim, num_classes, seed)
    return torch.from_numpy(y), torch.from_numpy(prox), rng


def commutation_matrix(k: int) -> torch.Tensor:
    """C_K with C vec_r(X) = vec_r(X^T) for K x K X (built from its definition)."""
    matrix = torch.zeros(k * k, k * k, dtype=torch.float64)
    for a in range(k):
        for b in range(k):
            matrix[a * k + b, b * k + a] = 1.0
    return matrix


def elimination_matrix(k: int) -> torch.Tensor:
    """L_K selecting entries (a, b), a >= b, in row-major order."""
    rows = [(a, b) for a in range(k) for b in range(a + 1)]
    matrix = torch.zeros(len(rows), k * k, dtype=torch.float64)
    for index, (a, b) in enumerate(rows):
        matrix[index, a * k + b] = 1.0
    return matrix


# --- trust regions ---------------------------------------------------------------------------


@pytest.mark.parametrize(("dim", "num_classes"), [(6, 3), (4, 4), (5, 2), (2, 2)])
def test_trust_regions_converges_to_the_closed_form(dim, num_classes):
    seed = 1
    if dim == num_classes:
        # St(K, K) = O(K) has two components (det +1, -1) and a Riemannian solver never leaves
        # the one it starts in (see the next test); take a prox in the optimum's component.
        while True:
            y, prox, _ = random_problem(dim, num_classes, seed)
            if torch.linalg.det(prox) * torch.linalg.det(nearest_etf(y, prox)) > 0:
                break
            seed += 1
    y, prox, _ = random_problem(dim, num_classes, seed)
    frame, info = trust_region_nearest_etf(
        y, prox, 1e-3, 200, min_gradient_norm=1e-12, return_info=True
    )
    torch.testing.assert_close(frame, nearest_etf(y, prox), atol=1e-9, rtol=0)
    assert info["gradient_norm"] < 1e-11 and set(info) >= {"iterations", "cost", "time"}
    # The reported cost is the paper's objective, recomputed here.
    centring = torch.eye(num_classes, dtype=torch.float64) - 1 / num_classes
    cost = (y - frame @ centring / math.sqrt(num_classes - 1)).pow(2).sum()
    cost = cost + 0.5e-3 * (frame - prox).pow(2).sum()
    assert abs(float(cost) - info["cost"]) < 1e-12


def test_trust_regions_stays_in_the_component_of_prox_when_d_equals_k():
    # Seed 1 at d = K = 4: the global optimum polar(A) has det -det(prox). The paper's solver
    # then stops at a worse critical point; the closed form does not have this failure mode.
    y, prox, _ = random_problem(4, 4, 1)
    closed = nearest_etf(y, prox)
    assert torch.linalg.det(closed) * torch.linalg.det(prox) < 0
    frame = trust_region_nearest_etf(y, prox, 1e-3, 200, min_gradient_norm=1e-12)
    assert torch.linalg.det(frame) * torch.linalg.det(prox) > 0

    def cost(x):
        centring = torch.eye(4, dtype=torch.float64) - 0.25
        return float(
            (y - x @ centring / math.sqrt(3)).pow(2).sum() + 5e-4 * (x - prox).pow(2).sum()
        )

    assert cost(frame) > cost(closed) + 1e-3


def test_trust_regions_paper_settings_from_a_warm_start():
    # The paper's use: 30 iterations from the previous solution, gradient tolerance 1e-6.
    y, prox, rng = random_problem(20, 5, 2)
    previous = nearest_etf(y, prox)
    moved = y + 0.05 * torch.from_numpy(rng.standard_normal((20, 5)))
    frame, info = trust_region_nearest_etf(moved, previous, 1e-3, return_info=True)
    assert info["iterations"] <= 30
    assert (frame - nearest_etf(moved, previous)).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trust_regions_dtype_and_numpy_rng_untouched(dtype):
    y, prox, _ = random_problem(6, 3, 3)
    state = np.random.get_state()  # noqa: NPY002 (global state on purpose)
    first = trust_region_nearest_etf(y.to(dtype), prox.to(dtype), 1e-3)
    after = np.random.get_state()  # noqa: NPY002
    assert first.dtype == dtype and first.shape == (6, 3)
    assert all(np.array_equal(a, b) for a, b in zip(state, after, strict=True))
    assert torch.equal(first, trust_region_nearest_etf(y.to(dtype), prox.to(dtype), 1e-3))


def test_trust_regions_errors():
    y, prox, _ = random_problem(6, 3, 4)
    with pytest.raises(ValueError, match=r"max_iterations=0 must be an integer >= 1"):
        trust_region_nearest_etf(y, prox, 1e-3, 0)
    with pytest.raises(ValueError, match=r"prox must have orthonormal columns"):
        trust_region_nearest_etf(y, 2 * prox, 1e-3)
    with pytest.raises(ValueError, match=r"initial_point must be a \(6, 3\) tensor"):
        trust_region_nearest_etf(y, prox, 1e-3, initial_point=torch.eye(6, 2))
    with pytest.raises(ValueError, match=r"delta=-1 must be a finite number >= 0"):
        trust_region_nearest_etf(y, prox, -1)


# --- dense Proposition 1 -----------------------------------------------------------------------


@pytest.mark.parametrize(("dim", "num_classes"), [(5, 3), (3, 3), (4, 2)])
def test_constraint_jacobian_is_the_literal_kronecker_formula(dim, num_classes):
    _, frame, _ = random_problem(dim, num_classes, 5)
    eye = torch.eye(num_classes * num_classes, dtype=torch.float64)
    literal = (
        elimination_matrix(num_classes)
        @ (eye + commutation_matrix(num_classes))
        @ torch.kron(frame.T.contiguous(), torch.eye(num_classes, dtype=torch.float64))
    )
    torch.testing.assert_close(constraint_jacobian(frame), literal, atol=1e-15, rtol=0)
    # And it is the Jacobian of vech(X^T X): compare with autograd.
    rows, cols = torch.tril_indices(num_classes, num_classes)
    jac = torch.autograd.functional.jacobian(lambda x: (x.T @ x)[rows, cols], frame)
    torch.testing.assert_close(constraint_jacobian(frame), jac.reshape(len(rows), -1))


def full_kkt_backward(y, frame, prox, delta, grad):
    """Proposition 1 with H_L = kron(I_d, B) formed in full and explicit inverses (tiny sizes)."""
    dim, k = frame.shape
    centring = torch.eye(k, dtype=torch.float64) - 1 / k
    c = 2 / math.sqrt(k - 1)
    g = 2 / (k - 1) * frame @ centring - c * y @ centring + delta * (frame - prox)
    sym = 0.5 * (frame.T @ g + g.T @ frame)
    block = 2 / (k - 1) * centring + delta * torch.eye(k, dtype=torch.float64) - sym
    hessian_inverse = torch.linalg.inv(torch.kron(torch.eye(dim, dtype=torch.float64), block))
    eye = torch.eye(k * k, dtype=torch.float64)
    a = (
        elimination_matrix(k)
        @ (eye + commutation_matrix(k))
        @ torch.kron(frame.T.contiguous(), torch.eye(k, dtype=torch.float64))
    )
    v = grad.reshape(-1)
    inner = torch.linalg.inv(a @ hessian_inverse @ a.T)
    u = -(hessian_inverse - hessian_inverse @ a.T @ inner @ a @ hessian_inverse) @ v
    return -c * u.reshape(dim, k) @ centring


@pytest.mark.parametrize(("dim", "num_classes"), [(5, 3), (3, 3), (4, 2), (2, 2)])
def test_dense_backward_equals_full_kkt_and_finite_differences(dim, num_classes):
    y, prox, rng = random_problem(dim, num_classes, 6)
    delta = 1e-3
    grad = torch.from_numpy(rng.standard_normal((dim, num_classes)))
    frame = nearest_etf(y, prox, delta)
    dense = dense_ddn_backward(y, frame, prox, delta, grad)
    full = full_kkt_backward(y, frame, prox, delta, grad)
    # Explicit inverses of H_L (condition ~ s_max/delta ~ 1e3) cost ~6 digits: 1e-6 relative.
    torch.testing.assert_close(dense, full, atol=1e-6 * full.abs().max(), rtol=0)

    def loss(y_value):
        return float((nearest_etf(y_value, prox, delta) * grad).sum())

    step = 1e-6
    finite = torch.zeros_like(y)
    for index in np.ndindex(dim, num_classes):
        plus, minus = y.clone(), y.clone()
        plus[index] += step
        minus[index] -= step
        finite[index] = (loss(plus) - loss(minus)) / (2 * step)
    torch.testing.assert_close(dense, finite, atol=1e-6 * finite.abs().max(), rtol=0)


def test_dense_backward_float32_and_none_prox():
    y, _, rng = random_problem(6, 3, 7)
    grad = torch.from_numpy(rng.standard_normal((6, 3)))
    frame = nearest_etf(y)
    reference = dense_ddn_backward(y, frame, None, 1e-3, grad)
    single = dense_ddn_backward(
        y.float(), frame.float(), None, 1e-3, grad.float(), dtype=torch.float32
    )
    assert single.dtype == torch.float32
    torch.testing.assert_close(
        single.double(), reference, atol=1e-3 * reference.abs().max(), rtol=0
    )


def test_dense_backward_memory_guard():
    assert dense_ddn_bytes(1024, 100, torch.float32) == 4 * (2 * 5050 * 102400 + 2 * 5050**2)
    y = torch.zeros(1024, 100)
    frame = torch.eye(1024, 100)
    with pytest.raises(
        MemoryError, match=r"needs about 8,681,960,000 bytes \(8\.1 GiB\) > max_bytes"
    ):
        dense_ddn_backward(y, frame, frame, 1e-3, frame)
    with pytest.raises(MemoryError, match="needs about"):
        dense_ddn_backward(y[:20, :4], frame[:20, :4], None, 1e-3, frame[:20, :4], max_bytes=1000)


def test_dense_backward_errors():
    y, prox, _ = random_problem(6, 3, 8)
    with pytest.raises(ValueError, match=r"grad_frame must be a \(6, 3\) tensor, got \(3, 6\)"):
        dense_ddn_backward(y, prox, prox, 1e-3, torch.zeros(3, 6))
    with pytest.raises(ValueError, match=r"frame must have orthonormal columns"):
        dense_ddn_backward(y, 2 * prox, prox, 1e-3, prox)


def test_readme_trust_region_snippet_with_float32_inputs():
    # README: P_tr = nearest_etf(Y, P_prev, solver="trust-regions") with float32 Y (it failed
    # before the validators judged a prox with its own dtype's tolerance).
    rng = np.random.default_rng(9)
    centred = rng.standard_normal((32, 10))
    y = torch.from_numpy(centred / np.linalg.norm(centred)).float().requires_grad_(True)
    previous = nearest_etf(y.detach())  # float32, like a head's stored frame
    assert previous.dtype == torch.float32
    frame = nearest_etf(y, previous, solver="trust-regions")
    assert frame.dtype == torch.float32
    c = 2 / math.sqrt(9)
    expected = numpy_oracles.numpy_polar(
        c * centred / np.linalg.norm(centred) @ numpy_oracles.numpy_centering(10)
        + 1e-3 * previous.double().numpy()
    )
    # 30 iterations to gradient norm 1e-6: P to ~1e-6, then float32 rounding.
    np.testing.assert_allclose(frame.detach().double().numpy(), expected, atol=1e-5)
    frame.sum().backward()
    assert y.grad.dtype == torch.float32 and torch.isfinite(y.grad).all()
