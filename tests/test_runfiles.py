"""Tests for guided_nc.runfiles: the atomic writer, CSV/JSON round trips and run folders.

Truth: the bytes and permissions on disk, hand-made rows, the v0.1 run folders committed under
tests/data (written by guided-nc 0.1 itself), and the file modes the umask dictates.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from guided_nc import runfiles as report

DATA = Path(__file__).parent / "data"


def test_long_csv_round_trip(tmp_path):
    rows = [
        {"method": "fixed", "seed": 0, "iteration": 1, "loss": 0.1 + 0.2, "nc1": None},
        {"method": "implicit", "seed": 1, "iteration": 2, "loss": float("nan"), "nc1": 1e-12},
    ]
    path = report.write_long_csv(tmp_path / "sub" / "metrics.csv", rows)
    back = report.read_long_csv(path)
    assert back[0] == {"method": "fixed", "seed": 0, "iteration": 1, "loss": 0.1 + 0.2, "nc1": None}
    assert back[1]["loss"] is None and back[1]["nc1"] == 1e-12
    assert isinstance(back[1]["seed"], int)
    with pytest.raises(ValueError, match="not in fieldnames"):
        report.write_long_csv(tmp_path / "x.csv", rows, fieldnames=["method"])
    assert not (tmp_path / "x.csv").exists()


def test_atomic_write_leaves_no_temporary_and_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "summary.json"
    report.atomic_write_json(target, {"a": float("inf"), "b": [np.float32(1.5)]})
    assert json.loads(target.read_text()) == {"a": None, "b": [1.5]}

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        report.atomic_write_json(target, {"a": Unserialisable()})
    assert json.loads(target.read_text()) == {"a": None, "b": [1.5]}
    assert sorted(os.listdir(tmp_path)) == ["summary.json"]
    # Same permissions as a plain open() under the current umask (mkstemp would give 0600).
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_files_get_the_mode_the_umask_says(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = report.atomic_write_text(tmp_path / "config.json", "{}")
        checkpoint = report.atomic_write(tmp_path / "c.pt", lambda stream: stream.write(b"x"))
    finally:
        os.umask(previous)
    for written in (path, checkpoint):
        assert written.stat().st_mode & 0o777 == 0o666 & ~umask
    if umask == 0o022:
        assert path.stat().st_mode & 0o777 == 0o644  # readable by other users


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = report.atomic_write_text(tmp_path / "a.txt", "one")

    def crash(stream):
        stream.write(b"half")
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        report.atomic_write(target, crash)
    assert target.read_text() == "one"
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]
    report.atomic_write_text(target, "two")
    assert target.read_text() == "two"


def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    """Durability against power loss: the new name is on disk once atomic_write returns."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(handle):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{handle}")))
        return real_fsync(handle)

    def replace(source, target):
        events.append(("replace", str(target)))
        return real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = report.atomic_write_text(tmp_path / "config.json", "{}")
    folder = os.path.realpath(tmp_path)
    assert events[-2:] == [("replace", str(target)), ("fsync", folder)]
    assert events[0][0] == "fsync" and events[0][1].startswith(folder + "/.config.json.")


def test_done_marker_records_the_config_digest(tmp_path):
    config = {"b": 1, "a": [1, 2], "lr": None}
    report.mark_done(tmp_path, config, wall_seconds=1.5)
    done = report.read_done(tmp_path)
    assert done["wall_seconds"] == 1.5
    assert done["config_digest"] == report.config_digest({"a": [1, 2], "lr": None, "b": 1})
    assert done["config_digest"] != report.config_digest({**config, "b": 2})
    assert report.read_done(tmp_path / "missing") is None
    # v0.1 train/compare markers hold the word "done".
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "done").write_text("done\n")
    assert report.read_done(tmp_path / "old") == {}


def test_find_runs_reads_both_layouts(tmp_path):
    for method, seed, done in (("implicit", 1, True), ("implicit", 0, True), ("fixed", 0, False)):
        folder = report.run_folder(tmp_path, method, seed)
        report.write_long_csv(folder / "metrics.csv", [{"step": 1, "loss": 0.5 * seed}])
        report.atomic_write_json(folder / "config.json", {"config": {"seed": seed}})
        if done:
            report.mark_done(folder, {"seed": seed}, 0.0)
    runs = report.find_runs(tmp_path)
    assert [(run.method, run.seed) for run in runs] == [("implicit", 0), ("implicit", 1)]
    assert runs[1].config == {"seed": 1} and runs[1].rows() == [{"step": 1, "loss": 0.5}]
    every = report.find_runs(tmp_path, finished_only=False)
    assert (every[0].method, every[0].seed, every[0].finished) == ("fixed", 0, False)
    assert report.find_runs(tmp_path / "missing") == []

    # The v0.1 UFM layout, as guided-nc 0.1 wrote it.
    legacy = report.find_runs(DATA / "ufm-v0.1")
    assert [(run.method, run.seed) for run in legacy] == [
        ("fixed", 0),
        ("implicit", 0),
        ("standard", 0),
    ]
    raw = json.loads((DATA / "ufm-v0.1" / "runs" / "fixed-seed0" / "config.json").read_text())
    assert legacy[0].config == raw
    assert legacy[0].done["config_digest"] == report.config_digest(raw)
    assert report.run_folder(DATA / "ufm-v0.1", "fixed", 0).name == "fixed-seed0"


def test_environment_info_names_the_versions():
    import torch

    info = report.environment_info()
    assert info["torch"] == torch.__version__ and info["numpy"] == np.__version__
    assert set(info) >= {"python", "platform", "guided_nc", "torch_threads", "cuda_available"}
