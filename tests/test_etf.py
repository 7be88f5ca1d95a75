"""Tests of guided_nc.etf against independent truth: numpy SVDs, pymanopt's trust regions,
brute-force objectives, finite differences and the dense Proposition-1 backward."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from guided_nc.etf import (
    PolarFactor,
    centering_matrix,
    etf_classifier,
    etf_distance,
    haar_stiefel,
    nearest_etf,
    polar_factor,
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


@pytest.mark.parametrize(("dim", "num_classes", "seed"), [(6, 3, 0), (10, 5, 1), (5, 5, 2)])
def test_nearest_etf_matches_pymanopt_trust_regions(dim, num_classes, seed):
    y, prox, _ = random_problem(dim, num_classes, seed)
    delta = 1e-3
    frame = nearest_etf(torch.from_numpy(y), torch.from_numpy(prox), delta).numpy()
    # Converge TR well past the paper's 1e-6 stopping rule, from prox (the paper's warm start).
    reference = trust_region_nearest_etf(
        torch.from_numpy(y), torch.from_numpy(prox), delta, 300, min_gradient_norm=1e-12
    ).numpy()
    assert abs(objective(y, frame, prox, delta) - objective(y, reference, prox, delta)) < 1e-12
    centring = numpy_centering(num_classes)
    np.testing.assert_allclose(frame @ centring, reference @ centring, atol=1e-8)
    np.testing.assert_allclose(frame, reference, atol=1e-8)


@pytest.mark.parametrize(("dim", "num_classes"), SIZES)
def test_nearest_etf_beats_random_perturbations(dim, num_classes):
    y, prox, rng = random_problem(dim, num_classes, 5)
    delta = 1e-3
    frame = nearest_etf(torch.from_numpy(y), torch.from_numpy(prox), delta).numpy()
    best = objective(y, frame, prox, delta)
    for scale in (1e-4, 1e-2, 1.0):
        for _ in range(50):
            nearby = numpy_polar(frame + scale * rng.standard_normal(frame.shape))
            assert objective(y, nearby, prox, delta) >= best - 1e-12
    for _ in range(50):
        assert objective(y, random_stiefel(dim, num_classes, rng), prox, delta) >= best


@pytest.mark.parametrize(("dim", "num_classes"), SIZES)
def test_nearest_etf_equals_numpy_procrustes(dim, num_classes):
    y, prox, _ = random_problem(dim, num_classes, 7)
    delta = 0.05
    scale = 2 / math.sqrt(num_classes - 1)
    expected = numpy_polar(scale * y @ numpy_centering(num_classes) + delta * prox)
    frame = nearest_etf(torch.from_numpy(y), torch.from_numpy(prox), delta)
    np.testing.assert_allclose(frame.numpy(), expected, atol=1e-12)
    # First-step rule: prox = None means P0 = polar(c Y M + delta eye(d, K)).
    first = nearest_etf(torch.from_numpy(y), None, delta)
    expected_first = numpy_polar(
        scale * y @ numpy_centering(num_classes) + delta * np.eye(dim, num_classes)
    )
    np.testing.assert_allclose(first.numpy(), expected_first, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nearest_etf_dtype_device_and_orthonormality(dtype):
    y, prox, _ = random_problem(128, 50, 0)
    features = torch.from_numpy(y).to(dtype).requires_grad_(True)
    frame = nearest_etf(features, torch.from_numpy(prox).to(dtype))
    assert frame.dtype == dtype and frame.device == features.device
    error = (frame.double().T @ frame.double() - torch.eye(50, dtype=torch.float64)).abs().max()
    assert error <= (1e-5 if dtype == torch.float32 else 1e-12)
    frame.sum().backward()
    assert features.grad.dtype == dtype and torch.isfinite(features.grad).all()


def test_nearest_etf_is_deterministic():
    y = torch.randn(20, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(nearest_etf(y), nearest_etf(y))


def test_nearest_etf_prox_gets_no_gradient():
    y, prox, _ = random_problem(6, 3, 0)
    prox_tensor = torch.from_numpy(prox).requires_grad_(True)
    nearest_etf(torch.from_numpy(y).requires_grad_(True), prox_tensor).sum().backward()
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


@pytest.mark.parametrize(("name", "y"), degenerate_cases(), ids=lambda case: str(case)[:12])
def test_degenerate_inputs_forward_and_gradcheck(name, y):
    dim, num_classes = y.shape
    prox = random_stiefel(dim, num_classes, np.random.default_rng(11))
    delta = 1e-3
    expected = numpy_polar(
        2 / math.sqrt(num_classes - 1) * y @ numpy_centering(num_classes) + delta * prox
    )
    frame = nearest_etf(torch.from_numpy(y), torch.from_numpy(prox), delta)
    np.testing.assert_allclose(frame.numpy(), expected, atol=1e-10)
    if name.startswith("zero"):  # A = delta prox: the answer is prox itself
        np.testing.assert_allclose(frame.numpy(), prox, atol=1e-12)
    if name.startswith("etf"):  # a collapsed Y is its own nearest ETF: P M/sqrt(K-1) = Y
        centred = frame.numpy() @ numpy_centering(num_classes) / math.sqrt(num_classes - 1)
        np.testing.assert_allclose(centred, y, atol=1e-3)  # O(delta) pull towards prox
    features = torch.from_numpy(y).clone().requires_grad_(True)
    prox_tensor = torch.from_numpy(prox)
    assert torch.autograd.gradcheck(lambda f: nearest_etf(f, prox_tensor, delta), (features,))


@pytest.mark.parametrize(("dim", "num_classes"), SIZES)
@pytest.mark.parametrize("with_prox", [True, False])
def test_gradcheck_float64(dim, num_classes, with_prox):
    y, prox, _ = random_problem(dim, num_classes, 21)
    prox_tensor = torch.from_numpy(prox) if with_prox else None
    features = torch.from_numpy(y).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: nearest_etf(f, prox_tensor), (features,))


def test_polar_factor_gradcheck_with_equal_singular_values():
    # A with all singular values equal (a scaled Stiefel point): autograd through the SVD's U, V
    # is undefined here, the polar factor's own backward is not.
    matrix = 0.3 * torch.from_numpy(random_stiefel(5, 3, np.random.default_rng(2)))
    assert torch.autograd.gradcheck(PolarFactor.apply, (matrix.requires_grad_(True),))
    assert torch.autograd.gradcheck(polar_factor, (matrix.detach().requires_grad_(True),))


def central_differences(function, y: np.ndarray, step: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(y)
    for index in np.ndindex(*y.shape):
        plus, minus = y.copy(), y.copy()
        plus[index] += step
        minus[index] -= step
        grad[index] = (function(plus) - function(minus)) / (2 * step)
    return grad


@pytest.mark.parametrize(("dim", "num_classes"), [(6, 3), (4, 4), (5, 2)])
def test_closed_backward_equals_dense_prop1_and_finite_differences(dim, num_classes):
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
    frame = nearest_etf(features, torch.from_numpy(prox), delta)
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


@pytest.mark.parametrize("dtype", DTYPES)
def test_float32_gradient_close_to_float64(dtype):
    # Internal float64 makes the float32 result the rounded float64 one.
    y, prox, rng = random_problem(64, 10, 4)
    grad = torch.from_numpy(rng.standard_normal((64, 10)))
    reference = torch.from_numpy(y).requires_grad_(True)
    torch.autograd.backward(nearest_etf(reference, torch.from_numpy(prox)), grad)
    features = torch.from_numpy(y).to(dtype).requires_grad_(True)
    torch.autograd.backward(nearest_etf(features, torch.from_numpy(prox).to(dtype)), grad.to(dtype))
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
    with pytest.raises(ValueError, match=r"rotation='random' is not supported"):
        simplex_etf(3, 5, "random")
    with pytest.raises(ValueError, match="rotation must have orthonormal columns"):
        simplex_etf(3, 5, torch.ones(5, 3))
    with pytest.raises(ValueError, match=r"dim=2 < num_classes=3"):
        haar_stiefel(2, 3)
    with pytest.raises(ValueError, match=r"num_classes=1 is too small"):
        etf_distance(torch.randn(4, 1))


# Every device this machine has: the CPU always, CUDA where present (a GPU machine runs both,
# a CPU-only CI runs the CPU case instead of reporting a skip).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_device_matches_float64_cpu_reference(device, dtype):
    y, prox, _ = random_problem(32, 8, 0)
    reference = nearest_etf(torch.from_numpy(y), torch.from_numpy(prox))  # float64 on the CPU
    features = torch.from_numpy(y).to(device, dtype).requires_grad_(True)
    result = nearest_etf(features, torch.from_numpy(prox).to(device, dtype))
    assert result.device.type == device and result.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(result.cpu().double(), reference, atol=tolerance, rtol=0)
    result.sum().backward()
    assert features.grad.device.type == device and features.grad.dtype == dtype
