"""Distributed training: 2 gloo processes against 1 process on the same global batches.

Each rank trains on half of every global batch (the stratified sampler's strided slice); the
implicit head sums its class statistics over ranks, DDP averages the gradients and the metrics
sum their statistics, so the result equals one process on the whole batch up to float rounding
(sums are taken in a different order). Batch norm is off: under DDP on a CPU it normalises with
each rank's half batch (SyncBatchNorm is used on CUDA only), which is a different model.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from distributed_helpers import free_port, run_distributed
from guided_nc.checkpoint import load_checkpoint
from guided_nc.config import TrainConfig
from guided_nc.runfiles import read_long_csv
from guided_nc.train import fit

TINY = {
    "dataset": "digits",
    "model": "mlp",
    "width": 32,
    "depth": 2,
    "batch_norm": False,
    "augment": False,
    # One epoch (14 AGD steps): 1 and 2 processes then agree to ~2e-5. Rounding differences grow
    # with further steps (AGD's normalised steps and the nearest-ETF frame amplify them: ~3e-3
    # after 28 steps of the implicit head), so longer runs are not comparable at a tight tolerance.
    "epochs": 1,
    "batch_size": 100,
    "progress": False,
}


METHODS = ("implicit", "standard")


def _live_state_worker(rank: int, world_size: int, config: dict, out: str) -> dict:
    """Train each method; return this rank's in-memory model state (parameters, head buffers)."""
    from guided_nc import train as train_module

    real_step = train_module.training_step
    states = {}
    for method in METHODS:
        models = []

        def recording_step(model, optimizer, inputs, labels, models=models, **kwargs):
            if not models:  # unwrap DDP: the Classifier every rank trains
                models.append(model.module if hasattr(model, "module") else model)
            return real_step(model, optimizer, inputs, labels, **kwargs)

        train_module.training_step = recording_step
        try:
            train_module.fit(TrainConfig(**config, method=method, out=f"{out}/{method}"))
        finally:
            train_module.training_step = real_step
        states[method] = {key: value.clone() for key, value in models[0].state_dict().items()}
    return states


def test_two_processes_match_one_process(tmp_path):
    ranks = run_distributed(_live_state_worker, world_size=2, args=(TINY, str(tmp_path / "dist")))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in METHODS:
            single = fit(TrainConfig(**TINY, method=method, out=str(tmp_path / "single" / method)))
            _check_against_single_process(ranks, method, single, tmp_path / "dist" / method)
    finally:
        torch.set_num_threads(previous)


def _check_against_single_process(ranks, method, single, dist):
    states = [rank[method] for rank in ranks]
    # The same classifier (and everything else) on both ranks, bit for bit.
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), (method, key)
    reference = load_checkpoint(single / "checkpoint.pt")["model"]
    saved = load_checkpoint(dist / "checkpoint.pt")["model"]
    for key in reference:
        assert torch.equal(saved[key], states[0][key]), key  # rank 0 saved its live state
        # Float rounding only: sums over the batch are split across ranks, in another order.
        torch.testing.assert_close(states[0][key], reference[key], rtol=1e-4, atol=1e-4)

    rows_single = read_long_csv(single / "metrics.csv")
    rows_dist = read_long_csv(dist / "metrics.csv")
    assert [r["epoch"] for r in rows_dist] == [r["epoch"] for r in rows_single] == [1]
    for a, b in zip(rows_dist, rows_single, strict=True):
        assert a["train_n"] == b["train_n"] == 1437 and a["test_n"] == b["test_n"] == 360
        for key in ("train_loss", "train_nc1", "train_nc2_h", "train_nc3", "test_nc1"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), (method, key)
        for key in ("train_acc1", "test_acc1"):  # at most one sample may flip
            assert abs(a[key] - b[key]) <= 100.0 / 360 + 1e-9, (method, key)


class _Crash(Exception):
    pass


