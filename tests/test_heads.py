"""Heads against the formulas of method.md sections 1-3 and 5, re-derived here in numpy float64."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

import guided_nc.heads as heads_module
from guided_nc.heads import (
    FixedETFHead,
    ImplicitETFHead,
    LearnableHead,
    build_head,
    normalize_features,
    renormalize_heads_,
)
from numpy_oracles import numpy_centering, numpy_polar

DTYPES = [torch.float32, torch.float64]
TOLERANCE = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
}


# --- independent numpy oracle ------------------------------------------------------------------


def np_normalize(features: np.ndarray, tau: float) -> np.ndarray:
    return tau * features / np.linalg.norm(features, axis=1, keepdims=True)


def np_etf_weight(frame: np.ndarray) -> np.ndarray:
    """sqrt(K/(K-1)) M P^T."""
    k = frame.shape[1]
    return math.sqrt(k / (k - 1)) * numpy_centering(k) @ frame.T


class NumpyImplicitHead:
    """method.md sections 2, 3, 5 written out in numpy float64, one step at a time."""

    def __init__(self, d, k, tau=5.0, delta=1e-3, alpha_floor=1e-4, momentum=0.1):
        self.d, self.k, self.tau, self.delta = d, k, tau, delta
        self.alpha_floor, self.momentum = alpha_floor, momentum
        self.average = np.zeros((d, k))
        self.frame = np.eye(d, k)
        self.running_mean = np.zeros(d)
        self.seen = np.zeros(k, dtype=bool)
        self.t = 0

    def step(self, features, labels):
        h = np_normalize(features, self.tau)
        k = self.k
        global_mean = h.mean(axis=0)
        present = np.array([np.any(labels == c) for c in range(k)])
        batch = np.zeros((self.d, k))
        for c in range(k):
            if present[c]:
                batch[:, c] = h[labels == c].mean(axis=0) - global_mean
        self.t += 1
        alpha = max(2.0 / (self.t + 1), self.alpha_floor)
        for c in range(k):
            if present[c]:
                self.average[:, c] = alpha * batch[:, c] + (1 - alpha) * self.average[:, c]
        y = self.average / np.linalg.norm(self.average)
        a = 2 / math.sqrt(k - 1) * y @ numpy_centering(k) + self.delta * self.frame  # eye at t=1
        self.frame = numpy_polar(a)
        weight = np_etf_weight(self.frame)
        bias = -weight @ global_mean
        if self.t == 1:
            self.running_mean = global_mean.copy()
        else:
            self.running_mean += self.momentum * (global_mean - self.running_mean)
        self.seen |= present
        return h @ weight.T + bias, weight


def state_copy(module: nn.Module) -> dict:
    return {key: value.clone() for key, value in module.state_dict().items()}


def assert_state_equal(before: dict, module: nn.Module) -> None:
    after = module.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


# --- normalize_features and the learnable head -------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_features_matches_formula(dtype):
    features = torch.randn(7, 4, generator=torch.Generator().manual_seed(0), dtype=dtype)
    expected = np_normalize(features.double().numpy(), 3.0)
    out = normalize_features(features, 3.0)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), torch.from_numpy(expected), **TOLERANCE[dtype])


@pytest.mark.parametrize("bias", [False, True])
def test_learnable_head_unit_rows_and_logits(bias):
    torch.manual_seed(0)
    head = LearnableHead(6, 3, temperature=2.0, bias=bias)
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(3))
    with torch.no_grad():
        head.weight.mul_(torch.tensor([[2.0], [0.5], [3.0]]))
        if bias:
            head.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    features = torch.randn(5, 6)
    weight = head.weight.detach().double().numpy()
    expected = np_normalize(features.double().numpy(), 2.0) @ weight.T
    if bias:
        expected = expected + np.array([0.1, -0.2, 0.3])
    torch.testing.assert_close(
        head(features).double(), torch.from_numpy(expected), atol=1e-5, rtol=1e-5
    )
    model = nn.Sequential(nn.Linear(6, 6), head)
    assert renormalize_heads_(model) == 1
    expected_rows = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    torch.testing.assert_close(head.weight.detach().double(), torch.from_numpy(expected_rows))
    assert ("bias=True" in repr(head)) == bias
    assert [name for name, _ in head.named_parameters()] == (
        ["weight", "bias"] if bias else ["weight"]
    )


def test_renormalize_heads_ignores_etf_heads():
    assert renormalize_heads_(nn.Sequential(FixedETFHead(4, 3), ImplicitETFHead(4, 3))) == 0


# --- fixed ETF head ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias_gradient", [True, False])
def test_fixed_head_training_logits_gradient_and_running_mean(dtype, bias_gradient):
    d, k, tau = 5, 3, 5.0
    head = FixedETFHead(d, k, temperature=tau, bias_gradient=bias_gradient, dtype=dtype)
    weight = np_etf_weight(np.eye(d, k))
    torch.testing.assert_close(head.weight.double(), torch.from_numpy(weight), **TOLERANCE[dtype])
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(6, d, generator=generator, dtype=dtype) for _ in range(3)]
    running = None
    for step, batch in enumerate(batches, start=1):
        features = batch.clone().requires_grad_(True)
        logits = head(features)
        h = np_normalize(batch.double().numpy(), tau)
        mean = h.mean(axis=0)
        expected = (h - mean) @ weight.T
        torch.testing.assert_close(logits.double(), torch.from_numpy(expected), **TOLERANCE[dtype])
        running = mean.copy() if step == 1 else running + 0.1 * (mean - running)
        torch.testing.assert_close(
            head.running_mean.double(), torch.from_numpy(running), **TOLERANCE[dtype]
        )
        # Gradient oracle: autograd on the formula in float64, mean detached or not.
        reference = batch.double().clone().requires_grad_(True)
        h_ref = normalize_features(reference, tau)
        mean_ref = h_ref.mean(dim=0) if bias_gradient else h_ref.mean(dim=0).detach()
        w = torch.from_numpy(weight)
        upstream = torch.randn(6, k, generator=generator, dtype=torch.float64)
        ((h_ref - mean_ref) @ w.T * upstream).sum().backward()
        (logits * upstream.to(dtype)).sum().backward()
        torch.testing.assert_close(features.grad.double(), reference.grad, **TOLERANCE[dtype])
    assert int(head.num_steps) == 3
    # Evaluation: b = -W running_mean, independent of the evaluation batch.
    head.eval()
    eval_batch = torch.randn(4, d, generator=generator, dtype=dtype)
    expected = np_normalize(eval_batch.double().numpy(), tau) @ weight.T - weight @ running
    torch.testing.assert_close(
        head(eval_batch).double(), torch.from_numpy(expected), **TOLERANCE[dtype]
    )
    torch.testing.assert_close(
        head(eval_batch[:1]).double(), torch.from_numpy(expected[:1]), **TOLERANCE[dtype]
    )
    torch.testing.assert_close(
        head.bias.double(), torch.from_numpy(-weight @ running), **TOLERANCE[dtype]
    )


def test_fixed_head_cumulative_running_mean():
    head = FixedETFHead(4, 2, running_mean_momentum=None, dtype=torch.float64)
    generator = torch.Generator().manual_seed(2)
    means = []
    for _ in range(3):
        batch = torch.randn(5, 4, generator=generator, dtype=torch.float64)
        head(batch)
        means.append(np_normalize(batch.numpy(), 5.0).mean(axis=0))
    torch.testing.assert_close(head.running_mean, torch.from_numpy(np.mean(means, axis=0)))


def test_fixed_head_haar_rotation_is_seeded_simplex_etf():
    def make(seed):
        return FixedETFHead(7, 4, rotation="haar", generator=torch.Generator().manual_seed(seed))

    first, again, other = make(3), make(3), make(4)
    assert torch.equal(first.weight, again.weight)
    assert not torch.allclose(first.weight, other.weight)
    weight = first.weight.double().numpy()
    k = 4
    np.testing.assert_allclose(weight @ weight.T, k / (k - 1) * (np.eye(k) - 1 / k), atol=1e-6)
    assert "rotation='haar'" in repr(first)
    # W is state: a head built with another draw takes the saved one.
    other.load_state_dict(first.state_dict())
    assert torch.equal(other.weight, first.weight)


# --- implicit ETF head: exact values -----------------------------------------------------------


def _implicit_batches(d, k, generator, dtype):
    """Three batches: all classes; class k-1 missing; all classes again."""
    labels = [
        torch.arange(2 * k) % k,
        torch.arange(2 * k) % (k - 1),
        torch.tensor([0] * 3 + list(range(k))),
    ]
    return [(torch.randn(len(y), d, generator=generator, dtype=dtype), y) for y in labels]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("d", "k"), [(5, 3), (2, 2), (4, 4)])
def test_implicit_head_matches_numpy_over_steps(dtype, d, k):
    generator = torch.Generator().manual_seed(d * 10 + k)
    head = ImplicitETFHead(d, k, temperature=5.0, delta=1e-3, dtype=dtype)
    oracle = NumpyImplicitHead(d, k)
    for features, labels in _implicit_batches(d, k, generator, dtype):
        logits = head(features, labels)
        expected_logits, expected_weight = oracle.step(features.double().numpy(), labels.numpy())
        tolerance = TOLERANCE[dtype]
        assert logits.dtype == dtype
        torch.testing.assert_close(logits.double(), torch.from_numpy(expected_logits), **tolerance)
        torch.testing.assert_close(
            head.weight.double(), torch.from_numpy(expected_weight), **tolerance
        )
        torch.testing.assert_close(head.frame.double(), torch.from_numpy(oracle.frame), **tolerance)
        torch.testing.assert_close(
            head.class_mean_average.double(), torch.from_numpy(oracle.average), **tolerance
        )
        torch.testing.assert_close(
            head.running_mean.double(), torch.from_numpy(oracle.running_mean), **tolerance
        )
        assert head.classes_seen.tolist() == oracle.seen.tolist()
    assert int(head.num_steps) == 3
    head.eval()
    features = torch.randn(3, d, generator=generator, dtype=dtype)
    expected = (
        np_normalize(features.double().numpy(), 5.0) @ expected_weight.T
        - expected_weight @ oracle.running_mean
    )
    torch.testing.assert_close(
        head(features).double(), torch.from_numpy(expected), **TOLERANCE[dtype]
    )
    torch.testing.assert_close(
        head.bias.double(),
        torch.from_numpy(-expected_weight @ oracle.running_mean),
        **TOLERANCE[dtype],
    )


def test_implicit_head_missing_and_never_seen_classes():
    """A never-seen class keeps column 0; a missing class keeps its previous column exactly."""
    d, k = 6, 4
    head = ImplicitETFHead(d, k, dtype=torch.float64)
    generator = torch.Generator().manual_seed(5)
    head(
        torch.randn(6, d, generator=generator, dtype=torch.float64),
        torch.tensor([0, 1, 0, 1, 2, 2]),
    )
    assert head.classes_seen.tolist() == [True, True, True, False]
    assert torch.equal(head.class_mean_average[:, 3], torch.zeros(d, dtype=torch.float64))
    kept = head.class_mean_average[:, 2].clone()
    head(torch.randn(4, d, generator=generator, dtype=torch.float64), torch.tensor([0, 1, 3, 3]))
    assert torch.equal(head.class_mean_average[:, 2], kept)
    assert head.classes_seen.all()
    # First sighting at step 2 mixes with the zero column: alpha_2 * centred mean (method.md 3).
    assert not torch.equal(head.class_mean_average[:, 3], torch.zeros(d, dtype=torch.float64))


def test_implicit_head_single_class_first_batch_gives_prox_point():
    head = ImplicitETFHead(4, 3, dtype=torch.float64)
    logits = head(torch.randn(5, 4, dtype=torch.float64), torch.zeros(5, dtype=torch.long))
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(head.frame, torch.eye(4, 3, dtype=torch.float64))


def test_implicit_head_near_collapsed_features():
    """Features at the vertices of a simplex ETF (equal singular values) plus tiny noise."""
    d, k = 6, 4
    vertices = np_etf_weight(np.linalg.qr(np.random.default_rng(0).normal(size=(d, k)))[0])
    labels = torch.arange(3 * k) % k
    noise = 1e-7 * np.random.default_rng(1).normal(size=(3 * k, d))
    features = torch.from_numpy(vertices[labels.numpy()] + noise)
    head = ImplicitETFHead(d, k, dtype=torch.float64)
    oracle = NumpyImplicitHead(d, k)
    for _ in range(2):
        logits = head(features, labels)
        expected, _ = oracle.step(features.numpy(), labels.numpy())
        torch.testing.assert_close(logits, torch.from_numpy(expected), atol=1e-9, rtol=1e-9)
    # Collapsed features: without the proximal term the nearest ETF is the features' own
    # simplex, so W equals its rows up to the 1e-7 noise (delta > 0 shifts W by O(delta)).
    exact = ImplicitETFHead(d, k, delta=0.0, dtype=torch.float64)
    exact(features, labels)
    torch.testing.assert_close(exact.weight, torch.from_numpy(vertices), atol=1e-6, rtol=0)


def _centred_batch_means(features, labels, temperature=5.0):
    """Ybar_batch (d, K) in numpy float64: class means minus the global mean of h."""
    h = features.numpy() * temperature / np.linalg.norm(features.numpy(), axis=1, keepdims=True)
    labels = labels.numpy()
    means = np.stack([h[labels == k].mean(axis=0) for k in range(labels.max() + 1)], axis=1)
    return means - h.mean(axis=0)[:, None]


def test_implicit_head_alpha_schedule():
    """alpha_t = max(2/(t+1), floor) as the head applies it: Ybar_t = alpha_t Ybar_batch +
    (1 - alpha_t) Ybar_{t-1}, checked against the formula at t = 1, 2, 3 and at the floor."""
    head = ImplicitETFHead(4, 2, alpha_floor=0.05, dtype=torch.float64)
    generator = torch.Generator().manual_seed(3)
    labels = torch.arange(6) % 2
    expected = np.zeros((4, 2))
    for t, alpha in ((1, 1.0), (2, 2 / 3), (3, 0.5), (100, 0.05)):
        if t == 100:
            head.num_steps.fill_(99)  # the floor: 2/101 < 0.05
        features = torch.randn(6, 4, generator=generator, dtype=torch.float64)
        head(features, labels)
        expected = alpha * _centred_batch_means(features, labels) + (1 - alpha) * expected
        np.testing.assert_allclose(head.class_mean_average.numpy(), expected, atol=1e-12)


def test_implicit_head_eval_before_training_is_canonical_etf():
    head = ImplicitETFHead(5, 3).eval()
    torch.testing.assert_close(head.weight.double(), torch.from_numpy(np_etf_weight(np.eye(5, 3))))
    features = torch.randn(2, 5)
    torch.testing.assert_close(head(features), normalize_features(features, 5.0) @ head.weight.T)


# --- implicit ETF head: gradients --------------------------------------------------------------


def _warm_state(d, k, steps, **kwargs):
    head = ImplicitETFHead(d, k, dtype=torch.float64, **kwargs)
    generator = torch.Generator().manual_seed(11)
    for _ in range(steps):
        head(
            torch.randn(2 * k, d, generator=generator, dtype=torch.float64), torch.arange(2 * k) % k
        )
    return head.state_dict()


@pytest.mark.parametrize(("d", "k", "steps"), [(4, 3, 0), (4, 3, 2), (2, 2, 1)])
def test_implicit_head_gradcheck(d, k, steps):
    state = _warm_state(d, k, steps)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])[: 2 * k] % k
    labels[:k] = torch.arange(k)  # every class present

    def logits_fn(features):
        head = ImplicitETFHead(d, k, dtype=torch.float64)
        head.load_state_dict(state)
        return head(features, labels)

    features = torch.randn(
        len(labels), d, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )
    assert torch.autograd.gradcheck(logits_fn, (features.requires_grad_(True),))


@pytest.mark.parametrize("solver", ["gram", "newton-schulz"])
def test_implicit_head_gradcheck_at_large_k(solver):
    """K = 33 > 32: the backward gathers the class rows instead of the one-hot product and, for
    Newton-Schulz, iterates on the K x K blocks; finite differences must agree (float64)."""
    d, k = 34, 33
    labels = torch.cat([torch.arange(k), torch.tensor([0, 5])])
    features = torch.randn(
        len(labels), d, dtype=torch.float64, generator=torch.Generator().manual_seed(6)
    )
    head = ImplicitETFHead(d, k, dtype=torch.float64, solver=solver)
    head(features.flip(0), labels.flip(0))  # one step first: a non-trivial prox and average
    state = head.state_dict()

    def logits_fn(batch):
        fresh = ImplicitETFHead(d, k, dtype=torch.float64, solver=solver)
        fresh.load_state_dict(state)
        return fresh(batch, labels)

    assert torch.autograd.gradcheck(
        logits_fn, (features.requires_grad_(True),), atol=1e-7, rtol=1e-5
    )


def _structured_features(kind):
    """(features, labels) with near-collapsed or rank-deficient class means, d = 6, K = 4."""
    rng = np.random.default_rng(8)
    labels = torch.arange(8) % 4
    if kind == "collapsed":  # class means at a simplex ETF: K-1 equal singular values
        frame = np.linalg.qr(rng.normal(size=(6, 4)))[0]
        base = np_etf_weight(frame)[labels.numpy()]
        return torch.from_numpy(base + 1e-6 * rng.normal(size=base.shape)), labels
    # Rank-deficient: features on the plane span{u, v}, so Y M has rank 2 < K - 1 = 3.
    u, v = np.linalg.qr(rng.normal(size=(6, 2)))[0].T
    position = np.array([-1.0, 0.0, 1.0, 2.0])[labels.numpy()]
    base = v[None] + position[:, None] * u[None]
    return torch.from_numpy(base + 1e-3 * rng.normal(size=base.shape) @ np.outer(u, u)), labels


@pytest.mark.parametrize("kind", ["collapsed", "rank-deficient"])
@pytest.mark.parametrize("steps", [0, 2])
def test_implicit_head_gradcheck_structured(kind, steps):
    features, labels = _structured_features(kind)
    head = ImplicitETFHead(6, 4, dtype=torch.float64)
    for _ in range(steps):
        head(features, labels)
    state = head.state_dict()

    def logits_fn(x):
        fresh = ImplicitETFHead(6, 4, dtype=torch.float64)
        fresh.load_state_dict(state)
        return fresh(x, labels)

    assert torch.autograd.gradcheck(logits_fn, (features.clone().requires_grad_(True),))


@pytest.mark.parametrize("kind", ["collapsed", "rank-deficient"])
def test_implicit_head_structured_matches_numpy(kind):
    features, labels = _structured_features(kind)
    head = ImplicitETFHead(6, 4, dtype=torch.float64)
    oracle = NumpyImplicitHead(6, 4)
    for _ in range(2):
        logits = head(features, labels)
        expected, weight = oracle.step(features.numpy(), labels.numpy())
        torch.testing.assert_close(logits, torch.from_numpy(expected), atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(head.weight, torch.from_numpy(weight), atol=1e-9, rtol=1e-9)


def test_forward_only_gradient_equals_detached_frame():
    d, k = 5, 3
    state = _warm_state(d, k, 2)
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(6, d, generator=generator, dtype=torch.float64)
    labels = torch.arange(6) % k
    upstream = torch.randn(6, k, generator=generator, dtype=torch.float64)

    def gradient(ddn_grad):
        head = ImplicitETFHead(d, k, ddn_grad=ddn_grad, dtype=torch.float64)
        head.load_state_dict(state)
        x = features.clone().requires_grad_(True)
        (head(x, labels) * upstream).sum().backward()
        return x.grad, head.weight.clone()

    full, weight_full = gradient(True)
    forward_only, weight = gradient(False)
    assert torch.equal(weight, weight_full)  # same forward
    # Oracle: the formula with W a constant: logits = W h - W mean(h).
    x = features.clone().requires_grad_(True)
    h = normalize_features(x, 5.0)
    ((h - h.mean(dim=0)) @ weight.T * upstream).sum().backward()
    torch.testing.assert_close(forward_only, x.grad)
    assert (full - forward_only).abs().max() > 1e-6


# --- validation: errors name the argument; a rejected batch changes nothing ---------------------


@pytest.mark.parametrize("head_class", [ImplicitETFHead, FixedETFHead])
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_batch_rejected_state_unchanged(head_class, bad):
    head = head_class(4, 3)
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(6) % 3
    head(torch.randn(6, 4, generator=generator), labels)
    before = state_copy(head)
    features = torch.randn(6, 4, generator=generator)
    features[2, 1] = float(bad)
    with pytest.raises(ValueError, match=r"features contain NaN or Inf"):
        head(features, labels)
    assert_state_equal(before, head)
    head.eval()
    with pytest.raises(ValueError, match=r"features contain NaN or Inf"):
        head(features)


@pytest.mark.parametrize("head_class", [ImplicitETFHead, FixedETFHead])
@pytest.mark.parametrize("bad_label", [3, -1])
def test_out_of_range_labels_rejected_state_unchanged(head_class, bad_label):
    head = head_class(4, 3)
    head(torch.randn(6, 4), torch.arange(6) % 3)
    before = state_copy(head)
    labels = torch.tensor([0, 1, 2, bad_label, 0, 1])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        head(torch.randn(6, 4), labels)
    assert_state_equal(before, head)


@pytest.mark.parametrize("head_class", [ImplicitETFHead, FixedETFHead])
@pytest.mark.parametrize("validation", ["strict", "deferred"])
def test_rejection_flagged_by_another_rank(monkeypatch, head_class, validation):
    """Every rank rejects when any rank flags its batch: simulate a remote NaN in the reduction
    (the statistics end with the two error flags [features, labels], summed over ranks)."""

    def reduce_with_remote_error(tensor):
        out = tensor.clone()
        out[-2] += 1  # non-finite features on another rank
        return out

    def reduce_many_with_remote_error(*tensors):  # the implicit head: [sums, counts, flags]
        return (*tensors[:-1], reduce_with_remote_error(tensors[-1]))

    head = head_class(4, 3, validation=validation)
    head(torch.randn(6, 4), torch.arange(6) % 3)  # one clean step first: a non-trivial state
    before = state_copy(head)
    monkeypatch.setattr(heads_module, "all_reduce_sum_with_grad", reduce_with_remote_error)
    monkeypatch.setattr(heads_module, "all_reduce_sums", reduce_many_with_remote_error)
    if validation == "strict":
        with pytest.raises(ValueError, match=r"NaN or Inf \(on 1 rank"):
            head(torch.randn(6, 4), torch.arange(6) % 3)
    else:
        head(torch.randn(6, 4), torch.arange(6) % 3)  # no host read, no error yet
        assert head.rejected_batches.tolist() == [1, 0, 0]
    assert_state_equal(before, head)
    if validation == "deferred":
        with pytest.raises(ValueError, match=r"rejected 1 batch\(es\).*1 with non-finite"):
            head.check()


def test_training_requires_labels():
    head = ImplicitETFHead(4, 3)
    with pytest.raises(ValueError, match=r"labels=None.*training mode"):
        head(torch.randn(6, 4))
    assert int(head.num_steps) == 0


@pytest.mark.parametrize(
    ("features", "labels", "error", "match"),
    [
        (torch.randn(6, 5), torch.arange(6) % 3, ValueError, r"shape \(batch, 4\)"),
        (torch.randn(0, 4), torch.zeros(0, dtype=torch.long), ValueError, "batch >= 1"),
        (torch.ones(6, 4, dtype=torch.long), torch.arange(6) % 3, TypeError, "floating point"),
        (np.ones((6, 4)), torch.arange(6) % 3, TypeError, "features must be a torch.Tensor"),
        (torch.randn(6, 4), torch.arange(6).float(), TypeError, "labels.long()"),
        (torch.randn(6, 4), torch.arange(5), ValueError, r"labels must have shape \(6,\)"),
        (torch.randn(6, 4), [0, 1, 2, 0, 1, 2], TypeError, "labels must be a torch.Tensor"),
    ],
)
@pytest.mark.parametrize("method", ["standard", "fixed", "implicit"])
def test_bad_inputs(method, features, labels, error, match):
    head = build_head(method, 4, 3)
    before = state_copy(head)
    with pytest.raises(error, match=match):
        head(features, labels)
    assert_state_equal(before, head)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"num_features": 3, "num_classes": 5},
            ValueError,
            "num_features=3 < num_classes=5.*at least 5",
        ),
        ({"num_classes": 1}, ValueError, "num_classes=1"),
        ({"temperature": 0.0}, ValueError, "temperature=0.0"),
        ({"temperature": "5"}, TypeError, "temperature must be a number"),
        ({"delta": -1.0}, ValueError, "delta=-1.0"),
        ({"alpha_floor": 2.0}, ValueError, "alpha_floor=2.0"),
        ({"running_mean_momentum": 1.5}, ValueError, "running_mean_momentum=1.5"),
        ({"solver": "newton"}, ValueError, "solver='newton'"),
        ({"solver": "newton-schulz", "delta": 0.0}, ValueError, r"newton-schulz' needs delta > 0"),
        ({"compute_dtype": torch.float16}, ValueError, "compute_dtype=torch.float16"),
        ({"num_features": 4.0}, TypeError, "num_features must be an int"),
    ],
)
def test_implicit_head_constructor_errors(kwargs, error, match):
    arguments = {"num_features": 4, "num_classes": 3, **kwargs}
    with pytest.raises(error, match=match):
        ImplicitETFHead(**arguments)


def test_fixed_head_constructor_errors():
    with pytest.raises(ValueError, match=r"num_features=2 < num_classes=3"):
        FixedETFHead(2, 3)
    with pytest.raises(ValueError, match=r"rotation='random'"):
        FixedETFHead(4, 3, rotation="random")


def test_build_head():
    assert isinstance(build_head("standard", 4, 3, bias=True), LearnableHead)
    fixed = build_head("fixed", 4, 3, temperature=2.0)
    assert isinstance(fixed, FixedETFHead) and fixed.temperature == 2.0
    implicit = build_head("implicit", 4, 3, delta=0.01)
    assert isinstance(implicit, ImplicitETFHead) and implicit.delta == 0.01
    assert "delta=0.01" in repr(implicit)
    with pytest.raises(ValueError, match=r"method='learned' is not a head"):
        build_head("learned", 4, 3)


# --- resumption --------------------------------------------------------------------------------


def _train(model, head, optimizer, batches):
    outputs = []
    for features, labels in batches:
        optimizer.zero_grad()
        logits = head(model(features), labels)
        nn.functional.cross_entropy(logits, labels).backward()
        optimizer.step()
        renormalize_heads_(head)
        outputs.append(logits.detach())
    return outputs


def _round_trip(obj_state):
    buffer = io.BytesIO()
    torch.save(obj_state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("method", ["implicit", "fixed", "standard"])
def test_state_dict_round_trip_resumes_bit_identically(method):
    d, k = 6, 3
    generator = torch.Generator().manual_seed(7)
    batches = [
        (torch.randn(9, 5, generator=generator), torch.randint(0, k, (9,), generator=generator))
        for _ in range(6)
    ]
    batches[3][1][:] = torch.tensor([0, 1] * 4 + [0])  # a batch with a missing class

    def fresh():
        torch.manual_seed(0)
        model = nn.Linear(5, d)
        head = build_head(method, d, k)
        return (
            model,
            head,
            torch.optim.SGD(
                list(model.parameters()) + list(head.parameters()), lr=0.5, momentum=0.9
            ),
        )

    model, head, optimizer = fresh()
    uninterrupted = _train(model, head, optimizer, batches)

    model, head, optimizer = fresh()
    _train(model, head, optimizer, batches[:3])
    saved = _round_trip(
        {
            "model": model.state_dict(),
            "head": head.state_dict(),
            "optimizer": optimizer.state_dict(),
        }
    )
    model, head, optimizer = fresh()
    model.load_state_dict(saved["model"])
    head.load_state_dict(saved["head"])
    optimizer.load_state_dict(saved["optimizer"])
    resumed = _train(model, head, optimizer, batches[3:])
    for expected, got in zip(uninterrupted[3:], resumed, strict=True):
        assert torch.equal(expected, got)


# --- validation modes: strict raises at once, deferred counts and raises at check() -------------


def _bad_batch(kind, generator, dtype=torch.float32):
    features = torch.randn(6, 4, generator=generator, dtype=dtype)
    labels = torch.arange(6) % 3
    if kind in ("nan", "inf"):
        features[2, 1] = float(kind)
    else:
        labels[3] = 3 if kind == "label-high" else -1
    return features, labels


def _buffers_copy(module):
    return {name: value.clone() for name, value in module.named_buffers()}


@pytest.mark.parametrize("method", ["standard", "fixed", "implicit"])
@pytest.mark.parametrize("kind", ["nan", "inf", "label-high", "label-negative"])
def test_deferred_mode_leaves_state_bit_identical_and_reports_at_check(method, kind):
    generator = torch.Generator().manual_seed(0)
    clean = [(torch.randn(6, 4, generator=generator), torch.arange(6) % 3) for _ in range(2)]
    bad = _bad_batch(kind, generator)
    head = build_head(method, 4, 3, validation="deferred")
    reference = build_head(method, 4, 3, validation="deferred")
    reference.load_state_dict(head.state_dict())
    head(*clean[0])
    before, buffers = state_copy(head), _buffers_copy(head)
    logits = head(*bad)  # no host read: no error here
    assert logits.shape == (6, 3)
    assert_state_equal(before, head)
    counts = head.rejected_batches.tolist()
    assert counts == ([1, 0, 0] if kind in ("nan", "inf") else [0, 1, 0])
    for name, value in head.named_buffers():  # every buffer but the counter is bit-identical
        assert name == "rejected_batches" or torch.equal(value, buffers[name]), name
    with pytest.raises(ValueError, match=r"rejected 1 batch\(es\) since the last check\(\)"):
        head.check()
    head.check()  # the counter was reset: nothing pending
    # The rejected batch is as if it never happened: same state as a head that never saw it.
    head(*clean[1])
    reference(*clean[0])
    reference(*clean[1])
    assert_state_equal(state_copy(reference), head)


@pytest.mark.parametrize("method", ["standard", "fixed", "implicit"])
def test_deferred_rejections_surface_at_train_eval_switch_and_in_eval(method):
    generator = torch.Generator().manual_seed(1)
    head = build_head(method, 4, 3, validation="deferred")
    head(*_bad_batch("nan", generator))
    with pytest.raises(ValueError, match=r"1 with non-finite features \(check the backbone"):
        head.eval()
    assert not head.training  # the switch happened; the report came after it
    features = torch.randn(5, 4, generator=generator)
    features[0, 0] = float("nan")
    head(features)  # eval batches are counted too, without a host read
    assert head.rejected_batches.tolist() == [1, 0, 0]
    with pytest.raises(ValueError, match="non-finite features"):
        head.train()
    labels = torch.arange(6) % 3
    labels[0] = 7
    head(torch.randn(6, 4, generator=generator), labels)
    with pytest.raises(
        ValueError, match=r"1 with labels out of range \(labels must lie in \[0, 2\]"
    ):
        head.check()


@pytest.mark.parametrize("method", ["standard", "fixed", "implicit"])
@pytest.mark.parametrize("kind", ["nan", "label-high"])
def test_strict_mode_raises_at_once_for_every_head(method, kind):
    head = build_head(method, 4, 3, validation="strict")
    generator = torch.Generator().manual_seed(2)
    head(torch.randn(6, 4, generator=generator), torch.arange(6) % 3)
    before = state_copy(head)
    match = r"features contain NaN or Inf" if kind == "nan" else r"labels must lie in \[0, 2\]"
    with pytest.raises(ValueError, match=match):
        head(*_bad_batch(kind, generator))
    assert_state_equal(before, head)
    assert head.rejected_batches.tolist() == [0, 0, 0]


def test_validation_mode_resolution_and_errors():
    head = ImplicitETFHead(4, 3)
    assert head.validation == "auto"
    assert head.strict(torch.device("cpu")) and not head.strict(torch.device("cuda"))
    assert not ImplicitETFHead(4, 3, validation="deferred").strict(torch.device("cpu"))
    assert LearnableHead(4, 3, validation="strict").strict(torch.device("cuda"))
    assert "validation='auto'" in repr(head) and "compute_dtype=torch.float64" in repr(head)
    for head_class in (LearnableHead, FixedETFHead, ImplicitETFHead):
        with pytest.raises(ValueError, match=r"validation='lazy' is not supported; use 'auto'"):
            head_class(4, 3, validation="lazy")
    assert "rejected_batches" not in head.state_dict()  # a report, not state


def test_deferred_newton_schulz_non_convergence_is_rejected(monkeypatch):
    """A Newton-Schulz solve that did not converge is a rejected step, counted and reported."""
    import guided_nc.etf as etf_module

    head = ImplicitETFHead(6, 3, solver="newton-schulz", validation="deferred")
    generator = torch.Generator().manual_seed(3)
    head(torch.randn(9, 6, generator=generator), torch.arange(9) % 3)
    assert head.rejected_batches.tolist() == [0, 0, 0]  # the real schedule converges
    before = state_copy(head)
    # Two steps of the schedule cannot lift singular values of ~1e-3 to 1.
    real = etf_module.newton_schulz_schedule
    monkeypatch.setattr(etf_module, "newton_schulz_schedule", lambda *a: real(*a)[:2])
    head(torch.randn(9, 6, generator=generator), torch.arange(9) % 3)
    assert_state_equal(before, head)
    assert head.rejected_batches.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match=r"solve did not converge.*solver='gram' or 'svd'"):
        head.check()
    # Strict mode reads the flag on the host and answers with the SVD instead.
    strict = ImplicitETFHead(6, 3, solver="newton-schulz", validation="strict")
    strict.load_state_dict(before)
    features, labels = torch.randn(9, 6, generator=generator), torch.arange(9) % 3
    strict(features, labels)
    oracle = ImplicitETFHead(6, 3, solver="svd", validation="strict")
    oracle.load_state_dict(before)
    oracle(features, labels)
    torch.testing.assert_close(strict.frame, oracle.frame, atol=1e-6, rtol=0)


# --- precision: any frame dtype, float32 -> float64 continuation, half precision ----------------


def test_trust_region_head_trains_past_step_two_in_the_default_dtype():
    head = ImplicitETFHead(32, 10, solver="trust-regions")
    oracle = NumpyImplicitHead(32, 10)
    generator = torch.Generator().manual_seed(4)
    for _ in range(4):
        features = torch.randn(40, 32, generator=generator)
        labels = torch.arange(40) % 10
        head(features, labels)
        oracle.step(features.double().numpy(), labels.numpy())
    assert int(head.num_steps) == 4
    # 30 trust-region iterations stop at gradient norm 1e-6: P agrees to ~1e-6.
    torch.testing.assert_close(
        head.frame.double(), torch.from_numpy(oracle.frame), atol=1e-5, rtol=0
    )


def _numpy_oracle_from(head):
    """A NumpyImplicitHead started from ``head``'s current state (float64 copies)."""
    oracle = NumpyImplicitHead(head.num_features, head.num_classes)
    oracle.average = head.class_mean_average.double().numpy().copy()
    oracle.frame = head.frame.double().numpy().copy()
    oracle.running_mean = head.running_mean.double().numpy().copy()
    oracle.seen = head.classes_seen.numpy().copy()
    oracle.t = int(head.num_steps)
    return oracle


