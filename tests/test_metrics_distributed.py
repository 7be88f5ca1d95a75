"""Two gloo processes, each given part of the data, equal one process given all of it."""

from __future__ import annotations

import math

import torch

from distributed_helpers import run_distributed
from guided_nc.metrics import NeuralCollapseMetrics, collect_metrics
from test_metrics import assert_metrics_close, random_problem

NUM_CLASSES, DIM = 5, 6
# Uneven shards; class 4 lives on rank 1 only, so per-rank class means differ from the global ones
# and the between-process part of the within-class scatter is exercised.
COUNTS = [12, 9, 15, 7, 10]


def _problem():
    return random_problem(NUM_CLASSES, DIM, COUNTS, seed=21)


def _shard(rank, labels):
    index = torch.arange(len(labels))
    rank_one = (labels == 4) | (index % 3 == 0)
    return index[rank_one] if rank == 1 else index[~rank_one]


def _worker(rank, world_size):
    features, labels, weight, bias, logits = _problem()
    mine = _shard(rank, labels)
    metric = NeuralCollapseMetrics(NUM_CLASSES, DIM)
    for chunk in torch.split(mine, 5):
        metric.update(features[chunk], labels[chunk], logits[chunk])
    kept_route = metric.compute(weight, bias)
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
    return {"kept": kept_route, "two_pass": two_pass}


def test_two_processes_equal_one_process():
    features, labels, weight, bias, logits = _problem()
    assert (labels[_shard(0, labels)] == 4).sum() == 0  # the shards really differ per class
    single = NeuralCollapseMetrics(NUM_CLASSES, DIM)
    single.update(features, labels, logits)
    expected = single.compute(weight, bias)
    assert not any(math.isnan(value) for value in expected.values())
    results = run_distributed(_worker, world_size=2)
    for rank_result in results:
        for route in ("kept", "two_pass"):
            assert_metrics_close(rank_result[route], expected, rtol=1e-10)
    # Every rank returns identical numbers.
    assert results[0] == results[1]