def _crash_and_resume_worker(rank: int, world_size: int, config: dict, out: str) -> dict:
    """Train uninterrupted; then train again, kill both ranks at the first step of epoch 2 and
    resume. Returns this rank's final model state of both runs and the epoch of the checkpoint
    that survived the crash."""
    import dataclasses

    from guided_nc import train as train_module

    real_step = train_module.training_step
    live = {}

    def run(name: str, crash_at_step: int | None, resume: bool) -> None:
        steps = []

        def step(model, optimizer, inputs, labels, **kwargs):
            steps.append(1)
            if len(steps) == crash_at_step:  # both ranks stop before any collective
                raise _Crash
            live[name] = model.module if hasattr(model, "module") else model
            return real_step(model, optimizer, inputs, labels, **kwargs)

        train_module.training_step = step
        try:
            train_module.fit(
                dataclasses.replace(TrainConfig(**config), out=f"{out}/{name}", resume=resume)
            )
        finally:
            train_module.training_step = real_step

    run("uninterrupted", None, False)
    steps_per_epoch = 1437 // config["batch_size"]
    try:
        run("interrupted", steps_per_epoch + 1, False)
    except _Crash:
        pass
    survived = load_checkpoint(f"{out}/interrupted/checkpoint.pt")["epoch"]
    run("interrupted", None, True)
    return {
        "survived": survived,
        **{
            name: {k: v.clone() for k, v in model.state_dict().items()}
            for name, model in live.items()
        },
    }


def test_resume_under_two_processes_equals_an_uninterrupted_run(tmp_path):
    config = {**TINY, "epochs": 2, "method": "implicit", "eval_epochs": (1, 2)}
    ranks = run_distributed(_crash_and_resume_worker, world_size=2, args=(config, str(tmp_path)))
    for rank in ranks:
        assert rank["survived"] == 1  # killed in epoch 2: the epoch-1 checkpoint remains
        for key, value in rank["uninterrupted"].items():
            assert torch.equal(rank["interrupted"][key], value), key
    for key, value in ranks[0]["interrupted"].items():
        assert torch.equal(ranks[1]["interrupted"][key], value), key  # same classifier
    assert (tmp_path / "interrupted" / "done").exists()
    assert (tmp_path / "interrupted" / "metrics.csv").read_text() == (
        tmp_path / "uninterrupted" / "metrics.csv"
    ).read_text()


def _compare_worker(rank: int, world_size: int, config: dict, out: str) -> dict:
    """What ``torchrun ... guided-nc compare`` does: every rank runs, rank 0 reports."""
    from guided_nc.compare import run_comparison
    from guided_nc.reports.compare import write_report

    folder = run_comparison(
        TrainConfig(**config), methods=("standard", "implicit"), seeds=(0,), out=out
    )
    report = write_report(folder) if rank == 0 else None
    return {"folder": str(folder), "report": str(report)}


def test_compare_under_two_processes_trains_every_run_once_and_reports_once(tmp_path):
    ranks = run_distributed(_compare_worker, world_size=2, args=(TINY, str(tmp_path)))
    assert [rank["folder"] for rank in ranks] == [str(tmp_path)] * 2
    assert ranks[0]["report"] == str(tmp_path / "report.md")
    for method in ("standard", "implicit"):
        folder = tmp_path / "runs" / method / "seed0"
        assert (folder / "done").exists()
        assert '"world_size": 2' in (folder / "summary.json").read_text()
    report = (tmp_path / "report.md").read_text()
    assert "Implicit ETF" in report
    # The same-process cost table needs every rank in one process: skipped under torchrun.
    assert not (tmp_path / "timing.json").exists()


def test_torchrun_cli_trains_with_two_processes(tmp_path):
    """The documented command: torchrun --nproc_per_node=2 -m guided_nc.cli train ..."""
    out = tmp_path / "torchrun"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "guided_nc.cli",
        "train",
        "--dataset=digits",
        "--model=mlp",
        "--width=16",
        "--depth=1",
        "--no-batch-norm",
        "--method=implicit",
        "--epochs=1",
        "--batch-size=100",
        "--threads=1",
        "--no-progress",
        f"--out={out}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "done").exists()
    summary = (out / "summary.json").read_text()
    assert '"world_size": 2' in summary
    assert result.stdout.count("run folder:") == 1  # rank 0 only prints
