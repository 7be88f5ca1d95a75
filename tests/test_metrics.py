"""Tests of guided_nc.metrics against a brute-force oracle written from the formulas.

The oracle (:func:`brute_force_metrics`) holds every feature in numpy float64 and loops over
samples and classes, as method.md section 6 states the definitions; it shares no code with the
library (the ETF distance is evaluated as the Procrustes objective, not the nuclear-norm formula).
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchmetrics

from guided_nc import distributed
from guided_nc.etf import simplex_etf
from guided_nc.metrics import (
    MARGIN_QUANTILES,
    NeuralCollapseMetrics,
    ce_lower_bound,
    collect_metrics,
    etf_gram_deviation,
    nearest_class_centre,
)

PER_SAMPLE_KEYS = ["ncc_mismatch", "margin_mean", "margin_min", *MARGIN_QUANTILES, "margin_max"]
WEIGHT_KEYS = ["nc2_w", "nc3", "cv_w", "equinorm", "bias_collapse"]


# --- the oracle -----------------------------------------------------------------------------------


def brute_force_metrics(
    features, labels, num_classes, weight=None, bias=None, logits=None, convention="weighted"
):
    """Every metric straight from its definition: numpy float64, explicit loops.

    ``convention``: the global mean is the mean of all samples ("weighted") or of the class
    means ("unweighted", as rhubarbwu/neural-collapse).
    """
    h = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    n, d = h.shape
    k_count = num_classes
    means = np.stack([h[y == k].mean(axis=0) for k in range(k_count)])
    global_mean = h.mean(axis=0) if convention == "weighted" else means.mean(axis=0)
    sigma_w = np.zeros((d, d))
    for i in range(n):
        diff = h[i] - means[y[i]]
        sigma_w += np.outer(diff, diff)
    sigma_w /= n
    sigma_b = np.zeros((d, d))
    for k in range(k_count):
        diff = means[k] - global_mean
        sigma_b += np.outer(diff, diff)
    sigma_b /= k_count
    # Pseudo-inverse on the rank-(K-1) part: the top min(K-1, d) eigenpairs above numpy's tolerance.
    eigenvalues, eigenvectors = np.linalg.eigh(sigma_b)
    order = np.argsort(eigenvalues)[::-1][: min(k_count - 1, d)]
    pinv = np.zeros((d, d))
    for j in order:
        if eigenvalues[j] > eigenvalues.max() * max(d, k_count) * np.finfo(float).eps:
            pinv += np.outer(eigenvectors[:, j], eigenvectors[:, j]) / eigenvalues[j]
    hbar = (means - global_mean).T
    centring = np.eye(k_count) - 1.0 / k_count
    target = centring / math.sqrt(k_count - 1)

    def deviation(gram):
        return np.linalg.norm(gram / np.linalg.norm(gram) - target)

    def cv(vectors):
        norms = np.array([np.linalg.norm(v) for v in vectors])
        return norms.std(ddof=1) / norms.mean()

    # Nearest ETF: the objective at the Procrustes solution P = U V^T of (Y M).
    if d >= k_count:
        unit = hbar / np.linalg.norm(hbar)
        u, _, vt = np.linalg.svd(unit @ centring, full_matrices=False)
        etf = np.linalg.norm(unit - (u @ vt) @ centring / math.sqrt(k_count - 1)) ** 2
    else:
        etf = math.nan
    nan = math.nan
    out = {
        "nc1": np.trace(sigma_w @ pinv) / k_count,
        "nc2_h": deviation(hbar.T @ hbar),
        "cv_h": cv(hbar.T),
        "etf_margin": k_count / (k_count - 1),
        "etf_distance": etf,
        "n": float(n),
        "acc1": nan,
        **dict.fromkeys(WEIGHT_KEYS + PER_SAMPLE_KEYS, nan),
    }
    if k_count >= 5:
        out["acc5"] = nan
    predictions = None
    if logits is not None:
        z = np.asarray(logits, dtype=np.float64)
        predictions = [int(np.argmax(z[i])) for i in range(n)]
        out["acc1"] = 100.0 * np.mean([predictions[i] == y[i] for i in range(n)])
        if k_count >= 5:
            top5 = [y[i] in np.argsort(-z[i])[:5] for i in range(n)]
            out["acc5"] = 100.0 * np.mean(top5)
    if weight is not None:
        w = np.asarray(weight, dtype=np.float64)
        b = np.zeros(k_count) if bias is None else np.asarray(bias, dtype=np.float64)
        if predictions is None:
            predictions = [int(np.argmax(w @ h[i] + b)) for i in range(n)]
        out["nc2_w"] = deviation(w @ w.T)
        out["nc3"] = deviation(w @ hbar)
        out["cv_w"] = cv(w)
        out["equinorm"] = abs(out["cv_h"] - out["cv_w"])
        out["bias_collapse"] = np.linalg.norm(w @ global_mean + b)
        centred_w = w - w.mean(axis=0)
        margins = []
        for i in range(n):
            v = h[i] - global_mean
            cosines = [
                v @ centred_w[k] / (np.linalg.norm(v) * np.linalg.norm(centred_w[k]))
                for k in range(k_count)
            ]
            others = max(cosines[k] for k in range(k_count) if k != y[i])
            margins.append(cosines[y[i]] - others)
        margins = np.array(margins)
        out["margin_mean"] = margins.mean()
        out["margin_min"] = margins.min()
        out["margin_max"] = margins.max()
        for key, q in MARGIN_QUANTILES.items():
            out[key] = np.quantile(margins, q)
    if predictions is not None:
        mismatch = 0
        for i in range(n):
            distances = [np.linalg.norm(h[i] - means[k]) for k in range(k_count)]
            mismatch += int(np.argmin(distances)) != predictions[i]
        out["ncc_mismatch"] = 100.0 * mismatch / n
    return {key: float(value) for key, value in out.items()}


def assert_metrics_close(actual, expected, rtol=1e-9, atol=1e-12):
    assert set(actual) == set(expected), set(actual) ^ set(expected)
    for key in expected:
        a, e = actual[key], expected[key]
        if math.isnan(e):
            assert math.isnan(a), f"{key}: expected NaN, got {a}"
        else:
            assert a == pytest.approx(e, rel=rtol, abs=atol), f"{key}: {a} != {e}"


def random_problem(num_classes, dim, counts, seed, dtype=torch.float64, temperature=5.0):
    """Tau-normalised features around random class centres, a random classifier, bias, logits."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=generator)]
    centres = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64)
    raw = centres[labels] + 0.7 * torch.randn(len(labels), dim, generator=generator).double()
    features = (temperature * F.normalize(raw, dim=1)).to(dtype)
    weight = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64).to(dtype)
    bias = 0.1 * torch.randn(num_classes, generator=generator, dtype=torch.float64).to(dtype)
    logits = features @ weight.T + bias
    return features, labels, weight, bias, logits


