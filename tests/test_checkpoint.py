"""Atomic checkpoints and RNG state: a crash mid-write leaves the previous file loadable."""

# ruff: noqa: NPY002 (the legacy global numpy generator is exactly what is under test)

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from guided_nc import runfiles
from guided_nc.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def _draws() -> tuple:
    return (
        torch.rand(3),
        np.random.rand(3),
        np.random.randn(2),  # exercises numpy's cached Gaussian
        [random.random() for _ in range(3)],
        random.gauss(0.0, 1.0),
    )


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.randn(1)  # leave a cached Gaussian in numpy's state
    random.gauss(0.0, 1.0)  # and in Python's
    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})
    expected = _draws()
    _draws()  # move every generator on
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = _draws()
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[2], expected[2])
    assert got[3] == expected[3] and got[4] == expected[4]


def test_save_and_load_round_trip_tensors_and_nested_values(tmp_path):
    state = {
        "epoch": 3,
        "model": {"weight": torch.randn(4, 3, dtype=torch.float64)},
        "rows": [{"epoch": 1, "acc": 0.5, "name": "x", "none": None}],
    }
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded["epoch"] == 3 and loaded["rows"] == state["rows"]
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    # Only the checkpoint itself is left: the temp file was renamed into place.
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]


def test_a_crash_during_torch_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})
    real_save = torch.save

    def crash_mid_write(obj, file, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, file)  # some bytes reach the temp file
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(KeyboardInterrupt, match="killed mid-write"):
        save_checkpoint(path, {"epoch": 2, "w": torch.full((3,), 2.0)})
    monkeypatch.undo()
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]  # no temp file left behind


def test_a_crash_before_the_rename_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1})

    def failing_replace(source, target):
        raise OSError("disk went away")

    monkeypatch.setattr(runfiles.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk went away"):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


def test_a_process_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL (no Python cleanup at all) while a large checkpoint is being written."""
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(2)})
    script = (
        "import sys, torch\n"
        "from guided_nc.checkpoint import save_checkpoint\n"
        "big = torch.zeros(64, 2**20)\n"  # 256 MiB: the write takes a while
        "print('ready', flush=True)\n"
        "while True:\n"
        "    save_checkpoint(sys.argv[1], {'epoch': 2, 'w': big})\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "ready"
        # Wait until a temp file exists, i.e. the kill lands in the middle of a write.
        deadline = time.time() + 30
        while time.time() < deadline and not any(
            name.endswith(".tmp") for name in os.listdir(tmp_path)
        ):
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    loaded = load_checkpoint(path)  # the last complete checkpoint, whichever epoch it was
    assert loaded["epoch"] in (1, 2)
    assert loaded["w"].numel() in (2, 64 * 2**20)


def test_load_missing_checkpoint_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="without --resume"):
        load_checkpoint(tmp_path / "absent.pt")


class _NotAllowed:
    """A class a weights_only unpickler must refuse to rebuild."""


def test_weights_only_load_rejects_arbitrary_objects(tmp_path):
    torch.save({"x": _NotAllowed()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match=r"(?i)weights_only|unsupported|global"):
        load_checkpoint(tmp_path / "evil.pt")
