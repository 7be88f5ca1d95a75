"""guided-nc inside PyTorch Lightning: the example under 2-process DDP, and the sampler.

Truths: 1 process vs 2 (every rank must hold the same head: DDP and the heads' all-reduces);
two routes to the same metric (Lightning's ``self.log(name, metric)`` of a scalar metric and
``self.log_dict(metric.compute(...))``); the sampler Lightning re-creates against one built
directly for that rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.data import _replace_dunder_methods
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset

from guided_nc import StratifiedBatchSampler

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lightning_ddp.py"


def test_the_lightning_example_trains_under_two_process_ddp(tmp_path):
    out = tmp_path / "summary.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, str(EXAMPLE), "--devices", "2", "--max-epochs", "2"]
    completed = subprocess.run(
        [*command, "--nan-step", "3", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["world_size"] == 2
    # Both ranks hold the same head, bit for bit.
    assert summary["ranks_agree"] is True
    assert summary["head_weight_sums"][0] == summary["head_weight_sums"][1]
    # Lightning re-created the stratified sampler with its DistributedSampler: each rank takes
    # its half of the global batch of 120.
    assert summary["sampler"] == "StratifiedBatchSampler"
    assert summary["sampler_shards"] == [[2, 0, 60], [2, 1, 60]]
    assert summary["global_step"] == 2 * (1440 // 120)
    # The poisoned batch was skipped by the head and by AGD, and fit went on.
    [skipped] = summary["skipped"]
    assert (skipped["epoch"], skipped["batch"]) == (0, 3)
    assert any("ImplicitETFHead rejected 1 batch" in m for m in skipped["messages"])
    assert any("AGD refused 1 step" in m for m in skipped["messages"])
    # The metric logged both ways, with the same value; and the head learned.
    metrics = summary["metrics"]
    assert metrics["val_nc1"] == pytest.approx(metrics["val/nc1"], rel=1e-6)
    assert metrics["val/acc1"] > 50.0
    assert all(value == value for key, value in metrics.items() if key != "val/etf_distance")


def _labels():
    return torch.arange(240) % 6


def test_lightning_re_creates_the_sampler_with_its_distributed_sampler():
    dataset = TensorDataset(torch.randn(240, 3), _labels())
    with _replace_dunder_methods(BatchSampler):  # what Lightning wraps train_dataloader() in
        loader = DataLoader(dataset, batch_sampler=StratifiedBatchSampler(_labels(), 24, seed=5))
    for rank in (0, 1):
        injected = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=False)
        updated = _update_dataloader(loader, injected)
        sampler = updated.batch_sampler
        assert isinstance(sampler, StratifiedBatchSampler)
        assert (sampler.num_replicas, sampler.rank, sampler.seed) == (2, rank, 5)
        direct = StratifiedBatchSampler(_labels(), 24, seed=5, num_replicas=2, rank=rank)
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            direct.set_epoch(epoch)
            assert list(sampler) == list(direct)


def test_a_sampler_lightning_cannot_re_create_says_which_flag_to_set():
    dataset = TensorDataset(torch.randn(240, 3), _labels())
    loader = DataLoader(dataset, batch_sampler=StratifiedBatchSampler(_labels(), 24, seed=5))
    injected = DistributedSampler(dataset, num_replicas=2, rank=0)
    with pytest.raises(TypeError, match=r"use_distributed_sampler=False") as caught:
        _update_dataloader(loader, injected)
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match=r"num_replicas=4, rank=1 disagree with the sampler's"):
        StratifiedBatchSampler(_labels(), 24, num_replicas=4, rank=1, sampler=injected)