@pytest.mark.parametrize("how", ["double()", "load_state_dict"])
def test_float32_to_float64_continuation(how):
    generator = torch.Generator().manual_seed(5)
    batches = [
        (torch.randn(12, 8, generator=generator, dtype=torch.float64), torch.arange(12) % 4)
        for _ in range(6)
    ]
    single = ImplicitETFHead(8, 4)  # float32 state
    for features, labels in batches[:3]:
        single(features.float(), labels)
    if how == "double()":
        head = single.double()
    else:
        head = ImplicitETFHead(8, 4, dtype=torch.float64)
        head.load_state_dict(single.state_dict())  # a float32 frame, judged as float32
    assert head.frame.dtype == torch.float64
    oracle = _numpy_oracle_from(head)  # continues from the float32-rounded state
    for features, labels in batches[3:]:
        logits = head(features, labels)
        expected, weight = oracle.step(features.numpy(), labels.numpy())
        torch.testing.assert_close(logits, torch.from_numpy(expected), atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(head.weight, torch.from_numpy(weight), atol=1e-10, rtol=1e-10)
    assert int(head.num_steps) == 6


def test_loaded_frame_is_validated_once_with_its_own_dtype():
    head = ImplicitETFHead(8, 4, dtype=torch.float64)
    state = ImplicitETFHead(8, 4).state_dict()  # float32
    tilted = state["frame"].clone()
    tilted[:, 1] += 1e-3 * tilted[:, 0]  # off by 1e-3 > the float32 tolerance 1e-4
    with pytest.raises(ValueError, match=r"frame in the state_dict must have orthonormal.*float32"):
        head.load_state_dict({**state, "frame": tilted})
    rounded = state["frame"].clone()
    rounded[:, 1] += 1e-6 * rounded[:, 0]  # float32-level error: fine as float32, not float64
    head.load_state_dict({**state, "frame": rounded})
    with pytest.raises(ValueError, match=r"frame in the state_dict.*float64"):
        head.load_state_dict({**state, "frame": rounded.double()})


@pytest.mark.parametrize("head_class", [FixedETFHead, ImplicitETFHead])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_state_is_refused_with_the_dtype_to_use(head_class, dtype):
    with pytest.raises(ValueError, match=r"too coarse.*use dtype=torch.float32 or torch.float64"):
        head_class(4, 3, dtype=dtype)
    head = head_class(4, 3).to(dtype)
    with pytest.raises(TypeError, match=r"state is torch\.(b?float16).*call head\.float\(\)"):
        head(torch.randn(6, 4, dtype=dtype), torch.arange(6) % 3)
    head.float()
    head(torch.randn(6, 4, dtype=dtype), torch.arange(6) % 3)  # half features are fine


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_features(dtype):
    generator = torch.Generator().manual_seed(6)
    batches = [
        (torch.randn(12, 8, generator=generator).to(dtype), torch.arange(12) % 4) for _ in range(3)
    ]
    head = ImplicitETFHead(8, 4)
    oracle = NumpyImplicitHead(8, 4)
    for features, labels in batches:
        logits = head(features, labels)
        assert logits.dtype == dtype
        # The oracle sees the same half-precision features in float64: the statistics are
        # computed in float32/float64, so only the logits' rounding to the half dtype remains.
        expected, weight = oracle.step(features.double().numpy(), labels.numpy())
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(
            logits.double(), torch.from_numpy(expected), atol=8 * eps * 5, rtol=2 * eps
        )
        torch.testing.assert_close(
            head.weight.double(), torch.from_numpy(weight), atol=1e-5, rtol=0
        )
    fixed = FixedETFHead(8, 4)
    assert fixed(batches[0][0]).dtype == dtype
    learnable = LearnableHead(8, 4)
    out = learnable(batches[0][0])
    assert out.dtype == dtype
    expected = (
        np_normalize(batches[0][0].double().numpy(), 5.0)
        @ learnable.weight.detach().double().numpy().T
    )
    torch.testing.assert_close(out.double(), torch.from_numpy(expected), atol=8 * eps * 5, rtol=0)
    half_head = LearnableHead(8, 4).to(dtype)  # a learnable head may itself be half precision
    assert half_head(batches[0][0].float()).dtype == torch.float32


def test_float32_statistics_stay_accurate_when_class_means_nearly_coincide():
    """Early training: every feature close to one direction, classes apart by 1e-4 of tau.
    The sums are reduced in float32 with the batch shifted by its first row; unshifted float32
    sums would carry ~1e-3 relative error on Ybar here (docs/heads.md)."""
    generator = torch.Generator().manual_seed(7)
    common = 3 * torch.randn(64, generator=generator)
    offsets = torch.randn(4, 64, generator=generator)
    labels = torch.arange(32) % 4
    features = common + 1e-4 * offsets[labels] + 1e-5 * torch.randn(32, 64, generator=generator)
    head = ImplicitETFHead(64, 4)
    head(features, labels)  # float32 features
    # Oracle: float64 means of exactly the float32 h the head classifies (isolates the sums).
    h = head.normalize(features).double().numpy()
    centred = np.stack([h[labels.numpy() == c].mean(0) - h.mean(0) for c in range(4)], axis=1)
    error = np.linalg.norm(head.class_mean_average.double().numpy() - centred)
    # float32 storage of Ybar itself rounds at 6e-8 relative; the unshifted sums gave 1e-3.
    assert error / np.linalg.norm(centred) < 1e-5
    unshifted = (
        (torch.nn.functional.one_hot(labels, 4).float().T @ head.normalize(features)).double() / 8.0
    ).numpy()
    naive = (unshifted - unshifted.mean(0)).T
    assert np.linalg.norm(naive - centred) / np.linalg.norm(centred) > 1e-4  # what it avoids


@pytest.mark.parametrize("method", ["fixed", "implicit"])
def test_compute_dtype_float32_heads_close_to_float64(method):
    generator = torch.Generator().manual_seed(8)
    batches = [(torch.randn(40, 32, generator=generator), torch.arange(40) % 10) for _ in range(3)]
    heads = {
        dtype: build_head(method, 32, 10, compute_dtype=dtype) for dtype in COMPUTE_DTYPES_TESTED
    }
    for features, labels in batches:
        outputs = {}
        for dtype, head in heads.items():
            x = features.clone().requires_grad_(True)
            logits = head(x, labels)
            nn.functional.cross_entropy(logits, labels).backward()
            outputs[dtype] = (logits.detach(), x.grad)
        # docs/etf.md: float32 solves are ~1e-6 on W and 1e-6-4e-5 on the gradient.
        reference, single = outputs[torch.float64], outputs[torch.float32]
        torch.testing.assert_close(single[0], reference[0], atol=1e-4, rtol=1e-4)
        scale = reference[1].abs().max()
        torch.testing.assert_close(single[1], reference[1], atol=1e-3 * scale, rtol=0)
    assert heads[torch.float32].weight.dtype == torch.float32
    with pytest.raises(ValueError, match=r"compute_dtype=torch.float16 is not supported"):
        build_head(method, 32, 10, compute_dtype=torch.float16)
    assert isinstance(build_head("standard", 32, 10, compute_dtype=torch.float32), LearnableHead)


COMPUTE_DTYPES_TESTED = (torch.float64, torch.float32)