# --- exact simplex ETF ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("num_classes", "dim"), [(2, 2), (10, 10), (10, 32)])
def test_simplex_etf_configuration_is_fully_collapsed(num_classes, dim, dtype):
    temperature = 5.0
    generator = torch.Generator().manual_seed(num_classes + dim)
    weight = simplex_etf(num_classes, dim, "haar", generator, dtype=torch.float64)
    labels = torch.arange(num_classes).repeat(4)
    features = (temperature * weight[labels]).to(dtype)  # every sample at its class mean
    logits = features.double() @ weight.T
    metric = NeuralCollapseMetrics(num_classes, dim)
    metric.update(features, labels, logits.to(dtype))
    result = metric.compute(weight.to(dtype))
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    for key in ["nc1", "nc2_w", "nc2_h", "nc3", "cv_w", "cv_h", "equinorm", "etf_distance"]:
        assert abs(result[key]) < tolerance, (key, result[key])
    assert abs(result["bias_collapse"]) < tolerance * 10  # ||W mu_G||, mu_G = 0 for balanced
    assert result["ncc_mismatch"] == 0.0
    assert result["acc1"] == 100.0
    etf_margin = num_classes / (num_classes - 1)
    assert result["etf_margin"] == etf_margin
    for key in ["margin_mean", "margin_min", "margin_max", *MARGIN_QUANTILES]:
        assert result[key] == pytest.approx(etf_margin, abs=tolerance)
    # Cross-entropy of W h (unit rows, norm-tau features) attains the Yaras et al. bound.
    loss = F.cross_entropy(logits, labels).item()
    assert loss == pytest.approx(ce_lower_bound(num_classes, temperature), rel=tolerance)


@pytest.mark.parametrize(
    ("num_classes", "expected"), [(10, 0.0342), (100, 0.4912), (200, 0.8362), (1000, 2.0409)]
)
def test_ce_lower_bound_matches_the_etf_cross_entropy(num_classes, expected):
    # Independent truth: the cross-entropy of one sample at a vertex of the ETF, logits in
    # closed form (own class tau, others -tau/(K-1)); the table values are method.md's.
    temperature = 5.0
    logits = torch.full((1, num_classes), -temperature / (num_classes - 1), dtype=torch.float64)
    logits[0, 0] = temperature
    loss = F.cross_entropy(logits, torch.tensor([0])).item()
    assert ce_lower_bound(num_classes, temperature) == pytest.approx(loss, rel=1e-12)
    assert ce_lower_bound(num_classes, temperature) == pytest.approx(expected, abs=5e-5)


# --- brute force on random data -------------------------------------------------------------------

