"""Runs you can reopen, and what TensorBoard gets.

Truths: the model train_model returns (its predictions) against the one load_run rebuilds from
the folder; metrics.csv's test accuracy against the reopened model's accuracy computed here;
per-step losses against the epoch's running loss (equal batches: their mean), the cosine
schedule's formula for the learning rate, and metrics.csv for the eval/ scalars, all read back
from the event file with TensorBoard's own EventAccumulator.
"""

from __future__ import annotations

import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from guided_nc import load_run, train_model
from guided_nc.config import TrainConfig
from guided_nc.data import build_datasets
from guided_nc.runfiles import read_long_csv
from guided_nc.train import fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _backbone() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(16, 24, bias=False), nn.ReLU(), nn.Linear(24, 12, bias=False)
    )


def _data(n=240, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    inputs = torch.randn(n, 16, generator=generator) + labels.unsqueeze(1).float()
    return TensorDataset(inputs, labels)


@pytest.mark.parametrize("method", ["standard", "fixed", "implicit"])
def test_train_model_returns_the_model_and_load_run_rebuilds_it(tmp_path, method):
    torch.manual_seed(0)
    backbone = _backbone()
    result = train_model(
        backbone,
        _data(),
        _data(80, seed=1),
        method=method,
        epochs=2,
        batch_size=40,
        out=str(tmp_path / method),
        progress=False,
    )
    assert result.model.backbone is backbone and not result.model.training
    inputs = _data(64, seed=2).tensors[0]
    with torch.no_grad():
        expected = result.model(inputs)
    reopened = load_run(result.folder, backbone=_backbone())
    assert not reopened.training
    with torch.no_grad():
        torch.testing.assert_close(reopened(inputs), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"model='custom'.*load_run\(folder, backbone=\.\.\.\)"):
        load_run(result.folder)
    with pytest.raises(FileNotFoundError, match=r"checkpoint.pt' does not exist"):
        load_run(tmp_path / "nowhere")


def _events(folder):
    accumulator = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator


def test_a_built_in_run_reopens_to_its_recorded_accuracy_and_logs_per_step(tmp_path):
    config = TrainConfig(
        dataset="digits",
        model="mlp",
        width=32,
        depth=1,
        epochs=2,
        batch_size=100,
        optimizer="sgd",
        lr=0.1,
        schedule="cosine",
        eval_epochs=(1, 2),
        out=str(tmp_path / "run"),
        progress=False,
    )
    folder = fit(config)
    rows = read_long_csv(folder / "metrics.csv")
    model = load_run(folder)
    splits = build_datasets("digits", augment=False, seed=config.seed)
    correct = total = 0
    with torch.no_grad():
        for inputs, labels in DataLoader(splits.test, batch_size=256):
            correct += int((model(inputs).argmax(dim=1) == labels).sum())
            total += len(labels)
    assert 100.0 * correct / total == pytest.approx(rows[-1]["test_acc1"], abs=1e-9)

    events = _events(folder)
    tags = set(events.Tags()["scalars"])
    steps = len(splits.train_labels) // 100  # per epoch (drop_last)
    assert {
        "step/loss",
        "step/lr",
        "running/train_loss",
        "running/train_acc1",
        "eval/train_acc1",
        "eval/test_acc1",
        "eval/test_nc1",
    } <= tags
    assert not any(tag.startswith("train/") for tag in tags)  # no ambiguous names
    losses = events.Scalars("step/loss")
    assert [e.step for e in losses] == list(range(1, 2 * steps + 1))
    running = events.Scalars("running/train_loss")
    assert [e.step for e in running] == [steps, 2 * steps]
    for epoch, event in enumerate(running):
        mean = sum(e.value for e in losses[epoch * steps : (epoch + 1) * steps]) / steps
        assert event.value == pytest.approx(mean, rel=1e-5)
    total_steps = 2 * steps
    for event in events.Scalars("step/lr"):
        t = event.step - 1  # the rate the step used: the schedule after t steps
        assert event.value == pytest.approx(
            0.05 * (1 + math.cos(math.pi * t / total_steps)), rel=1e-6, abs=1e-9
        )
    for row, event in zip(rows, events.Scalars("eval/train_acc1"), strict=True):
        assert event.value == pytest.approx(row["train_acc1"], rel=1e-6)
        assert event.step == row["epoch"] * steps
    hparams = events.PluginTagToContent("hparams")
    assert hparams and any(b"optimizer" in content for content in hparams.values())


def test_agd_runs_log_the_automatic_step_size(tmp_path):
    torch.manual_seed(0)
    result = train_model(
        _backbone(), _data(), epochs=1, batch_size=40, out=str(tmp_path / "agd"), progress=False
    )
    events = _events(result.folder)
    etas = events.Scalars("step/agd_eta")
    assert len(etas) == 240 // 40
    assert all(e.value > 0 and math.isfinite(e.value) for e in etas)
