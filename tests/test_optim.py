"""AGD against a numpy re-derivation of method.md section 4; factories against torch's formulas."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from guided_nc.optim import (
    AGD,
    agd,
    build_optimizer,
    build_scheduler,
    orthogonal_init_,
    weight_scale,
)


def numpy_agd_step(weights, grads, gains, lr=1.0):
    """One AGD step in numpy float64; ``grads[i] is None`` = no gradient (counts in L)."""
    depth = len(weights)

    def scale(w):
        return math.sqrt(w.shape[0] / w.shape[1]) / math.sqrt(int(np.prod(w.shape[2:], dtype=int)))

    def slice_norms(g):
        if g.ndim == 2:
            return np.array(np.linalg.norm(g))
        norms = np.zeros(g.shape[2:])
        for position in np.ndindex(*g.shape[2:]):
            norms[position] = np.linalg.norm(g[(slice(None), slice(None), *position)])
        return norms

    total = sum(
        scale(w) * slice_norms(g).sum()
        for w, g in zip(weights, grads, strict=True)
        if g is not None
    )
    eta = math.log((1 + math.sqrt(1 + 4 * total / depth)) / 2)
    updated = []
    for w, g, gain in zip(weights, grads, gains, strict=True):
        if g is None:
            updated.append(w.copy())
            continue
        norms = slice_norms(g)
        with np.errstate(invalid="ignore", divide="ignore"):
            direction = np.where(norms > 0, g / norms, 0.0)
        updated.append(w - lr * gain * eta / depth * scale(w) * direction)
    return updated, eta


def _tensors(dtype, generator):
    shapes = [(3, 4), (2, 3, 2, 2), (4, 2), (2, 2), (3, 2, 3)]
    weights = [torch.randn(s, generator=generator, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, generator=generator, dtype=dtype) for s in shapes]
    grads[2].zero_()  # zero gradient: no update, contributes 0 to G
    grads[1][:, :, 0, 1] = 0  # one zero kernel slice of the 4-D tensor
    grads[3] = None  # no gradient at all: still counts in L
    return weights, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_agd_step_matches_numpy(dtype):
    generator = torch.Generator().manual_seed(0)
    weights, grads = _tensors(dtype, generator)
    params = [w.clone().requires_grad_(True) for w in weights]
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else g.clone()
    groups = [{"params": params[:2], "gain": 10.0}, {"params": params[2:], "gain": 3.0}]
    optimizer = AGD(groups, gain=10.0)
    assert optimizer.last_eta is None
    loss = optimizer.step(closure=lambda: torch.tensor(1.5))
    assert float(loss) == 1.5
    expected, eta = numpy_agd_step(
        [w.double().numpy() for w in weights],
        [None if g is None else g.double().numpy() for g in grads],
        gains=[10.0, 10.0, 3.0, 3.0, 3.0],
    )
    tolerance = (
        {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}
    )
    for p, e in zip(params, expected, strict=True):
        assert p.dtype == dtype
        torch.testing.assert_close(p.detach().double(), torch.from_numpy(e), **tolerance)
    assert math.isclose(float(optimizer.last_eta), eta, rel_tol=1e-6)
    # The step never writes the gradients.
    for p, g in zip(params, grads, strict=True):
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)
    assert torch.equal(params[2].detach(), weights[2])  # zero gradient: unchanged


@pytest.mark.parametrize("strict", [True, False])
def test_functional_agd_matches_numpy_and_refuses_non_finite_gradients(strict):
    """The functional update (what AGD.step calls) against the numpy re-derivation, with the
    step sizes lr * gain * s_l / L passed in; a NaN gradient moves no weight in either mode."""
    generator = torch.Generator().manual_seed(4)
    weights, grads = _tensors(torch.float64, generator)
    present = [i for i, g in enumerate(grads) if g is not None]
    params = [weights[i].clone() for i in present]
    depth, gain = len(weights), 10.0
    step_sizes = [gain * weight_scale(p.shape) / depth for p in params]
    eta, bad = agd(params, [grads[i] for i in present], step_sizes, depth, strict=strict)
    expected, expected_eta = numpy_agd_step(
        [w.numpy() for w in weights],
        [None if g is None else g.numpy() for g in grads],
        gains=[gain] * depth,
    )
    assert not bad.any() and math.isclose(float(eta), expected_eta, rel_tol=1e-12)
    for p, i in zip(params, present, strict=True):
        torch.testing.assert_close(p, torch.from_numpy(expected[i]), atol=1e-12, rtol=1e-12)
    poisoned = [g.clone() for g in (grads[i] for i in present)]
    poisoned[1][0, 0, 0, 0] = float("nan")
    before = [p.clone() for p in params]
    _, bad = agd(params, poisoned, step_sizes, depth, strict=strict)
    assert bad.tolist() == [False, True, False, False]
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)


def test_agd_eta_formula_and_no_gradients():
    weight = nn.Parameter(torch.zeros(2, 2))
    optimizer = AGD([weight])
    assert optimizer.step() is None and optimizer.last_eta is None  # no gradients: no-op
    weight.grad = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # ||g|| = 5, s = 1, L = 1: G = 5
    optimizer.step()
    assert math.isclose(float(optimizer.last_eta), math.log((1 + math.sqrt(21)) / 2), rel_tol=1e-6)


def test_weight_scale():
    assert weight_scale((6, 3)) == math.sqrt(2)
    assert math.isclose(weight_scale((4, 16, 3, 3)), 0.5 / 3)
    assert math.isclose(weight_scale((4, 4, 5)), 1 / math.sqrt(5))


def test_agd_rejects_one_dimensional_parameters():
    model = nn.Linear(3, 2)
    with pytest.raises(
        ValueError, match=r"parameter #1 with shape \(2,\).*Exclude it.*without biases"
    ):
        AGD(model.parameters())
    with pytest.raises(ValueError, match=r"parameter 'bias' with shape \(2,\)"):
        AGD(model.named_parameters())
    optimizer = AGD([model.weight])
    with pytest.raises(ValueError, match=r"parameter #1 with shape \(2,\)"):
        optimizer.add_param_group({"params": [model.bias]})
    assert len(optimizer.param_groups) == 1 and optimizer.num_tensors == 1
    with pytest.raises(ValueError, match=r"gain=-1"):
        AGD([model.weight], gain=-1)


def test_agd_named_parameters_work():
    model = nn.Linear(3, 2, bias=False)
    optimizer = AGD(model.named_parameters())
    assert optimizer.param_groups[0]["param_names"] == ["weight"]
    model(torch.randn(4, 3)).sum().backward()
    before = model.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model.weight)


def _agd_run(optimizer, params, gradients):
    for gradient in gradients:
        for p, g in zip(params, gradient, strict=True):
            p.grad = g.clone()
        optimizer.step()


def test_agd_state_dict_round_trip():
    generator = torch.Generator().manual_seed(1)
    initial = [torch.randn(3, 4, generator=generator), torch.randn(2, 3, 3, 3, generator=generator)]
    gradients = [[torch.randn_like(w) for w in initial] for _ in range(4)]

    def fresh():
        params = [w.clone().requires_grad_(True) for w in initial]
        optimizer = AGD(params, gain=5.0)
        optimizer.param_groups[0]["lr"] = 0.7  # as a scheduler would leave it
        return params, optimizer

    params, optimizer = fresh()
    _agd_run(optimizer, params, gradients)
    uninterrupted = [p.detach().clone() for p in params]

    params, optimizer = fresh()
    _agd_run(optimizer, params, gradients[:2])
    buffer = io.BytesIO()
    torch.save(
        {"optimizer": optimizer.state_dict(), "params": [p.detach() for p in params]}, buffer
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    params = [w.clone().requires_grad_(True) for w in saved["params"]]
    optimizer = AGD(params)  # default gain and lr: both come back from the state_dict
    optimizer.load_state_dict(saved["optimizer"])
    assert optimizer.param_groups[0]["gain"] == 5.0 and optimizer.param_groups[0]["lr"] == 0.7
    assert torch.equal(optimizer.last_eta, saved["optimizer"]["last_eta"])
    _agd_run(optimizer, params, gradients[2:])
    for expected, got in zip(uninterrupted, params, strict=True):
        assert torch.equal(expected, got.detach())


# --- orthogonal init ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (4, 4)])
def test_orthogonal_init_matrix(shape):
    weight = torch.empty(shape, dtype=torch.float64)
    orthogonal_init_(weight, generator=torch.Generator().manual_seed(0))
    scale = math.sqrt(shape[0] / shape[1])
    gram = weight @ weight.T if shape[0] <= shape[1] else weight.T @ weight
    torch.testing.assert_close(gram, scale**2 * torch.eye(min(shape), dtype=torch.float64))


def test_orthogonal_init_kernel_slices_and_seed():
    kernel = torch.empty(4, 2, 3, 3)
    orthogonal_init_(kernel, generator=torch.Generator().manual_seed(0))
    scale = math.sqrt(4 / 2) / 3
    slices = [kernel[:, :, i, j] for i in range(3) for j in range(3)]
    for weight in slices:
        torch.testing.assert_close(weight.T @ weight, scale**2 * torch.eye(2), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(slices[0], slices[1])  # independent draws per position
    again = torch.empty(4, 2, 3, 3)
    orthogonal_init_(again, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kernel, again)


def test_orthogonal_init_module_skips_vectors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    bias_before = model[0].bias.detach().clone()
    initialised = orthogonal_init_(model, generator=torch.Generator().manual_seed(0))
    assert [tuple(t.shape) for t in initialised] == [(4, 3, 3, 3), (2, 4)]
    assert torch.equal(model[0].bias, bias_before)
    with pytest.raises(ValueError, match=r"tensor #1 with shape \(4,\)"):
        orthogonal_init_([model[0].weight, model[0].bias])


# --- factories ---------------------------------------------------------------------------------


def test_build_optimizer_types_and_defaults():
    weight = nn.Parameter(torch.randn(3, 3))
    agd = build_optimizer("agd", [weight], gain=4.0)
    assert isinstance(agd, AGD) and agd.param_groups[0]["gain"] == 4.0
    sgd = build_optimizer("sgd", [weight], lr=0.2, weight_decay=1e-4, momentum=0.8)
    assert isinstance(sgd, torch.optim.SGD)
    assert (sgd.defaults["lr"], sgd.defaults["weight_decay"], sgd.defaults["momentum"]) == (
        0.2,
        1e-4,
        0.8,
    )
    assert isinstance(build_optimizer("adam", [weight]), torch.optim.Adam)
    adamw = build_optimizer("adamw", [weight])
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 0.01
    with pytest.raises(ValueError, match=r"weight_decay=0.1 is not supported by AGD"):
        build_optimizer("agd", [weight], weight_decay=0.1)
    with pytest.raises(ValueError, match=r"name='lbfgs' is not supported"):
        build_optimizer("lbfgs", [weight])


def test_schedulers_follow_formulas():
    weight = nn.Parameter(torch.randn(2, 2))
    sgd = build_optimizer("sgd", [weight], lr=1.0)
    cosine = build_scheduler(sgd, "cosine", total_steps=8)
    rates = []
    for _ in range(8):
        rates.append(sgd.param_groups[0]["lr"])
        sgd.step()
        cosine.step()
    expected = [0.5 * (1 + math.cos(math.pi * t / 8)) for t in range(8)]
    np.testing.assert_allclose(rates, expected, atol=1e-12)

    sgd = build_optimizer("sgd", [weight], lr=1.0)
    step = build_scheduler(sgd, "step", step_size=2, gamma=0.5)
    rates = []
    for _ in range(5):
        rates.append(sgd.param_groups[0]["lr"])
        sgd.step()
        step.step()
    np.testing.assert_allclose(rates, [1, 1, 0.5, 0.5, 0.25])

    sgd = build_optimizer("sgd", [weight], lr=0.3)
    constant = build_scheduler(sgd, "none")
    for _ in range(3):
        sgd.step()
        constant.step()
    assert sgd.param_groups[0]["lr"] == 0.3


def test_scheduler_scales_agd_gain():
    generator = torch.Generator().manual_seed(2)
    start = torch.randn(3, 4, generator=generator)
    gradient = torch.randn(3, 4, generator=generator)
    weight = nn.Parameter(start.clone())
    optimizer = AGD([weight], gain=10.0)
    scheduler = build_scheduler(optimizer, "step", step_size=1, gamma=0.5)
    optimizer.step()  # no gradients yet: a no-op that keeps the step-before-scheduler order
    scheduler.step()  # lr multiplier 0.5
    weight.grad = gradient.clone()
    optimizer.step()
    expected, _ = numpy_agd_step(
        [start.double().numpy()], [gradient.double().numpy()], [10.0], lr=0.5
    )
    torch.testing.assert_close(
        weight.detach().double(), torch.from_numpy(expected[0]), atol=1e-6, rtol=1e-6
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "linear"}, "name='linear' is not supported"),
        ({"name": "cosine"}, "total_steps=None must be a positive int"),
        ({"name": "step", "step_size": 0}, "step_size=0 must be a positive int"),
        ({"name": "step", "step_size": 2, "gamma": 1.5}, "gamma=1.5"),
    ],
)
def test_scheduler_errors(kwargs, match):
    optimizer = build_optimizer("sgd", [nn.Parameter(torch.randn(2, 2))])
    with pytest.raises(ValueError, match=match):
        build_scheduler(optimizer, **kwargs)


# --- non-finite gradients and argument validation ------------------------------------------------


def _named_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_agd_strict_refuses_a_non_finite_gradient_and_names_the_parameter(bad):
    model = _named_model()
    optimizer = AGD(model.named_parameters(), validation="strict")
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    before = [p.detach().clone() for p in model.parameters()]
    eta = optimizer.last_eta.clone()
    model.zero_grad()
    model(torch.randn(5, 4)).sum().backward()
    model[1].weight.grad[0, 1] = bad
    with pytest.raises(
        ValueError, match=r"refused 1 step\(s\): the gradient of parameter '1\.weight'"
    ):
        optimizer.step()
    for p, q in zip(before, model.parameters(), strict=True):
        assert torch.equal(p, q)  # no weight changed, not even the finite one
    assert torch.equal(optimizer.last_eta, eta)


def test_agd_deferred_refuses_on_the_device_and_reports_at_check():
    model = _named_model()
    optimizer = AGD(model.named_parameters(), validation="deferred")
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(5, 4, generator=generator) for _ in range(3)]
    model(inputs[0]).sum().backward()
    optimizer.step()
    eta = optimizer.last_eta.clone()
    before = [p.detach().clone() for p in model.parameters()]
    model.zero_grad()
    model(inputs[1]).sum().backward()
    model[0].weight.grad[2, 2] = float("nan")
    optimizer.step()  # no error, no host read
    for p, q in zip(before, model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(optimizer.last_eta, eta)  # a refused step leaves eta as it was
    with pytest.raises(
        ValueError, match=r"parameter '0\.weight' with shape \(3, 4\) is not finite"
    ):
        optimizer.check()
    optimizer.check()  # reset
    # The next clean step is the one numpy predicts from the unchanged weights.
    model.zero_grad()
    model(inputs[2]).sum().backward()
    grads = [p.grad.double().numpy() for p in model.parameters()]
    expected, _ = numpy_agd_step([w.double().numpy() for w in before], grads, gains=[10.0, 10.0])
    optimizer.step()
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach().double(), torch.from_numpy(e), atol=1e-6, rtol=1e-6)
    # A checkpoint reports pending refusals too.
    model[1].weight.grad[0, 0] = float("inf")
    optimizer.step()
    with pytest.raises(ValueError, match=r"parameter '1\.weight'"):
        optimizer.state_dict()


def test_agd_validation_modes():
    weight = nn.Parameter(torch.zeros(2, 2))
    assert AGD([weight]).strict(torch.device("cpu"))
    assert not AGD([weight]).strict(torch.device("cuda"))
    assert not AGD([weight], validation="deferred").strict(torch.device("cpu"))
    with pytest.raises(ValueError, match=r"validation='sometimes' is not supported"):
        AGD([weight], validation="sometimes")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": "sgd", "lr": float("nan")}, ValueError, r"lr=nan must be a finite number > 0"),
        ({"name": "sgd", "lr": 0.0}, ValueError, r"lr=0.0 must be a finite number > 0"),
        ({"name": "adam", "lr": -1e-3}, ValueError, r"lr=-0.001 must be a finite number > 0"),
        ({"name": "agd", "lr": float("inf")}, ValueError, r"lr=inf must be a finite number > 0"),
        ({"name": "agd", "gain": 0.0}, ValueError, r"gain=0.0 must be a finite number > 0"),
        ({"name": "agd", "gain": float("nan")}, ValueError, r"gain=nan must be a finite"),
        ({"name": "sgd", "momentum": -0.5}, ValueError, r"momentum=-0.5 must be a finite .* >= 0"),
        ({"name": "sgd", "momentum": float("nan")}, ValueError, r"momentum=nan must be"),
        ({"name": "adamw", "weight_decay": -0.01}, ValueError, r"weight_decay=-0.01 must be"),
        ({"name": "sgd", "weight_decay": float("inf")}, ValueError, r"weight_decay=inf must be"),
        ({"name": "sgd", "lr": "0.1"}, TypeError, r"lr must be a number, got str"),
    ],
)
def test_build_optimizer_refuses_bad_numbers(kwargs, error, match):
    with pytest.raises(error, match=match):
        build_optimizer(params=[nn.Parameter(torch.randn(2, 2))], **kwargs)
