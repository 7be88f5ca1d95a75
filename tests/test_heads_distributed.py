"""Two gloo processes build the same ETF heads as one process that sees the whole batch.

One spawn runs every check (starting processes costs most of this test's time).
"""

from __future__ import annotations

import torch
from torch import nn

from distributed_helpers import run_distributed
from guided_nc.heads import FixedETFHead, ImplicitETFHead

DIM, NUM_CLASSES, BATCH, STEPS = 5, 3, 8, 3


def _data():
    generator = torch.Generator().manual_seed(0)
    features = [
        torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64) for _ in range(STEPS)
    ]
    labels = [torch.arange(BATCH) % NUM_CLASSES for _ in range(STEPS)]
    labels[1] = torch.arange(BATCH) % (NUM_CLASSES - 1)  # a step with a missing class
    return features, labels


def _run(rank: int, world_size: int) -> dict:
    """Train both heads for STEPS steps on this rank's contiguous shard; record everything."""
    features, labels = _data()
    shard = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    record: dict = {}
    for name, head in (
        ("implicit", ImplicitETFHead(DIM, NUM_CLASSES, dtype=torch.float64)),
        (
            "fixed",
            FixedETFHead(
                DIM,
                NUM_CLASSES,
                rotation="haar",
                generator=torch.Generator().manual_seed(1),
                dtype=torch.float64,
            ),
        ),
    ):
        gradients, logits_seen = [], []
        for step in range(STEPS):
            x = features[step][shard].clone().requires_grad_(True)
            y = labels[step][shard]
            logits = head(x, y)
            nn.functional.cross_entropy(logits, y).backward()  # this shard's mean, as under DDP
            gradients.append(x.grad)
            logits_seen.append(logits.detach())
        record[name] = {
            "state": dict(head.state_dict()),
            "gradients": gradients,
            "logits": logits_seen,
        }
    return record


def test_two_ranks_match_one_process():
    single = _run(0, 1)
    ranks = run_distributed(_run, world_size=2)
    for name in ("implicit", "fixed"):
        first, second = ranks[0][name], ranks[1][name]
        for key, value in first["state"].items():
            # Every rank builds the identical classifier and statistics...
            assert torch.equal(value, second["state"][key]), (name, key)
            # ...equal to one process that sees the whole batch (summation order differs).
            torch.testing.assert_close(value, single[name]["state"][key], atol=1e-12, rtol=1e-12)
        for step in range(STEPS):
            half = BATCH // 2
            logits = torch.cat([first["logits"][step], second["logits"][step]])
            torch.testing.assert_close(logits, single[name]["logits"][step], atol=1e-12, rtol=1e-12)
            # Each rank's loss is its shard's mean (a factor 2 larger than its share of the
            # whole batch's mean); the all-reduce backward adds the other rank's contribution
            # through the shared statistics, so the gradients are 2x the single-process ones.
            gradient = torch.cat([first["gradients"][step], second["gradients"][step]]) / 2
            expected = single[name]["gradients"][step]
            assert expected[:half].abs().max() > 0
            torch.testing.assert_close(gradient, expected, atol=1e-12, rtol=1e-10)
    assert int(ranks[0]["implicit"]["state"]["num_steps"]) == STEPS
