"""Tests of guided_nc.etf against independent truth: numpy SVDs, pymanopt's trust regions,
brute-force objectives, finite differences and the dense Proposition-1 backward."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import guided_nc.etf as etf_module
from guided_nc.etf import (
    SOLVERS,
    centering_matrix,
    etf_classifier,
    etf_distance,
    gram_eigenvalue_threshold,
    haar_stiefel,
    nearest_etf,
    newton_schulz_schedule,
    polar_factor,
    resolve_solver,
    simplex_etf,
)
from guided_nc.solvers import dense_ddn_backward, trust_region_nearest_etf
from numpy_oracles import (
    numpy_centering,
    numpy_polar,
    objective,
    random_problem,
    random_stiefel,
)

DTYPES = [torch.float32, torch.float64]
# (d, K): general, K = 2, d = K, d = K = 2.
SIZES = [(7, 3), (5, 2), (4, 4), (2, 2), (9, 6)]
# The exact routes of guided_nc.etf: every invariant below must hold for each of them.
ROUTES = ["gram", "svd", "newton-schulz"]


# --- independent oracles (numpy, written from the maths, not from guided_nc) -----------------


def etf_features(dim: int, num_classes: int, seed: int) -> np.ndarray:
    """A collapsed Y: an exact simplex ETF (all K-1 nonzero singular values equal)."""
    rng = np.random.default_rng(seed)
    frame = random_stiefel(dim, num_classes, rng)
    return frame @ numpy_centering(num_classes) / math.sqrt(num_classes - 1)


# --- frames ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("dim", "num_classes"), SIZES)
@pytest.mark.parametrize("rotation", ["canonical", "haar"])
def test_simplex_etf_unit_rows_and_gram(dtype, dim, num_classes, rotation):
    generator = torch.Generator().manual_seed(3)
    weight = simplex_etf(num_classes, dim, rotation, generator, dtype=dtype)
    assert weight.shape == (num_classes, dim) and weight.dtype == dtype
    tolerance = {"atol": 1e-6, "rtol": 0} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 0}
    gram = weight.double() @ weight.double().T
    expected = num_classes / (num_classes - 1) * torch.from_numpy(numpy_centering(num_classes))
    torch.testing.assert_close(gram, expected, **tolerance)
    torch.testing.assert_close(
        weight.double().norm(dim=1), torch.ones(num_classes).double(), **tolerance
    )


def test_simplex_etf_rotations():
    canonical = simplex_etf(3, 5, dtype=torch.float64)
    expected = math.sqrt(3 / 2) * numpy_centering(3) @ np.eye(5, 3).T
    np.testing.assert_allclose(canonical.numpy(), expected, atol=1e-15)
    first = simplex_etf(3, 5, "haar", torch.Generator().manual_seed(1))
    again = simplex_etf(3, 5, "haar", torch.Generator().manual_seed(1))
    other = simplex_etf(3, 5, "haar", torch.Generator().manual_seed(2))
    assert torch.equal(first, again) and not torch.allclose(first, other)
    frame = torch.from_numpy(random_stiefel(5, 3, np.random.default_rng(0)))
    from_tensor = simplex_etf(3, 5, frame, dtype=torch.float64)
    np.testing.assert_allclose(
        from_tensor.numpy(), math.sqrt(3 / 2) * numpy_centering(3) @ frame.numpy().T, atol=1e-14
    )


def test_centering_matrix_and_classifier():
    m = centering_matrix(4, dtype=torch.float64)
    np.testing.assert_allclose(m.numpy(), numpy_centering(4), atol=1e-16)
    frame = torch.from_numpy(random_stiefel(6, 4, np.random.default_rng(1)))
    np.testing.assert_allclose(
        etf_classifier(frame).numpy(),
        math.sqrt(4 / 3) * numpy_centering(4) @ frame.numpy().T,
        atol=1e-14,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_haar_stiefel_orthonormal_and_reproducible(dtype):
    frame = haar_stiefel(8, 5, torch.Generator().manual_seed(0), dtype=dtype)
    assert frame.shape == (8, 5) and frame.dtype == dtype
    atol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(frame.T @ frame, torch.eye(5, dtype=dtype), atol=atol, rtol=0)
    again = haar_stiefel(8, 5, torch.Generator().manual_seed(0), dtype=dtype)
    assert torch.equal(frame, again)


def test_haar_stiefel_distribution():
    # Haar measure on St(d, K): E[P] = 0, E[P P^T] = (K/d) I_d, E[P_ij^2] = 1/d. Without the
    # sign fix QR gives R_ii > 0 conventions that bias E[P] (the diagonal would be positive).
    dim, num_classes, draws = 4, 2, 4000
    generator = torch.Generator().manual_seed(0)
    frames = torch.stack(
        [haar_stiefel(dim, num_classes, generator, dtype=torch.float64) for _ in range(draws)]
    )
    # Standard error of each mean is below sqrt(1/d / draws) ~ 0.008: 5 sigma ~ 0.04.
    assert frames.mean(dim=0).abs().max() < 0.04
    projector = (frames @ frames.transpose(1, 2)).mean(dim=0)
    torch.testing.assert_close(
        projector, num_classes / dim * torch.eye(dim, dtype=torch.float64), atol=0.04, rtol=0
    )


# --- forward: the closed form is the optimum --------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("dim", "num_classes", "seed"), [(6, 3, 0), (10, 5, 1), (5, 5, 2)])
def test_nearest_etf_matches_pymanopt_trust_regions(dim, num_classes, seed, route):
    y, prox, _ = random_problem(dim, num_classes, seed)
    delta = 1e-3
    frame = nearest_etf(torch.from_numpy(y), torch.from_numpy(prox), delta, route).numpy()
    # Converge TR well past the paper's 1e-6 stopping rule, from prox (the paper's warm start).
    reference = trust_region_nearest_etf(
        torch.from_numpy(y), torch.from_numpy(prox), delta, 300, min_gradient_norm=1e-12
    ).numpy()
    assert abs(objective(y, frame, prox, delta) - objective(y, reference, prox, delta)) < 1e-12
    centring = numpy_centering(num_classes)
    np.testing.assert_allclose(frame @ centring, reference @ centring, atol=1e-8)
    np.testing.assert_allclose(frame, reference, atol=1e-8)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("dim", "num_classes"), SIZES)
def test_nearest_etf_beats_random_perturbations(dim, num_classes, route):
    y, prox, rng = random_problem(dim, num_classes, 5)
    delta = 1e-3
    frame = nearest_etf(torch.from_numpy(y), torch.from_numpy(prox), delta, route).numpy()
    best = objective(y, frame, prox, delta)
    for scale in (1e-4, 1e-2, 1.0):
        for _ in range(50):
            nearby = numpy_polar(frame + scale * rng.standard_normal(frame.shape))
            assert objective(y, nearby, prox, delta) >= best - 1e-12
    for _ in range(50):
        assert objective(y, random_stiefel(dim, num_classes, rng), prox, delta) >= best


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("dim", "num_classes"), SIZES)
def test_nearest_etf_equals_numpy_procrustes(dim, num_classes, route):
    y, prox, _ = random_problem(dim, num_classes, 7)
    delta = 0.05
    scale = 2 / math.sqrt(num_classes - 1)
    expected = numpy_polar(scale * y @ numpy_centering(num_classes) + delta * prox)
    frame = nearest_etf(torch.from_numpy(y), torch.from_numpy(prox), delta, route)
    np.testing.assert_allclose(frame.numpy(), expected, atol=1e-12)
    # First-step rule: prox = None means P0 = polar(c Y M + delta eye(d, K)).
    first = nearest_etf(torch.from_numpy(y), None, delta, route)
    expected_first = numpy_polar(
        scale * y @ numpy_centering(num_classes) + delta * np.eye(dim, num_classes)
    )
    np.testing.assert_allclose(first.numpy(), expected_first, atol=1e-12)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nearest_etf_dtype_device_and_orthonormality(dtype, route):
    y, prox, _ = random_problem(128, 50, 0)
    features = torch.from_numpy(y).to(dtype).requires_grad_(True)
    frame = nearest_etf(features, torch.from_numpy(prox).to(dtype), solver=route)
    assert frame.dtype == dtype and frame.device == features.device
    error = (frame.double().T @ frame.double() - torch.eye(50, dtype=torch.float64)).abs().max()
    assert error <= (1e-5 if dtype == torch.float32 else 1e-12)
    frame.sum().backward()
    assert features.grad.dtype == dtype and torch.isfinite(features.grad).all()


@pytest.mark.parametrize("route", ROUTES)
def test_nearest_etf_is_equivariant(route):
    """Relabelling the classes permutes the frame's columns, and rotating the feature space
    rotates the frame: A(Y Pi, prox Pi) = A(Y, prox) Pi since Pi M = M Pi, and
    A(Q Y, Q prox) = Q A(Y, prox), and the polar factor is equivariant under both."""
    y, prox, _ = random_problem(20, 7, 3)
    y, prox = torch.from_numpy(y), torch.from_numpy(prox)
    frame = nearest_etf(y, prox, solver=route)
    permutation = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    permuted = nearest_etf(y[:, permutation], prox[:, permutation], solver=route)
    torch.testing.assert_close(permuted, frame[:, permutation], atol=1e-10, rtol=0)
    gaussian = torch.randn(20, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rotation, _ = torch.linalg.qr(gaussian)
    rotated = nearest_etf(rotation @ y, rotation @ prox, solver=route)
    torch.testing.assert_close(rotated, rotation @ frame, atol=1e-10, rtol=0)


@pytest.mark.parametrize("route", ROUTES)
def test_nearest_etf_prox_gets_no_gradient(route):
    y, prox, _ = random_problem(6, 3, 0)
    prox_tensor = torch.from_numpy(prox).requires_grad_(True)
    nearest_etf(
        torch.from_numpy(y).requires_grad_(True), prox_tensor, solver=route
    ).sum().backward()
    assert prox_tensor.grad is None


# --- degenerate inputs: collapsed, rank-deficient, zero, K = 2, d = K -------------------------


def degenerate_cases():
    cases = []
    for dim, num_classes in [(6, 3), (3, 3), (4, 2), (2, 2)]:
        rng = np.random.default_rng(dim * 10 + num_classes)
        cases.append((f"etf-{dim}x{num_classes}", etf_features(dim, num_classes, 0)))
        rank_one = np.outer(rng.standard_normal(dim), rng.standard_normal(num_classes))
        cases.append((f"rank1-{dim}x{num_classes}", rank_one / np.linalg.norm(rank_one)))
        cases.append((f"zero-{dim}x{num_classes}", np.zeros((dim, num_classes))))
    return cases


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("name", "y"), degenerate_cases(), ids=lambda case: str(case)[:12])
def test_degenerate_inputs_forward_and_gradcheck(name, y, route):
    dim, num_classes = y.shape
    prox = random_stiefel(dim, num_classes, np.random.default_rng(11))
    delta = 1e-3
    expected = numpy_polar(
        2 / math.sqrt(num_classes - 1) * y @ numpy_centering(num_classes) + delta * prox
    )
    frame = nearest_etf(torch.from_numpy(y), torch.from_numpy(prox), delta, route)
    np.testing.assert_allclose(frame.numpy(), expected, atol=1e-10)
    if name.startswith("zero"):  # A = delta prox: the answer is prox itself
        np.testing.assert_allclose(frame.numpy(), prox, atol=1e-12)
    if name.startswith("etf"):  # a collapsed Y is its own nearest ETF: P M/sqrt(K-1) = Y
        centred = frame.numpy() @ numpy_centering(num_classes) / math.sqrt(num_classes - 1)
        np.testing.assert_allclose(centred, y, atol=1e-3)  # O(delta) pull towards prox
    features = torch.from_numpy(y).clone().requires_grad_(True)
    prox_tensor = torch.from_numpy(prox)
    assert torch.autograd.gradcheck(
        lambda f: nearest_etf(f, prox_tensor, delta, route), (features,)
    )


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("dim", "num_classes"), SIZES)
@pytest.mark.parametrize("with_prox", [True, False])
def test_gradcheck_float64(dim, num_classes, with_prox, route):
    y, prox, _ = random_problem(dim, num_classes, 21)
    prox_tensor = torch.from_numpy(prox) if with_prox else None
    features = torch.from_numpy(y).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda f: nearest_etf(f, prox_tensor, solver=route), (features,)
    )


@pytest.mark.parametrize("route", ["gram", "svd"])
def test_polar_factor_gradcheck_with_equal_singular_values(route):
    # A with all singular values equal (a scaled Stiefel point): autograd through the SVD's U, V
    # is undefined here, the polar factor's own backward is not.
    matrix = 0.3 * torch.from_numpy(random_stiefel(5, 3, np.random.default_rng(2)))
    assert torch.autograd.gradcheck(
        lambda m: polar_factor(m, solver=route), (matrix.detach().requires_grad_(True),)
    )
    # A general matrix (distinct singular values, d > K and d = K).
    for shape in ((7, 3), (4, 4)):
        general = torch.randn(
            *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)
        )
        expected = numpy_polar(general.numpy())
        np.testing.assert_allclose(
            polar_factor(general, solver=route).numpy(), expected, atol=1e-12
        )
        assert torch.autograd.gradcheck(
            lambda m: polar_factor(m, solver=route), (general.requires_grad_(True),)
        )


# --- routes: resolution, the Gram route's fallback rule, the Newton-Schulz schedule -------------


def test_auto_resolves_to_the_documented_route():
    # docs/etf.md, "Routes": CPU float64 -> gram; float32 compute on the CPU -> svd (the Gram
    # route is never accurate there); accelerators -> newton-schulz unless delta = 0.
    assert resolve_solver("auto", "cpu", 1e-3) == "gram"
    assert resolve_solver("auto", "cpu", 1e-3, torch.float32) == "svd"
    assert resolve_solver("auto", "cuda", 1e-3) == "newton-schulz"
    assert resolve_solver("auto", "cuda", 1e-3, torch.float32) == "newton-schulz"
    assert resolve_solver("auto", "cuda", 0.0) == "gram"
    assert resolve_solver("auto", "cuda", 0.0, torch.float32) == "svd"
    for name in SOLVERS[1:]:
        assert resolve_solver(name, "cpu", 1e-3) == name
    with pytest.raises(ValueError, match=r"solver='qr' is not supported"):
        resolve_solver("qr", "cpu", 1e-3)


@pytest.fixture
def svd_calls(monkeypatch):
    """Count the thin SVDs guided_nc.etf runs (the fallback's signature), calling the real one."""
    calls = []
    real_svd = torch.linalg.svd

    def counting_svd(*args, **kwargs):
        calls.append(args[0].shape)
        return real_svd(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counting_svd)
    return calls


def spectrum_matrix(dim, num_classes, cond, seed):
    """A = U diag(s) V^T with s log-spaced from 1 to 1/cond; returns (A, U V^T) in float64."""
    rng = np.random.default_rng(seed)
    left = random_stiefel(dim, num_classes, rng)
    right = random_stiefel(num_classes, num_classes, rng)
    spectrum = np.logspace(0, -math.log10(cond), num_classes)
    return (left * spectrum) @ right.T, left @ right.T


@pytest.mark.parametrize(
    ("dtype", "below", "above"),
    # cond limits of the rule: sqrt(target / (8 u)) = 8.2e3 for a float32 result, 335 for float64.
    [(torch.float32, 4e3, 2e4), (torch.float64, 200.0, 700.0)],
)
def test_gram_route_uses_eigh_below_the_threshold_and_svd_above(svd_calls, dtype, below, above):
    # The threshold as derived in docs/etf.md: lambda_min/lambda_max >= 8 u_64 / target.
    target = 2.0**-24 if dtype == torch.float32 else 1e-10
    assert gram_eigenvalue_threshold(torch.float64, dtype) == pytest.approx(8 * 2.0**-53 / target)
    for cond, expect_svd in ((below, False), (above, True)):
        matrix, _ = spectrum_matrix(40, 6, cond, seed=int(cond))
        stored = torch.from_numpy(matrix).to(dtype)
        svd_calls.clear()
        frame = polar_factor(stored, solver="gram")
        assert bool(svd_calls) == expect_svd, cond
        # Either way the answer is the exact polar factor of the stored matrix, within the
        # target error (float32: the result's own rounding; float64: 1e-10).
        exact = numpy_polar(stored.double().numpy())
        atol = 4 * 2.0**-24 if dtype == torch.float32 else 1e-10
        np.testing.assert_allclose(frame.double().numpy(), exact, atol=atol, rtol=0)


def test_gram_route_falls_back_for_rank_deficient_a_with_delta_zero(svd_calls):
    # delta = 0: A = c Y M has rank K - 1 (its last singular value is 0), so A^T A is singular.
    y, _, _ = random_problem(9, 4, 3)
    frame = nearest_etf(torch.from_numpy(y), delta=0.0, solver="gram")
    assert svd_calls  # fell back
    # P M (hence W) is unique when rank(Y M) = K - 1: compare it with numpy's SVD.
    centring = numpy_centering(4)
    expected = numpy_polar(2 / math.sqrt(3) * y @ centring)
    np.testing.assert_allclose(frame.numpy() @ centring, expected @ centring, atol=1e-12)
    assert np.isfinite(frame.numpy()).all()


def test_gram_route_falls_back_for_tiny_delta(svd_calls):
    # delta = 1e-9 makes cond(A) ~ 1e9: the Gram route would lose every digit.
    y, prox, _ = random_problem(20, 5, 4)
    delta = 1e-9
    matrix = 2 / math.sqrt(4) * y @ numpy_centering(5) + delta * prox
    frame = nearest_etf(torch.from_numpy(y), torch.from_numpy(prox), delta, "gram")
    assert svd_calls
    exact = numpy_polar(matrix)
    np.testing.assert_allclose(frame.numpy(), exact, atol=1e-6)  # u cond ~ 1e-7 for the SVD
    # What the rule prevents: the Gram formula itself, re-derived in numpy, is far off here.
    eigenvalues, vectors = np.linalg.eigh(matrix.T @ matrix)
    unguarded = matrix @ (vectors / np.sqrt(np.abs(eigenvalues))) @ vectors.T
    assert np.abs(unguarded - exact).max() > 1e-3


def test_gram_route_falls_back_when_the_gram_matrix_overflows(svd_calls):
    # Entries of 1e160: A^T A overflows float64 (1e320 > 1.8e308); the SVD does not square A.
    y, prox, _ = random_problem(10, 3, 5)
    huge = 1e160 * y
    frame = nearest_etf(torch.from_numpy(huge), torch.from_numpy(prox), solver="gram")
    assert svd_calls
    # delta prox is below the resolution of A here, so compare P M (unique: rank(Y M) = K - 1).
    centring = numpy_centering(3)
    expected = numpy_polar(2 / math.sqrt(2) * huge @ centring + 1e-3 * prox)
    np.testing.assert_allclose(frame.numpy() @ centring, expected @ centring, atol=1e-12)


@pytest.mark.parametrize("lower", [1e-5, 1e-3, 0.3, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_newton_schulz_schedule_maps_the_interval_to_one(lower, dtype):
    # The claim of the schedule, checked on scalars: its composed polynomial sends every singular
    # value in [lower, 1] to within a few ulps of 1 (plain float64 arithmetic, no guided_nc code
    # beyond the list of scale factors).
    eps = torch.finfo(dtype).eps
    schedule = newton_schulz_schedule(lower, eps)
    values = np.concatenate([np.geomspace(lower, 1.0, 200), [lower, 1.0]])
    for a in schedule:
        values = 0.5 * a * values * (3.0 - a * a * values * values)
    assert np.abs(values - 1.0).max() <= 4 * eps
    assert len(schedule) <= {1e-5: 17, 1e-3: 13, 0.3: 6, 1.0: 0}[lower]
    with pytest.raises(ValueError, match=r"lower=0 must lie in \(0, 1\]"):
        newton_schulz_schedule(0, eps)


def test_newton_schulz_reports_non_convergence_and_nearest_etf_falls_back(svd_calls):
    # Y M = -(1 - 1e-4) (delta / c) prox M cancels the proximal term but for a factor 1e-4:
    # s_min(A) = 1e-4 delta, far below the schedule's lower bound delta / 4.
    dim, num_classes, delta = 12, 4, 1e-3
    prox = random_stiefel(dim, num_classes, np.random.default_rng(6))
    c = 2 / math.sqrt(num_classes - 1)
    y = -(1 - 1e-4) * delta / c * prox @ numpy_centering(num_classes)
    features, prox_tensor = torch.from_numpy(y), torch.from_numpy(prox)
    factors = etf_module.solve_nearest_etf(
        features, prox_tensor, delta, "newton-schulz", strict=False
    )
    assert not bool(factors.converged)  # flagged on the device
    frame = nearest_etf(features, prox_tensor, delta, "newton-schulz")
    assert svd_calls  # the public function answers with the SVD instead
    expected = numpy_polar(c * y @ numpy_centering(num_classes) + delta * prox)
    np.testing.assert_allclose(frame.numpy(), expected, atol=1e-9)
    with pytest.raises(ValueError, match=r"newton-schulz' needs delta > 0"):
        nearest_etf(features, prox_tensor, 0.0, "newton-schulz")


def central_differences(function, y: np.ndarray, step: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(y)
    for index in np.ndindex(*y.shape):
        plus, minus = y.copy(), y.copy()
        plus[index] += step
        minus[index] -= step
        grad[index] = (function(plus) - function(minus)) / (2 * step)
    return grad


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("dim", "num_classes"), [(6, 3), (4, 4), (5, 2)])
def test_closed_backward_equals_dense_prop1_and_finite_differences(dim, num_classes, route):
    y, prox, rng = random_problem(dim, num_classes, 31)
    delta = 1e-3
    weights = rng.standard_normal((num_classes, dim))  # loss = <etf_classifier(P), weights>

    def loss(y_value: np.ndarray) -> float:
        frame = numpy_polar(
            2 / math.sqrt(num_classes - 1) * y_value @ numpy_centering(num_classes) + delta * prox
        )
        classifier = (
            math.sqrt(num_classes / (num_classes - 1)) * numpy_centering(num_classes) @ frame.T
        )
        return float(np.sum(classifier * weights))

    features = torch.from_numpy(y).requires_grad_(True)
    frame = nearest_etf(features, torch.from_numpy(prox), delta, route)
    frame.retain_grad()
    (etf_classifier(frame) * torch.from_numpy(weights)).sum().backward()
    closed = features.grad.numpy()
    dense = dense_ddn_backward(
        torch.from_numpy(y), frame.detach(), torch.from_numpy(prox), delta, frame.grad
    ).numpy()
    finite = central_differences(loss, y)
    scale = np.abs(closed).max()
    assert np.abs(closed - dense).max() <= 1e-10 * scale
    assert np.abs(closed - finite).max() <= 1e-6 * scale


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_float32_gradient_close_to_float64(dtype, route):
    # Internal float64 makes the float32 result the rounded float64 one.
    y, prox, rng = random_problem(64, 10, 4)
    grad = torch.from_numpy(rng.standard_normal((64, 10)))
    reference = torch.from_numpy(y).requires_grad_(True)
    torch.autograd.backward(nearest_etf(reference, torch.from_numpy(prox), solver=route), grad)
    features = torch.from_numpy(y).to(dtype).requires_grad_(True)
    frame = nearest_etf(features, torch.from_numpy(prox).to(dtype), solver=route)
    torch.autograd.backward(frame, grad.to(dtype))
    relative = (features.grad.double() - reference.grad).norm() / reference.grad.norm()
    assert relative < (1e-6 if dtype == torch.float32 else 1e-15)


def test_trust_region_solver_option_same_gradient():
    y, prox, rng = random_problem(7, 3, 41)
    grad = torch.from_numpy(rng.standard_normal((7, 3)))
    closed = torch.from_numpy(y).requires_grad_(True)
    torch.autograd.backward(nearest_etf(closed, torch.from_numpy(prox)), grad)
    paper = torch.from_numpy(y).requires_grad_(True)
    frame = nearest_etf(paper, torch.from_numpy(prox), solver="trust-regions", max_iterations=30)
    torch.autograd.backward(frame, grad)
    # 30 TR iterations stop at gradient norm 1e-6, so P agrees to ~1e-6 and dL/dY (which scales
    # with 1/delta) to ~1e-3 relative.
    torch.testing.assert_close(
        frame, nearest_etf(torch.from_numpy(y), torch.from_numpy(prox)), atol=1e-5, rtol=0
    )
    assert (paper.grad - closed.grad).norm() <= 1e-2 * closed.grad.norm()


def test_trust_region_backward_is_prop1_at_the_unconverged_point():
    # With 1 TR iteration the point is not optimal; the backward still equals Proposition 1 at it.
    y, prox, rng = random_problem(6, 3, 43)
    grad = torch.from_numpy(rng.standard_normal((6, 3)))
    features = torch.from_numpy(y).requires_grad_(True)
    frame = nearest_etf(features, torch.from_numpy(prox), solver="trust-regions", max_iterations=1)
    torch.autograd.backward(frame, grad)
    optimum = nearest_etf(torch.from_numpy(y), torch.from_numpy(prox))
    assert (frame.detach() - optimum).abs().max() > 1e-6  # really unconverged
    dense = dense_ddn_backward(
        torch.from_numpy(y), frame.detach(), torch.from_numpy(prox), 1e-3, grad
    )
    torch.testing.assert_close(features.grad, dense, atol=1e-9 * dense.abs().max(), rtol=0)


# --- distance ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("dim", "num_classes"), SIZES)
def test_etf_distance_equals_brute_force_minimum(dim, num_classes):
    y, _, rng = random_problem(dim, num_classes, 51)
    y = 3.0 * y  # the formula holds at any scale
    # The minimiser over St(d, K) of ||Y - P M/sqrt(K-1)||^2 is polar(Y M) (delta = 0).
    frame = numpy_polar(y @ numpy_centering(num_classes))
    brute = objective(y, frame, frame, 0.0)
    distance = etf_distance(torch.from_numpy(y))
    assert distance.dtype == torch.float64
    assert abs(float(distance) - brute) < 1e-12
    for _ in range(100):
        assert objective(y, random_stiefel(dim, num_classes, rng), frame, 0.0) >= brute - 1e-12
    assert abs(float(etf_distance(torch.from_numpy(etf_features(dim, num_classes, 1))))) < 1e-12


# --- validation --------------------------------------------------------------------------------


def test_errors_name_the_problem():
    good = torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"2-D \(d, K\).*shape \(6,\)"):
        nearest_etf(torch.randn(6))
    with pytest.raises(ValueError, match=r"2-D \(d, K\).*shape \(2, 6, 3\)"):
        nearest_etf(torch.randn(2, 6, 3))
    with pytest.raises(ValueError, match=r"dim=2 < num_classes=3.*at least 3"):
        nearest_etf(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"num_classes=1 is too small.*K >= 2"):
        nearest_etf(torch.randn(4, 1))
    for bad in (float("nan"), float("inf")):
        broken = good.clone()
        broken[1, 2] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            nearest_etf(broken)
    with pytest.raises(ValueError, match=r"prox must be a \(6, 3\) tensor, got \(6, 2\)"):
        nearest_etf(good, torch.eye(6, 2))
    with pytest.raises(ValueError, match=r"prox must be a \(6, 3\) tensor, got ndarray"):
        nearest_etf(good, np.eye(6, 3))
    with pytest.raises(
        ValueError, match=r"prox must have orthonormal columns.*max\|\(P\^T P - I\) x\|"
    ):
        nearest_etf(good, 2 * torch.eye(6, 3))
    # Unit-norm columns that are not orthogonal: caught by the probes, not the norms.
    repeated = torch.eye(6, 3)
    repeated[:, 2] = repeated[:, 1]
    with pytest.raises(ValueError, match="prox must have orthonormal columns"):
        nearest_etf(good, repeated)
    tilted = torch.eye(6, 3)
    tilted[:, 2] = torch.tensor([0.0, 0.01, 1.0, 0.0, 0.0, 0.0]) / (1 + 1e-4) ** 0.5
    with pytest.raises(ValueError, match="prox must have orthonormal columns"):
        nearest_etf(good, tilted.double())
    nan_prox = torch.eye(6, 3)
    nan_prox[0, 0] = float("nan")
    with pytest.raises(ValueError, match="prox must have orthonormal columns"):
        nearest_etf(good, nan_prox)
    for delta in (-1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"delta=.* must be a finite number >= 0"):
            nearest_etf(good, delta=delta)
    with pytest.raises(ValueError, match=r"solver='newton' is not supported"):
        nearest_etf(good, solver="newton")
    with pytest.raises(ValueError, match=r"max_iterations=0 must be an integer >= 1"):
        nearest_etf(good, solver="trust-regions", max_iterations=0)
    with pytest.raises(TypeError, match=r"features must be a torch\.Tensor, got ndarray"):
        nearest_etf(np.zeros((6, 3)))
    with pytest.raises(TypeError, match="features must be floating point"):
        nearest_etf(torch.zeros(6, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"d < K.*transpose"):
        polar_factor(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"solver='newton-schulz' is not supported by polar"):
        polar_factor(torch.randn(4, 3), solver="newton-schulz")
    with pytest.raises(ValueError, match=r"rotation='random' is not supported"):
        simplex_etf(3, 5, "random")
    with pytest.raises(ValueError, match="rotation must have orthonormal columns"):
        simplex_etf(3, 5, torch.ones(5, 3))
    with pytest.raises(ValueError, match=r"dim=2 < num_classes=3"):
        haar_stiefel(2, 3)
    with pytest.raises(ValueError, match=r"num_classes=1 is too small"):
        etf_distance(torch.randn(4, 1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_prox_check_at_large_k_uses_norms_and_a_probe(dtype):
    # K > 16: exact column norms and one fixed probe vector, O(dK); judged in the prox's dtype.
    rng = np.random.default_rng(12)
    y = torch.from_numpy(random_problem(40, 20, 0)[0])
    frame = torch.from_numpy(random_stiefel(40, 20, rng)).to(dtype)
    assert nearest_etf(y, frame).shape == (40, 20)  # a float32-rounded frame passes too
    repeated = frame.clone()
    repeated[:, 5] = repeated[:, 4]  # unit norms, two equal columns: only the probe sees it
    with pytest.raises(ValueError, match="prox must have orthonormal columns"):
        nearest_etf(y, repeated)
    tilted = frame.double().clone()  # column 7 turned by 1e-2 towards column 3: still unit norm
    tilted[:, 7] = (tilted[:, 7] + 1e-2 * tilted[:, 3]) / math.sqrt(1 + 1e-4)
    with pytest.raises(ValueError, match=rf"> {1e-4 if dtype == torch.float32 else 1e-8:g}"):
        nearest_etf(y, tilted.to(dtype))


def compute_dtype_problem(kind, dim, num_classes, seed):
    """(Y, prox) float64 numpy: random, collapsed (a simplex ETF + 1e-6 noise) or rank-deficient
    (rank(Y M) = max(1, K // 2))."""
    y, prox, rng = random_problem(dim, num_classes, seed)
    if kind == "collapsed":
        y = etf_features(dim, num_classes, seed) + 1e-6 * rng.standard_normal((dim, num_classes))
    elif kind == "rank-deficient":
        rank = max(1, num_classes // 2)
        y = rng.standard_normal((dim, rank)) @ rng.standard_normal((rank, num_classes))
    return y / np.linalg.norm(y), prox


@pytest.mark.parametrize("route", ["auto", "svd", "newton-schulz"])
@pytest.mark.parametrize("kind", ["random", "collapsed", "rank-deficient"])
@pytest.mark.parametrize(("dim", "num_classes"), [(64, 10), (5, 2), (6, 6)])
def test_compute_dtype_float32_within_documented_error(route, kind, dim, num_classes):
    # docs/etf.md, "compute_dtype": float32 solves carry ~u_32 cond(A) (u_32 = 6e-8, cond(A) up
    # to ~2/delta = 2e3 at K = 2): W (through P M) and dL/dY against numpy's float64 SVD.
    y, prox = compute_dtype_problem(kind, dim, num_classes, seed=dim + num_classes)
    delta = 1e-3
    centring = numpy_centering(num_classes)
    c = 2 / math.sqrt(num_classes - 1)
    matrix = c * y @ centring + delta * prox
    exact = numpy_polar(matrix)
    weights = np.random.default_rng(1).standard_normal((num_classes, dim))
    features = torch.from_numpy(y).requires_grad_(True)
    frame = nearest_etf(features, torch.from_numpy(prox), delta, route, compute_dtype=torch.float32)
    assert frame.dtype == torch.float64  # the features' dtype, whatever the compute dtype
    (etf_classifier(frame) * torch.from_numpy(weights)).sum().backward()
    cond = np.linalg.cond(matrix)
    bound = 2.0**-24 * cond
    error = np.linalg.norm((frame.detach().numpy() - exact) @ centring) / np.linalg.norm(
        exact @ centring
    )
    assert error < 20 * bound
    reference = torch.from_numpy(y).requires_grad_(True)
    (
        etf_classifier(nearest_etf(reference, torch.from_numpy(prox), delta, "svd"))
        * torch.from_numpy(weights)
    ).sum().backward()
    gradient_error = (features.grad - reference.grad).norm() / reference.grad.norm()
    assert gradient_error < 100 * bound  # the gradient divides by s_min once more


def test_compute_dtype_errors():
    y = torch.randn(6, 3, dtype=torch.float64)
    for dtype in (torch.float16, torch.bfloat16, torch.int32):
        with pytest.raises(ValueError, match=rf"compute_dtype={dtype} is not supported; use"):
            nearest_etf(y, compute_dtype=dtype)


@pytest.mark.parametrize("route", ["auto", *ROUTES, "trust-regions"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_raise_for_every_route(route, bad):
    # The Gram and Newton-Schulz routes find NaN/Inf themselves (failed threshold, no
    # convergence) and check only then; the others check first. Same error either way.
    y = torch.randn(6, 3, dtype=torch.float64)
    y[2, 1] = bad
    with pytest.raises(ValueError, match=r"features contain NaN or Inf; check the backbone"):
        nearest_etf(y, solver=route)


# Every device this machine has: the CPU always, CUDA where present (a GPU machine runs both,
# a CPU-only CI runs the CPU case instead of reporting a skip).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_device_matches_float64_cpu_reference(device, dtype, route):
    y, prox, _ = random_problem(32, 8, 0)
    # float64 on the CPU, from numpy's SVD
    reference = torch.from_numpy(
        numpy_polar(2 / math.sqrt(7) * y @ numpy_centering(8) + 1e-3 * prox)
    )
    features = torch.from_numpy(y).to(device, dtype).requires_grad_(True)
    result = nearest_etf(features, torch.from_numpy(prox).to(device, dtype), solver=route)
    assert result.device.type == device and result.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(result.cpu().double(), reference, atol=tolerance, rtol=0)
    result.sum().backward()
    assert features.grad.device.type == device and features.grad.dtype == dtype


@pytest.mark.parametrize("route", ROUTES)
def test_large_k_backward_forms_match_finite_differences(route):
    """K = 36 >= 32 with 2d >= 5K: the Gram and SVD routes use the P form of the backward and
    Newton-Schulz its K x K (not block) iteration; the vector-Jacobian product must equal a
    central finite difference of <G, P(Y)> along a random direction (float64)."""
    dim, num_classes, delta = 90, 36, 1e-3
    y, prox, _ = random_problem(dim, num_classes, 5)
    generator = torch.Generator().manual_seed(9)
    upstream = torch.randn(dim, num_classes, generator=generator, dtype=torch.float64)
    direction = torch.randn(dim, num_classes, generator=generator, dtype=torch.float64)
    features = torch.from_numpy(y).requires_grad_(True)
    prox_tensor = torch.from_numpy(prox)
    (nearest_etf(features, prox_tensor, delta, route) * upstream).sum().backward()
    step = 1e-6
    with torch.no_grad():
        plus = nearest_etf(features + step * direction, prox_tensor, delta, route)
        minus = nearest_etf(features - step * direction, prox_tensor, delta, route)
    finite_difference = float(((plus - minus) * upstream).sum()) / (2 * step)
    assert math.isclose(float((features.grad * direction).sum()), finite_difference, rel_tol=1e-6)
