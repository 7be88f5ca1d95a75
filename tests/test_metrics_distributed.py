"""Two gloo processes, each given part of the data, equal one process given all of it.

One spawn runs every check (starting two processes costs seconds): the kept-features and two-pass
routes, torchmetrics' ``sync``/``unsync`` (routed through ``guided_nc.distributed``, never
torchmetrics' own all-gather), ``forward`` (the batch's own, unsynced numbers) and a nearly
collapsed split whose per-rank class shifts differ, against the numpy oracle.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distributed_helpers import run_distributed
from guided_nc import distributed
from guided_nc.etf import simplex_etf
from guided_nc.metrics import NeuralCollapseMetrics, collect_metrics
from test_metrics import assert_metrics_close, brute_force_metrics, random_problem

NUM_CLASSES, DIM = 5, 6
# Uneven shards; class 4 lives on rank 1 only, so per-rank class means differ from the global ones
# and the between-process part of the within-class scatter is exercised.
COUNTS = [12, 9, 15, 7, 10]
STATE_NAMES = [
    "class_counts",
    "class_shifts",
    "shifted_class_sums",
    "shifted_second_moment",
    "correct_top1",
    "correct_top5",
    "samples_with_logits",
]


def _problem():
    return random_problem(NUM_CLASSES, DIM, COUNTS, seed=21)


def _near_collapse_problem():
    """Norm-5 features with a within-class spread of 1e-6 around an ETF (Sigma_W ~ 1e-12)."""
    num_classes, dim = 4, 6
    generator = torch.Generator().manual_seed(22)
    weight = simplex_etf(num_classes, dim, "haar", generator, dtype=torch.float64)
    labels = torch.arange(num_classes).repeat(40)
    noise = 1e-6 * torch.randn(len(labels), dim, generator=generator, dtype=torch.float64)
    return 5.0 * F.normalize(weight[labels] + noise, dim=1), labels, weight


def _shard(rank, labels, only_on_rank_one):
    index = torch.arange(len(labels))
    rank_one = (labels == only_on_rank_one) | (index % 3 == 0)
    return index[rank_one] if rank == 1 else index[~rank_one]


def _forbidden(*args, **kwargs):
    raise AssertionError("torch.distributed was called outside guided_nc.distributed.all_reduce")


def _worker(rank, world_size):
    # torchmetrics' own sync uses barrier + all_gather: make them fail, and count our route.
    saved = dist.barrier, dist.all_gather, distributed.all_reduce_sum
    calls = []

    def counted_all_reduce_sum(tensor):
        calls.append(tensor.numel())
        return saved[2](tensor)

    dist.barrier, dist.all_gather, distributed.all_reduce_sum = (
        _forbidden,
        _forbidden,
        counted_all_reduce_sum,
    )
    try:
        return _checks(rank, calls)
    finally:
        dist.barrier, dist.all_gather, distributed.all_reduce_sum = saved


def _checks(rank, calls):
    features, labels, weight, bias, logits = _problem()
    mine = _shard(rank, labels, only_on_rank_one=4)
    metric = NeuralCollapseMetrics(NUM_CLASSES, DIM)
    for chunk in torch.split(mine, 5):
        metric.update(features[chunk], labels[chunk], logits[chunk])
    kept_route = metric.compute(weight, bias)
    compute_calls = len(calls)
    loader = list(zip(torch.split(features[mine], 4), torch.split(labels[mine], 4), strict=True))
    two_pass = collect_metrics(
        lambda h: h,
        loader,
        NUM_CLASSES,
        weight,
        bias,
        lambda h: h @ weight.T + bias,
        progress=False,
    )
    # torchmetrics' sync/unsync: global states while synced, this rank's own states after.
    local = {name: getattr(metric, name).clone() for name in STATE_NAMES}
    metric.sync()
    synced = {name: getattr(metric, name).clone() for name in STATE_NAMES}
    metric.unsync()
    restored = all(torch.equal(getattr(metric, name), local[name]) for name in STATE_NAMES)
    # forward: this rank's batch alone, no communication.
    before_forward = len(calls)
    batch = NeuralCollapseMetrics(NUM_CLASSES, DIM)(features[mine], labels[mine], logits[mine])
    forward_calls = len(calls) - before_forward
    # Nearly collapsed, class 3 on rank 1 only, first-batch shifts that differ per rank.
    near_features, near_labels, near_weight = _near_collapse_problem()
    near_mine = _shard(rank, near_labels, only_on_rank_one=3)
    near = NeuralCollapseMetrics(4, 6)
    for chunk in torch.split(near_mine, 16):
        near.update(near_features[chunk], near_labels[chunk])
    return {
        "kept": kept_route,
        "two_pass": two_pass,
        "synced": synced,
        "restored": restored,
        "batch": batch,
        "near": near.compute(near_weight),
        "compute_calls": compute_calls,
        "forward_calls": forward_calls,
    }


def test_two_processes_equal_one_process():
    features, labels, weight, bias, logits = _problem()
    assert (labels[_shard(0, labels, 4)] == 4).sum() == 0  # the shards really differ per class
    expected = brute_force_metrics(features, labels, NUM_CLASSES, weight, bias, logits)
    assert not any(math.isnan(value) for value in expected.values())
    results = run_distributed(_worker, world_size=2)
    for rank_result in results:
        for route in ("kept", "two_pass"):
            assert_metrics_close(rank_result[route], expected, rtol=1e-10)
        # compute went through guided_nc.distributed (torchmetrics' all_gather would have raised).
        assert rank_result["compute_calls"] > 0
    # Every rank returns identical numbers (NaN where both are NaN: no logits in "near").
    for key in ("kept", "two_pass", "near"):
        first, second = results[0][key], results[1][key]
        assert first.keys() == second.keys(), key
        for name, value in first.items():
            assert value == second[name] or (math.isnan(value) and math.isnan(second[name])), name

    # While synced, every rank holds the sums over both, about the common shift = the class means.
    h, y = features.numpy(), labels.numpy()
    means = np.stack([h[y == k].mean(axis=0) for k in range(NUM_CLASSES)])
    scatter = sum(np.outer(h[i] - means[y[i]], h[i] - means[y[i]]) for i in range(len(y)))
    synced = [r["synced"] for r in results]
    for name in STATE_NAMES:
        assert torch.equal(synced[0][name], synced[1][name]), name
    assert synced[0]["class_counts"].tolist() == [float(c) for c in np.bincount(y)]
    np.testing.assert_allclose(synced[0]["class_shifts"].numpy(), means, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(synced[0]["shifted_class_sums"].numpy(), 0.0, atol=1e-13)
    np.testing.assert_allclose(synced[0]["shifted_second_moment"].numpy(), scatter, rtol=1e-11)
    correct = (logits.argmax(dim=1) == labels).sum().item()
    assert synced[0]["correct_top1"].item() == correct
    assert all(r["restored"] for r in results)  # unsync gave each rank its own states back

    # forward returns the rank's own batch, without communication.
    for rank, rank_result in enumerate(results):
        assert rank_result["forward_calls"] == 0
        mine = _shard(rank, labels, 4)
        if rank == 1:  # rank 1 holds every class: its own metrics, from the oracle
            assert set(labels[mine].tolist()) == set(range(NUM_CLASSES))
            shard_truth = brute_force_metrics(
                features[mine], labels[mine], NUM_CLASSES, logits=logits[mine]
            )
            assert_metrics_close(rank_result["batch"], shard_truth)
        else:  # rank 0 has no class 4: class-mean keys NaN, accuracy its own
            accuracy = (logits[mine].argmax(dim=1) == labels[mine]).double().mean().item()
            assert rank_result["batch"]["acc1"] == 100.0 * accuracy
            assert math.isnan(rank_result["batch"]["nc1"])
            assert rank_result["batch"]["n"] == len(mine)

    # Near collapse: the per-rank shifts are converted, not summed, and stay stable.
    near_features, near_labels, near_weight = _near_collapse_problem()
    near_truth = brute_force_metrics(near_features, near_labels, 4, near_weight)
    assert 0 < near_truth["nc1"] < 1e-9
    for rank_result in results:
        assert math.isclose(rank_result["near"]["nc1"], near_truth["nc1"], rel_tol=1e-6)
        others = {k: v for k, v in near_truth.items() if k != "nc1"}
        assert_metrics_close({k: rank_result["near"][k] for k in others}, others, rtol=1e-8)