CASES = {
    "balanced": (6, 8, [12, 12, 12, 12, 12, 12]),
    "two-classes": (2, 5, [9, 14]),
    "more-classes-than-dims": (9, 4, [5, 6, 7, 5, 6, 7, 5, 6, 7]),
    "imbalanced": (5, 7, [1, 2, 60, 9, 3]),
    "d-equals-k": (4, 4, [10, 7, 8, 9]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_brute_force(case, dtype):
    num_classes, dim, counts = CASES[case]
    features, labels, weight, bias, logits = random_problem(num_classes, dim, counts, seed=1)
    features, weight, bias, logits = (t.to(dtype) for t in (features, weight, bias, logits))
    metric = NeuralCollapseMetrics(num_classes, dim)
    for chunk in torch.split(torch.arange(len(labels)), 7):
        metric.update(features[chunk], labels[chunk], logits[chunk])
    expected = brute_force_metrics(features, labels, num_classes, weight, bias, logits)
    assert_metrics_close(metric.compute(weight, bias), expected)


def test_without_logits_predictions_come_from_the_classifier_and_acc_is_nan():
    features, labels, weight, bias, _ = random_problem(5, 6, [8, 9, 10, 11, 12], seed=2)
    metric = NeuralCollapseMetrics(5, 6)
    metric.update(features, labels)
    result = metric.compute(weight, bias)
    assert math.isnan(result["acc1"]) and math.isnan(result["acc5"])
    assert_metrics_close(result, brute_force_metrics(features, labels, 5, weight, bias))
    assert result["ncc_mismatch"] > 0  # random classifier: the comparison is not vacuous


def test_without_weight_the_weight_keys_are_nan_and_ncc_uses_logits():
    features, labels, _, _, logits = random_problem(3, 6, [8, 9, 10], seed=3)
    metric = NeuralCollapseMetrics(3, 6)
    metric.update(features, labels, logits)
    result = metric.compute()
    assert "acc5" not in result  # K < 5
    for key in WEIGHT_KEYS + PER_SAMPLE_KEYS[1:]:
        assert math.isnan(result[key]), key
    expected = brute_force_metrics(features, labels, 3, logits=logits)
    assert_metrics_close(result, expected)
    no_logits = NeuralCollapseMetrics(3, 6)
    no_logits.update(features, labels)
    assert math.isnan(no_logits.compute()["ncc_mismatch"])


def test_near_collapse_is_computed_stably():
    # Norm-5 features with a within-class spread of 1e-6: sum h h^T / N ~ 25 while Sigma_W ~ 1e-12,
    # so the unshifted formula (1/N) sum h h^T - sum n_k mu_k mu_k^T / N loses every digit.
    num_classes, dim = 4, 6
    generator = torch.Generator().manual_seed(4)
    weight = simplex_etf(num_classes, dim, "haar", generator, dtype=torch.float64)
    labels = torch.arange(num_classes).repeat(50)
    noise = 1e-6 * torch.randn(len(labels), dim, generator=generator, dtype=torch.float64)
    features = 5.0 * F.normalize(weight[labels] + noise, dim=1)
    metric = NeuralCollapseMetrics(num_classes, dim)
    for chunk in torch.split(torch.arange(len(labels)), 16):
        metric.update(features[chunk], labels[chunk])
    result = metric.compute(weight)
    expected = brute_force_metrics(features, labels, num_classes, weight)
    assert 0 < expected["nc1"] < 1e-9
    assert result["nc1"] == pytest.approx(expected["nc1"], rel=1e-6)


def test_float32_inputs_accumulate_in_float64():
    # 20000 float32 features: a float32 running sum would carry ~1e-4 relative error into the
    # second moment, far above the 1e-9 checked here against the float64 oracle.
    num_classes, dim = 3, 4
    features, labels, weight, _, _ = random_problem(
        num_classes, dim, [7000, 6000, 7000], seed=5, dtype=torch.float32
    )
    features = features + 100.0  # a large common offset makes float32 sums lose digits
    metric = NeuralCollapseMetrics(num_classes, dim, max_kept_samples=0)
    for chunk in torch.split(torch.arange(len(labels)), 1000):
        metric.update(features[chunk], labels[chunk])
    statistics = [v for v in metric.metric_state.values() if isinstance(v, torch.Tensor)]
    assert len(statistics) == 9 and all(value.dtype == torch.float64 for value in statistics)
    result = metric.compute(weight)
    expected = brute_force_metrics(features, labels, num_classes, weight)
    for key in ["nc1", "nc2_h", "nc3", "cv_h", "etf_distance", "bias_collapse"]:
        assert result[key] == pytest.approx(expected[key], rel=1e-9), key


# --- streaming and the two routes -----------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_any_batch_split_equals_one_batch(seed):
    features, labels, weight, bias, logits = random_problem(5, 6, [9, 3, 20, 6, 12], seed=6)
    whole = NeuralCollapseMetrics(5, 6)
    whole.update(features, labels, logits)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    cuts = sorted(torch.randint(0, len(labels), (6,), generator=generator).tolist())
    pieces = torch.tensor_split(order, cuts)  # includes empty and single-sample batches
    streamed = NeuralCollapseMetrics(5, 6)
    for piece in pieces:
        streamed.update(features[piece], labels[piece], logits[piece])
    assert_metrics_close(streamed.compute(weight, bias), whole.compute(weight, bias), rtol=1e-11)


class _Loader:
    """A re-iterable loader over fixed batches of (inputs, labels)."""

    def __init__(self, inputs, labels, batch_size):
        self.batches = list(
            zip(torch.split(inputs, batch_size), torch.split(labels, batch_size), strict=True)
        )

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


@pytest.mark.parametrize("route", ["tuple", "logits_fn", "classifier"])
def test_collect_metrics_equals_the_kept_features_route(route):
    num_classes, dim = 6, 5
    features, labels, weight, bias, _ = random_problem(num_classes, dim, [20, 5, 9, 14, 3, 11], 7)
    backbone = torch.nn.Linear(dim, dim, dtype=torch.float64)
    torch.nn.init.orthogonal_(backbone.weight, generator=torch.Generator().manual_seed(0))

    def feature_fn(inputs):
        return 5.0 * F.normalize(backbone(inputs), dim=1)

    def logits_fn(h):
        return h @ weight.T + bias

    loader = _Loader(features, labels, batch_size=8)
    kept = NeuralCollapseMetrics(num_classes, dim)
    for inputs, batch_labels in loader:
        h = feature_fn(inputs)
        kept.update(h, batch_labels, None if route == "classifier" else logits_fn(h))
    if route == "tuple":
        result = collect_metrics(
            lambda x: (feature_fn(x), logits_fn(feature_fn(x))),
            loader,
            num_classes,
            weight,
            bias,
            progress=False,
        )
    else:
        result = collect_metrics(
            feature_fn,
            loader,
            num_classes,
            weight,
            bias,
            logits_fn=logits_fn if route == "logits_fn" else None,
            progress=False,
        )
    expected = kept.compute(weight, bias)
    assert_metrics_close(result, expected, rtol=1e-12)
    assert not math.isnan(result["ncc_mismatch"]) and not math.isnan(result["margin_q05"])


def test_memory_cap_drops_per_sample_measures_with_a_warning():
    features, labels, weight, bias, logits = random_problem(3, 4, [10, 10, 10], seed=8)
    capped = NeuralCollapseMetrics(3, 4, max_kept_samples=20)
    capped.update(features[:20], labels[:20], logits[:20])
    assert capped.num_kept_samples == 20
    with pytest.warns(UserWarning, match="collect_metrics") as record:
        capped.update(features[20:], labels[20:], logits[20:])
    assert record[0].filename == __file__  # the warning points at the caller's update()
    assert capped.num_kept_samples == 0
    with pytest.warns(UserWarning, match="max_kept_samples=20.*collect_metrics"):
        result = capped.compute(weight, bias)
    uncapped = NeuralCollapseMetrics(3, 4, max_kept_samples=None)
    uncapped.update(features, labels, logits)
    expected = uncapped.compute(weight, bias)
    for key in PER_SAMPLE_KEYS:
        assert math.isnan(result[key]), key
        expected[key] = math.nan
    assert_metrics_close(result, expected, rtol=1e-11)
    off = NeuralCollapseMetrics(3, 4, max_kept_samples=0)
    off.update(features, labels, logits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # max_kept_samples=0 is a choice: no warning
        assert math.isnan(off.compute(weight)["margin_mean"])


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric:UserWarning")  # tested order
def test_reset_and_state_dict_round_trip():
    features, labels, weight, _, logits = random_problem(3, 4, [6, 7, 8], seed=9)
    metric = NeuralCollapseMetrics(3, 4, max_kept_samples=0, persistent=True)
    metric.update(features[:10], labels[:10], logits[:10])
    restored = NeuralCollapseMetrics(3, 4, max_kept_samples=0, persistent=True)
    restored.load_state_dict(metric.state_dict())
    for m in (metric, restored):
        m.update(features[10:], labels[10:], logits[10:])
    assert_metrics_close(restored.compute(weight), metric.compute(weight), rtol=0, atol=0)
    # With per-sample measures on, the loaded samples' features are missing: NaN and a warning.
    keeping = NeuralCollapseMetrics(3, 4, persistent=True)
    keeping.update(features, labels, logits)
    keeping.load_state_dict(metric.state_dict())
    with pytest.warns(UserWarning, match="collect_metrics"):
        result = keeping.compute(weight)
    assert math.isnan(result["ncc_mismatch"]) and math.isnan(result["margin_mean"])
    assert result["nc1"] == metric.compute(weight)["nc1"]
    metric.reset()
    assert metric.num_samples == 0
    with pytest.raises(RuntimeError, match=r"before any sample.*update"):
        metric.compute()
    assert "max_kept_samples=0" in repr(metric)


def test_pure_functions_against_direct_formulas():
    generator = torch.Generator().manual_seed(10)
    features = torch.randn(30, 5, generator=generator, dtype=torch.float64)
    means = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    expected = torch.cdist(features, means).argmin(dim=1)
    assert torch.equal(nearest_class_centre(features, means), expected)
    gram = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    assert etf_gram_deviation(3.0 * gram).item() == pytest.approx(etf_gram_deviation(gram).item())


# --- torchmetrics integration ---------------------------------------------------------------------

CLASS_MEAN_KEYS = ["nc1", "nc2_h", "nc3", "cv_h", "equinorm", "etf_distance", "ncc_mismatch"]


def _tensor_states(metric):
    return {k: v for k, v in metric.metric_state.items() if isinstance(v, torch.Tensor)}


def test_is_a_torchmetrics_metric_whose_compute_follows_its_classifier():
    # compute(weight, bias) depends on its arguments: torchmetrics' result cache must not return
    # the first classifier's numbers for the second.
    features, labels, weight, bias, logits = random_problem(4, 5, [9, 8, 7, 10], seed=30)
    metric = NeuralCollapseMetrics(4, 5)
    assert isinstance(metric, torchmetrics.Metric)
    metric.update(features, labels, logits)
    other = torch.flip(weight, dims=[1])
    assert_metrics_close(
        metric.compute(weight, bias), brute_force_metrics(features, labels, 4, weight, bias, logits)
    )
    assert_metrics_close(
        metric.compute(other), brute_force_metrics(features, labels, 4, other, None, logits)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_returns_the_batch_metrics_and_accumulates_the_split(dtype):
    num_classes, dim = 4, 5
    features, labels, weight, bias, logits = random_problem(num_classes, dim, [9, 8, 7, 10], 31)
    features, logits = features.to(dtype), logits.to(dtype)
    every_class = torch.arange(16)  # 16 random samples: every class is in there
    assert len(labels[every_class].unique()) == num_classes
    lacking = torch.nonzero(labels[16:] != 2).flatten() + 16  # every other sample but class 2
    metric = NeuralCollapseMetrics(num_classes, dim)
    batch = metric(features[every_class], labels[every_class], logits[every_class])
    expected = brute_force_metrics(
        features[every_class], labels[every_class], num_classes, logits=logits[every_class]
    )
    assert_metrics_close(batch, expected)
    # A batch without class 2: the keys that need every class mean are NaN, not an error.
    batch = metric(features[lacking], labels[lacking], logits[lacking])
    z, y = logits[lacking].double().numpy(), labels[lacking].numpy()
    assert batch["acc1"] == pytest.approx(100.0 * np.mean(z.argmax(axis=1) == y), abs=1e-12)
    assert batch["n"] == len(lacking)
    for key in CLASS_MEAN_KEYS + WEIGHT_KEYS + PER_SAMPLE_KEYS:
        assert math.isnan(batch[key]), key
    # An empty batch: n = 0, the state does not move.
    before = {k: v.clone() for k, v in _tensor_states(metric).items()}
    empty = metric(features[:0], labels[:0], logits[:0])
    assert empty["n"] == 0.0 and math.isnan(empty["nc1"]) and math.isnan(empty["acc1"])
    assert all(torch.equal(v, before[k]) for k, v in _tensor_states(metric).items())
    # The state accumulated every batch given to forward (class-2 samples of the first 16 only).
    seen = torch.cat([every_class, lacking])
    truth = brute_force_metrics(
        features[seen], labels[seen], num_classes, weight, bias, logits[seen]
    )
    assert_metrics_close(metric.compute(weight, bias), truth)


def test_metric_collection_shares_the_kept_features_of_a_compute_group():
    num_classes, dim = 5, 6
    features, labels, weight, bias, logits = random_problem(
        num_classes, dim, [11, 9, 13, 8, 10], seed=32, dtype=torch.float32
    )
    collection = torchmetrics.MetricCollection(
        {
            "first": NeuralCollapseMetrics(num_classes, dim),
            "second": NeuralCollapseMetrics(num_classes, dim),
            "statistics_only": NeuralCollapseMetrics(num_classes, dim, max_kept_samples=0),
        }
    )
    chunks = torch.split(torch.arange(len(labels)), 12)
    collection.update(features[chunks[0]], labels[chunks[0]], logits[chunks[0]])
    # Identical states after the first batch: torchmetrics updates only "first" and shares its
    # states (kept features included) with "second".
    assert sorted(map(sorted, collection.compute_groups.values())) == [
        ["first", "second"],
        ["statistics_only"],
    ]
    # forward calls every member, each adding the batch once (shared states are not added twice).
    batch = collection(features[chunks[1]], labels[chunks[1]], logits[chunks[1]])
    assert batch["first_n"] == batch["second_n"] == len(chunks[1])
    for chunk in chunks[2:]:
        collection.update(features[chunk], labels[chunk], logits[chunk])
    results = collection.compute()  # no classifier: its keys are NaN, NCC uses the logits
    expected = brute_force_metrics(features, labels, num_classes, logits=logits)
    for name in ("first", "second"):
        assert_metrics_close({k: results[f"{name}_{k}"] for k in expected}, expected)
    statistics_only = {k: results[f"statistics_only_{k}"] for k in expected}
    for key in PER_SAMPLE_KEYS:
        assert math.isnan(statistics_only[key]), key
        expected[key] = math.nan
    assert_metrics_close(statistics_only, expected)
    full = collection["second"].compute(weight, bias)
    assert_metrics_close(
        full, brute_force_metrics(features, labels, num_classes, weight, bias, logits)
    )


@pytest.mark.parametrize(
    "cast",
    [
        lambda m: m.half(),
        lambda m: m.float(),
        lambda m: m.double(),
        lambda m: m.bfloat16(),
        lambda m: m.type(torch.float16),
        lambda m: m.to(torch.float16),
        lambda m: m.to(dtype=torch.bfloat16),
        lambda m: m.to("cpu", torch.float32),
    ],
    ids=["half", "float", "double", "bfloat16", "type", "to-half", "to-bf16", "to-cpu-float"],
)
def test_statistics_stay_float64_when_the_parent_module_is_cast(cast):
    num_classes, dim = 3, 4
    features, labels, weight, bias, logits = random_problem(
        num_classes, dim, [10, 12, 9], seed=33, dtype=torch.float32
    )
    metric = NeuralCollapseMetrics(num_classes, dim)
    parent = torch.nn.ModuleDict({"metric": metric})
    metric.update(features[:15], labels[:15], logits[:15])
    before = {k: v.clone() for k, v in _tensor_states(metric).items()}
    cast(parent)
    after = _tensor_states(metric)
    assert after.keys() == before.keys()
    for key, value in after.items():
        assert value.dtype == torch.float64 and torch.equal(value, before[key]), key
    assert metric.kept_features[0].dtype == torch.float32  # kept in the input dtype
    assert torch.equal(metric.kept_features[0], features[:15])
    assert metric.dtype == torch.float64
    metric.update(features[15:], labels[15:], logits[15:])
    truth = brute_force_metrics(features, labels, num_classes, weight, bias, logits)
    assert_metrics_close(metric.compute(weight, bias), truth)
    metric.reset()  # the defaults were not cast either
    assert all(value.dtype == torch.float64 for value in _tensor_states(metric).values())
    metric.update(features, labels, logits)
    assert_metrics_close(metric.compute(weight, bias), truth)


def test_set_dtype_warns_and_changes_nothing():
    features, labels, _, _, _ = random_problem(3, 4, [5, 5, 5], seed=34)
    metric = NeuralCollapseMetrics(3, 4)
    metric.update(features, labels)
    before = {k: v.clone() for k, v in _tensor_states(metric).items()}
    with pytest.warns(UserWarning, match=r"set_dtype\(torch.float16\) leaves .* float64"):
        collection = torchmetrics.MetricCollection({"nc": metric}).set_dtype(torch.float16)
    assert collection["nc"] is not None
    for key, value in _tensor_states(metric).items():
        assert value.dtype == torch.float64 and torch.equal(value, before[key]), key
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metric.set_dtype(torch.float64)  # asking for float64 is not worth a warning


def test_sync_converts_to_the_common_shift_and_unsync_restores_the_local_state():
    # One process whose sync is forced (all_reduce_sum is the identity without a group): after
    # the conversion the shifts are the class means, the shifted sums vanish and the second
    # moment is the within-class scatter N Sigma_W, all checked against numpy.
    num_classes, dim = 4, 5
    features, labels, _, _, logits = random_problem(num_classes, dim, [12, 9, 14, 7], seed=35)
    metric = NeuralCollapseMetrics(num_classes, dim)
    for chunk in torch.split(torch.arange(len(labels)), 6):  # first-batch shifts != the means
        metric.update(features[chunk], labels[chunk], logits[chunk])
    local = {k: v.clone() for k, v in _tensor_states(metric).items()}
    h, y = features.numpy(), labels.numpy()
    means = np.stack([h[y == k].mean(axis=0) for k in range(num_classes)])
    scatter = sum(np.outer(h[i] - means[y[i]], h[i] - means[y[i]]) for i in range(len(y)))
    assert np.abs(local["class_shifts"].numpy() - means).max() > 1e-3
    metric.sync(distributed_available=lambda: True)
    np.testing.assert_allclose(metric.class_shifts.numpy(), means, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(metric.shifted_class_sums.numpy(), 0.0, atol=1e-13)
    np.testing.assert_allclose(metric.shifted_second_moment.numpy(), scatter, rtol=1e-12)
    assert torch.equal(metric.class_counts, local["class_counts"])
    with pytest.raises(torchmetrics.utilities.exceptions.TorchMetricsUserError, match="unsync"):
        metric(features[:4], labels[:4], logits[:4])
    metric.unsync()
    for key, value in _tensor_states(metric).items():
        assert torch.equal(value, local[key]), key


def test_restored_samples_warning_says_what_happened():
    # Issue 11 item 2: 200 samples restored from a state_dict, the default cap of 100000.
    features, labels, weight, bias, logits = random_problem(4, 5, [50] * 4, seed=36)
    saved = NeuralCollapseMetrics(4, 5, persistent=True)
    saved.update(features, labels, logits)
    restored = NeuralCollapseMetrics(4, 5, persistent=True)
    restored.load_state_dict(saved.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = restored.compute(weight, bias)
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert re.search(
        r"per-sample measures \(ncc_mismatch, margin_\*\) are NaN: 200 samples were restored "
        r"from a state_dict without their features.*collect_metrics.*update with every batch",
        message,
    ), message
    assert "max_kept_samples" not in message and "exceeded" not in message
    assert caught[0].filename == __file__  # points at the caller's compute()
    expected = brute_force_metrics(features, labels, 4, weight, bias, logits)
    for key in PER_SAMPLE_KEYS:
        assert math.isnan(result[key]), key
        expected[key] = math.nan
    assert_metrics_close(result, expected)
    # Later batches are not kept (the split's margins would be partial); the message still counts
    # the restored samples.
    restored.update(features[:10], labels[:10], logits[:10])
    assert restored.num_kept_samples == 0
    with pytest.warns(UserWarning, match=r"NaN: 200 samples were restored") as record:
        assert math.isnan(restored.compute(weight, bias)["margin_median"])
    assert len(record) == 1
    # Updating again from scratch brings the per-sample measures back, silently.
    restored.reset()
    restored.update(features, labels, logits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = restored.compute(weight, bias)
    assert_metrics_close(result, brute_force_metrics(features, labels, 4, weight, bias, logits))


def test_load_state_dict_checks_shapes_and_copies_as_float64():
    features, labels, _, _, _ = random_problem(3, 4, [6, 6, 6], seed=37)
    metric = NeuralCollapseMetrics(3, 4, persistent=True)
    metric.update(features, labels)
    state = metric.state_dict()
    snapshot = {k: v.clone() for k, v in state.items()}
    # float32 statistics are loaded as float64 copies: updating never writes into `state`.
    loaded = NeuralCollapseMetrics(3, 4, max_kept_samples=0, persistent=True)
    loaded.load_state_dict({k: v.float() for k, v in state.items()})
    assert all(v.dtype == torch.float64 for v in _tensor_states(loaded).values())
    loaded.load_state_dict(state)
    loaded.update(features, labels)
    assert all(torch.equal(v, snapshot[k]) for k, v in state.items())
    assert loaded.num_samples == 2 * len(labels)
    # Another K: rejected, and the metric is unchanged.
    other = NeuralCollapseMetrics(4, 4, persistent=True)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(
        RuntimeError,
        match=r"class_counts has shape \(3,\) but this metric's is \(4,\) \(num_classes=4, "
        r"dim=4\); build NeuralCollapseMetrics with the num_classes and dim of the saved",
    ):
        other.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    incomplete = {k: v for k, v in state.items() if k != "class_shifts"}
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "class_shifts"'):
        NeuralCollapseMetrics(3, 4, persistent=True).load_state_dict(incomplete)
    with pytest.raises(RuntimeError, match=r"class_counts must be a floating-point tensor"):
        NeuralCollapseMetrics(3, 4, persistent=True).load_state_dict(
            {**state, "class_counts": state["class_counts"].long()}
        )


def test_torchmetrics_hooks_that_are_not_supported_say_so():
    features, labels, _, _, _ = random_problem(3, 4, [4, 4, 4], seed=38)
    metric = NeuralCollapseMetrics(3, 4)
    metric.update(features, labels)
    other = NeuralCollapseMetrics(3, 4)
    other.update(features, labels)
    with pytest.raises(
        RuntimeError, match=r"merge_state\(NeuralCollapseMetrics\) is not supported"
    ):
        metric.merge_state(other)
    with pytest.raises(ValueError, match=r"process_group=.*pass process_group=None"):
        metric.sync(process_group=object(), distributed_available=lambda: True)
    with pytest.raises(ValueError, match=r"dist_sync_fn=.*pass dist_sync_fn=None"):
        metric.sync(dist_sync_fn=lambda t, group=None: [t], distributed_available=lambda: True)


# --- bad input ---------------------------------------------------------------------------------


def _snapshot(metric):
    return {k: v.clone() for k, v in _tensor_states(metric).items()}, metric.num_kept_samples


def _assert_unchanged(metric, snapshot):
    state, kept = snapshot
    for key, value in _tensor_states(metric).items():
        assert torch.equal(value, state[key]), key
    assert metric.num_kept_samples == kept


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (
            lambda f, y, z: (f, y.index_fill(0, torch.tensor([1, 4]), 7), z),
            ValueError,
            r"labels \[7\] are out of range.*\[0, 2\]",
        ),
        (
            lambda f, y, z: (f, y.index_fill(0, torch.tensor([2]), -1), z),
            ValueError,
            r"labels \[-1\] are out of range",
        ),
        (lambda f, y, z: (f[:, :3], y, z), ValueError, r"features must have shape \(batch, dim=4"),
        (lambda f, y, z: (f.flatten(), y, z), ValueError, r"features must have shape"),
        (lambda f, y, z: (f.long(), y, z), TypeError, r"features must be a floating-point"),
        (lambda f, y, z: (f, y.float(), z), TypeError, r"labels must be an integer"),
        (lambda f, y, z: (f, y[:-1], z), ValueError, r"labels must have shape \(6,\)"),
        (lambda f, y, z: (f, y, z[:, :2]), ValueError, r"logits must have shape.*\(6, 3\)"),
        (lambda f, y, z: (f, y, None), ValueError, r"earlier batches came with logits"),
        (
            lambda f, y, z: (f.index_fill(0, torch.tensor([2]), math.nan), y, z),
            ValueError,
            r"features contain NaN or Inf; the batch was rejected",
        ),
        (
            lambda f, y, z: (f, y, z.index_fill(0, torch.tensor([0]), math.inf)),
            ValueError,
            r"logits contain NaN or Inf",
        ),
    ],
)
def test_bad_batches_are_rejected_and_leave_the_state_unchanged(mutate, error, match):
    features, labels, _, _, logits = random_problem(3, 4, [4, 4, 4], seed=11)
    metric = NeuralCollapseMetrics(3, 4)
    metric.update(features[:6], labels[:6], logits[:6])
    snapshot = _snapshot(metric)
    bad = mutate(features[6:], labels[6:].clone(), logits[6:])
    with pytest.raises(error, match=match):
        metric.update(*bad)
    _assert_unchanged(metric, snapshot)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric:UserWarning")  # tested order
def test_classifier_and_call_order_errors():
    features, labels, weight, bias, _ = random_problem(3, 4, [4, 4, 4], seed=12)
    metric = NeuralCollapseMetrics(3, 4)
    with pytest.raises(RuntimeError, match="before any sample"):
        metric.compute(weight)
    metric.update(features, labels)
    with pytest.raises(ValueError, match=r"weight must have shape .* \(3, 4\), got \(4, 3\)"):
        metric.compute(weight.T)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\).*got \(4,\)"):
        metric.compute(weight, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias was given without weight"):
        metric.compute(None, bias)
    with pytest.raises(TypeError, match="weight must be a floating-point"):
        metric.compute(weight.long())
    with pytest.raises(ValueError, match="weight contains NaN"):
        metric.compute(weight.clone().fill_(math.nan))
    no_logits = NeuralCollapseMetrics(3, 4)
    no_logits.update(features, labels)
    with pytest.raises(ValueError, match="earlier batches came without logits"):
        no_logits.update(features, labels, torch.zeros(12, 3))


def test_class_without_samples_is_named():
    features, labels, weight, _, _ = random_problem(5, 4, [4, 4, 4, 4, 4], seed=13)
    keep = (labels != 1) & (labels != 3)
    metric = NeuralCollapseMetrics(5, 4)
    metric.update(features[keep], labels[keep])
    with pytest.raises(ValueError, match=r"classes \[1, 3\] have no samples"):
        metric.compute(weight)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 1, "dim": 4}, r"num_classes=1 must be an integer >= 2"),
        ({"num_classes": 3, "dim": 0}, r"dim=0 must be a positive integer"),
        ({"num_classes": 3, "dim": 4, "max_kept_samples": -1}, r"max_kept_samples=-1"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeuralCollapseMetrics(**kwargs)


def test_ce_lower_bound_errors():
    with pytest.raises(ValueError, match="num_classes=1"):
        ce_lower_bound(1, 5.0)
    with pytest.raises(ValueError, match="temperature=-1"):
        ce_lower_bound(10, -1.0)


def test_collect_metrics_errors():
    with pytest.raises(ValueError, match="loader yielded no batches"):
        collect_metrics(lambda x: x, [], 3, progress=False)
    loader = [(torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0]))]
    with pytest.raises(ValueError, match=r"exactly \(features, logits\)"):
        collect_metrics(lambda x: (x, x, x), loader, 3, progress=False)

    class Shrinking:  # a loader that drops a sample in its second pass
        passes = 0

        def __iter__(self):
            self.passes += 1
            inputs, labels = loader[0]
            return iter([(inputs[: 5 - self.passes], labels[: 5 - self.passes])])

    weight = torch.eye(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"second pass yielded 3 samples but the first 4"):
        collect_metrics(lambda x: x, Shrinking(), 3, weight, progress=False)


def test_a_compute_that_fails_while_synced_restores_the_local_states(monkeypatch):
    # torchmetrics' sync_context does not unsync when compute raises; NeuralCollapseMetrics does.
    # A one-process "group" (the all-reduce is the identity) drives the synced path of compute.
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda tensor: tensor)
    monkeypatch.setattr(distributed, "world_size", lambda: 1)
    features, labels, weight, bias, logits = random_problem(4, 5, [9, 7, 8, 6], seed=39)
    metric = NeuralCollapseMetrics(4, 5)
    for chunk in torch.split(torch.arange(len(labels)), 5):
        metric.update(features[chunk], labels[chunk], logits[chunk])
    local = {k: v.clone() for k, v in _tensor_states(metric).items()}
    with pytest.raises(ValueError, match=r"weight must have shape"):
        metric.compute(weight.T)
    for key, value in _tensor_states(metric).items():
        assert torch.equal(value, local[key]), key
    expected = brute_force_metrics(features, labels, 4, weight, bias, logits)
    assert_metrics_close(metric.compute(weight, bias), expected)
    for key, value in _tensor_states(metric).items():
        assert torch.equal(value, local[key]), key


# --- conventions and checkpoints (issue 19) ------------------------------------------------------


@pytest.mark.parametrize("convention", ["weighted", "unweighted"])
def test_both_global_mean_conventions_match_brute_force_under_imbalance(convention):
    # K = 2 with 100 / 900 samples: the weighted mean sits near the big class, so Hbar's columns
    # have norms in ratio 9 : 1 (nc2_h, cv_h large); the unweighted mean is the midpoint of the
    # two class means (Hbar = [a, -a]: nc2_h = 0, cv_h = 0), as in rhubarbwu/neural-collapse.
    features, labels, weight, bias, logits = random_problem(2, 6, [100, 900], seed=19)
    metric = NeuralCollapseMetrics(2, 6, global_mean=convention)
    metric.update(features, labels, logits)
    result = metric.compute(weight, bias)
    truth = brute_force_metrics(features, labels, 2, weight, bias, logits, convention=convention)
    assert_metrics_close(result, truth, rtol=1e-9, atol=1e-10)
    loader = _Loader(features, labels, batch_size=128)
    two_pass = collect_metrics(
        lambda x: x, loader, 2, weight, bias, progress=False, global_mean=convention
    )
    truth_without_logits = brute_force_metrics(
        features, labels, 2, weight, bias, convention=convention
    )
    assert_metrics_close(two_pass, truth_without_logits, rtol=1e-9, atol=1e-10)
    if convention == "unweighted":
        assert result["nc2_h"] == pytest.approx(0.0, abs=1e-12)
        assert result["cv_h"] == pytest.approx(0.0, abs=1e-12)
    else:
        assert result["nc2_h"] > 0.5 and result["cv_h"] > 0.5
    assert f"global_mean={convention!r}" in repr(metric)


def test_balanced_classes_give_the_same_numbers_in_both_conventions():
    features, labels, weight, bias, logits = random_problem(3, 5, [20, 20, 20], seed=20)
    results = []
    for convention in ("weighted", "unweighted"):
        metric = NeuralCollapseMetrics(3, 5, global_mean=convention)
        metric.update(features, labels, logits)
        results.append(metric.compute(weight, bias))
    assert_metrics_close(results[0], results[1], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match=r"global_mean='mean' is not supported"):
        NeuralCollapseMetrics(3, 5, global_mean="mean")


def test_statistics_enter_a_checkpoint_only_when_asked():
    features, labels, _, _, _ = random_problem(3, 4, [5, 5, 5], seed=21)
    model = torch.nn.Module()
    model.layer = torch.nn.Linear(4, 3)
    model.metric = NeuralCollapseMetrics(3, 4)
    model.metric.update(features, labels)
    assert set(model.state_dict()) == {"layer.weight", "layer.bias"}
    # Loading a checkpoint of the model leaves the metric's running state alone.
    model.load_state_dict(model.state_dict())
    assert model.metric.num_samples == 15 and model.metric.num_kept_samples == 15
    model.metric = NeuralCollapseMetrics(3, 4, persistent=True)
    model.metric.update(features, labels)
    saved = model.state_dict()
    assert {"metric.class_counts", "metric.shifted_second_moment"} <= set(saved)
    assert not any(key.startswith("metric.kept_") for key in saved)


def test_a_scalar_metric_with_its_classifier_logs_like_a_torchmetrics_scalar():
    # Lightning's self.log(name, metric) calls compute() with no arguments, then reset().
    features, labels, weight, bias, logits = random_problem(3, 4, [7, 8, 9], seed=22)
    head = torch.nn.Linear(4, 3, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    full = NeuralCollapseMetrics(3, 4, classifier=head)
    scalars = {
        key: NeuralCollapseMetrics(3, 4, classifier=head, scalar=key)
        for key in ("nc1", "nc3", "margin_median")
    }
    for metric in (full, *scalars.values()):
        metric.update(features, labels, logits)
    truth = brute_force_metrics(features, labels, 3, weight, bias, logits)
    assert_metrics_close(full.compute(), truth)
    for key, metric in scalars.items():
        value = metric.compute()
        assert isinstance(value, torch.Tensor) and value.dim() == 0
        assert value.item() == pytest.approx(truth[key], rel=1e-9, abs=1e-12)
    assert "head" not in dict(full.named_children())
    assert not any(name.startswith("_classifier") for name, _ in full.named_parameters())
    with pytest.raises(ValueError, match=r"scalar='nc9' is not a metric key"):
        NeuralCollapseMetrics(3, 4, scalar="nc9")
    with pytest.raises(ValueError, match=r"scalar='acc5' needs num_classes >= 5"):
        NeuralCollapseMetrics(3, 4, scalar="acc5")
