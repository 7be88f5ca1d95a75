"""Runs cannot silently mix: locks, configuration checks, partial data, bad files and disks.

Each test reproduces a way results could be corrupted or a run could fail obscurely, and checks
the library refuses it with an error that names the folder or file, what is wrong and the fix,
leaving every file as it was. Truth: the files on disk, the exit code and stderr of the real
command, and processes killed with SIGKILL.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from guided_nc import runfiles
from guided_nc.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from guided_nc.cli import main
from guided_nc.compare import run_comparison
from guided_nc.config import TrainConfig, UFMConfig, parse_preset
from guided_nc.reports.compare import write_report
from guided_nc.runfiles import DiskError, RunFolderLocked, RunLock
from guided_nc.train import fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATA = Path(__file__).parent / "data"
BASE = {
    "dataset": "digits",
    "model": "mlp",
    "width": 16,
    "depth": 1,
    "epochs": 2,
    "batch_size": 100,
    "progress": False,
}


def config(tmp_path, name="run", **overrides) -> TrainConfig:
    return TrainConfig(**{**BASE, "out": str(tmp_path / name), **overrides})


def _environment() -> dict[str, str]:
    source = str(Path(__file__).resolve().parents[1] / "src")
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{source}{os.pathsep}{path}", "OMP_NUM_THREADS": "1"}


def _cli(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "guided_nc.cli", *argv]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=_environment()
    )


# --- 1. one writer per run folder -----------------------------------------------------------------


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path):
    folder = tmp_path / "D"
    with RunLock(folder):
        with pytest.raises(RunFolderLocked, match=rf"'{folder}' is in use by PID {os.getpid()}"):
            fit(config(tmp_path, "D", method="implicit"))
        # The real command, from another process: one line on stderr, exit code 2.
        done = _cli("train", *_flags(folder, method="standard"))
        assert done.returncode == 2, done.stderr
        assert f"is in use by PID {os.getpid()}" in done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (folder / "checkpoint.pt").exists()  # neither writer touched the folder
    fit(config(tmp_path, "D", epochs=1))  # released: the folder can be used now
    with RunLock(folder):  # and fit released it when it returned
        pass


def _flags(folder: Path, **overrides) -> list[str]:
    values = {**BASE, **overrides, "out": str(folder)}
    flags = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


def test_two_concurrent_trainings_into_one_folder_cannot_both_run(tmp_path):
    folder = tmp_path / "D"
    command = ["train", *_flags(folder, method="implicit", epochs=5000)]  # killed below
    first = subprocess.Popen(
        [sys.executable, "-m", "guided_nc.cli", *command],
        stderr=subprocess.DEVNULL,
        env=_environment(),
    )
    try:
        deadline = time.time() + 120
        lock_file = folder.parent / ".D.lock"
        while time.time() < deadline and not (lock_file.exists() and lock_file.read_text()):
            time.sleep(0.2)
        second = _cli("train", *_flags(folder, method="standard", epochs=20))
        assert second.returncode == 2
        assert f"is in use by PID {first.pid}" in second.stderr
    finally:
        first.kill()
        first.wait()
    assert not (folder / "config.json").exists() or (
        json.loads((folder / "config.json").read_text())["config"]["method"] == "implicit"
    )


def test_a_lock_left_by_kill_minus_9_is_taken_over_with_a_message(tmp_path, caplog):
    folder = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import time
        from guided_nc.runfiles import RunLock
        RunLock({str(folder)!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
        """
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=_environment()
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunFolderLocked, match=f"PID {holder.pid}"):
        RunLock(folder).acquire()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with caplog.at_level("WARNING", logger="guided_nc"):
        lock = RunLock(folder).acquire()
    lock.release()
    assert f"taking over the lock of PID {holder.pid}" in caplog.text


def test_under_torchrun_only_rank_0_takes_the_lock(tmp_path, monkeypatch):
    taken = []
    real_acquire = RunLock.acquire

    def recording_acquire(self):
        taken.append(self.folder)
        return real_acquire(self)

    monkeypatch.setattr(RunLock, "acquire", recording_acquire)
    fit(config(tmp_path, epochs=1))
    assert taken == [tmp_path / "run"]
    from guided_nc import distributed

    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    fit(config(tmp_path, "other", epochs=1))  # a non-zero rank: runs without taking it
    assert taken == [tmp_path / "run"]


# --- 2. the configuration is checked wherever a run is reused -------------------------------------


def test_resume_compares_with_the_configuration_in_the_checkpoint(tmp_path):
    fit(config(tmp_path))
    (tmp_path / "run" / "config.json").unlink()
    (tmp_path / "run" / "done").unlink()
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match=r"\['gain'\] differ from the checkpoint .*gain: 10.0 "):
        fit(config(tmp_path, resume=True, gain=3.0, epochs=3))
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    assert not (tmp_path / "run" / "config.json").exists()  # nothing was rewritten


def test_compare_refuses_to_pool_a_finished_run_trained_otherwise(tmp_path):
    base = TrainConfig(**{**BASE, "epochs": 1})
    run_comparison(base, methods=("standard",), seeds=(0,), out=tmp_path, timing_repeats=0)
    other = TrainConfig(**{**BASE, "epochs": 1, "gain": 5.0})
    with pytest.raises(ValueError, match=r"different configuration \(gain: 10.0 there, 5.0 now\)"):
        run_comparison(other, methods=("standard",), seeds=(0, 1), out=tmp_path, timing_repeats=0)
    assert not (tmp_path / "runs" / "standard" / "seed1").exists()


def test_reports_refuse_runs_trained_with_other_settings(tmp_path):
    folder = tmp_path / "compare"
    shutil.copytree(DATA / "compare-v0.1", folder)
    path = folder / "runs" / "fixed" / "seed0" / "config.json"
    saved = json.loads(path.read_text())
    saved["config"]["gain"] = 5.0
    path.write_text(json.dumps(saved))
    pattern = r"gain: 5.0 \(fixed seed 0\), 10.0 \(implicit seed 0, standard seed 0\)"
    with pytest.raises(ValueError, match=pattern):
        write_report(folder)

    ufm = tmp_path / "ufm"
    shutil.copytree(DATA / "ufm-v0.1", ufm)
    path = ufm / "runs" / "fixed-seed0" / "config.json"
    saved = json.loads(path.read_text())
    saved["iterations"] = 7
    path.write_text(json.dumps(saved))
    from guided_nc.reports.ufm import build_report

    with pytest.raises(
        ValueError, match=r"iterations: 6 \(standard seed 0, implicit seed 0\), 7 \(fixed seed 0\)"
    ):
        build_report(ufm)


def test_the_pooled_configuration_is_stated(tmp_path):
    folder = tmp_path / "compare"
    shutil.copytree(DATA / "compare-v0.1", folder)
    text = write_report(folder).read_text()
    line = next(line for line in text.splitlines() if line.startswith("Pooled configuration"))
    assert "dataset=digits" in line and "gain=10.0" in line and "seed=" not in line


# --- 3. reports never crash on partial data -------------------------------------------------------


def _drop_epochs(path: Path, keep: set[int]) -> None:
    lines = path.read_text().splitlines()
    kept = [lines[0]] + [line for line in lines[1:] if int(line.split(",")[0]) in keep]
    path.write_text("\n".join(kept) + "\n")


def test_a_report_says_which_epochs_each_run_has(tmp_path, capsys):
    folder = tmp_path / "compare"
    shutil.copytree(DATA / "compare-v0.1", folder)
    _drop_epochs(folder / "runs" / "standard" / "seed0" / "metrics.csv", {1})
    _drop_epochs(folder / "runs" / "fixed" / "seed0" / "metrics.csv", {2})
    with pytest.raises(ValueError, match=r"share no evaluated epoch .*standard seed 0: \[1\]"):
        write_report(folder)
    assert main(["compare", "--out", str(folder), "--report-only"]) == 2
    err = capsys.readouterr().err
    assert "fixed seed 0: [2]" in err and "Traceback" not in err
    with pytest.raises(ValueError, match=r"--table-epochs \[7\]: no run evaluated those epochs"):
        write_report(folder, table_epochs=(7,))
    text = write_report(folder, table_epochs=(1, 2)).read_text()
    assert "Note: standard seed 0 has no evaluation at epoch(s) [2]" in text
    assert main(["compare", "--out", str(folder), "--report-only", "--table-epochs", "0"]) == 2
    assert "table_epochs='0' contains an epoch < 1" in capsys.readouterr().err


# --- 5. bad hyperparameters are refused before training -------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"optimizer": "sgd", "lr": float("nan")}, "lr=nan must be a finite number"),
        ({"optimizer": "sgd", "lr": 0.0}, r"lr=0.0 must be a finite number > 0"),
        ({"gain": float("inf")}, "gain=inf must be a finite number"),
        (
            {"optimizer": "sgd", "momentum": 1.5},
            r"momentum=1.5 must be a finite number in \[0, 1\)",
        ),
        (
            {"optimizer": "sgd", "weight_decay": -1e-4},
            r"weight_decay=-0.0001 must be a finite number >= 0",
        ),
        ({"delta": float("nan")}, "delta=nan must be a finite number"),
    ],
)
def test_bad_hyperparameters_are_refused_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **overrides)
    with pytest.raises(ValueError, match=message):
        UFMConfig(preset=parse_preset("3:6:3"), **overrides)


def test_lr_nan_on_the_command_line_is_one_line(tmp_path, capsys):
    code = main(["train", *_flags(tmp_path / "x", optimizer="sgd"), "--lr", "nan"])
    err = capsys.readouterr().err
    expected = "guided-nc train: error: lr=nan must be a finite number > 0"
    assert code == 2 and err.strip() == expected
    assert not (tmp_path / "x").exists()


# --- 6. clear errors for files and disks ----------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"is empty"),
        ("truncated", r"is truncated or corrupt"),
        (bytes(range(256)) * 16, r"is truncated or corrupt"),
        ("foreign", r"is not a guided-nc checkpoint \(it holds a Tensor\)"),
        ("missing", r"missing keys \['model', 'optimizer'"),
    ],
    ids=["empty", "truncated", "random-bytes", "foreign", "missing-keys"],
)
def test_an_unreadable_checkpoint_names_the_path_and_the_fix(tmp_path, content, message):
    path = tmp_path / "checkpoint.pt"
    if content == "truncated":
        save_checkpoint(path, {"epoch": 1, "model": {"w": torch.randn(1000)}})
        path.write_bytes(path.read_bytes()[:1500])
    elif content == "foreign":
        torch.save(torch.zeros(3), path)
    elif content == "missing":
        save_checkpoint(path, {"epoch": 1, "rows": []})
    else:
        path.write_bytes(content)
    keys = ("epoch", "model", "optimizer")
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(path, required_keys=keys)
    text = str(error.value)
    assert str(path) in text and "Delete it to restart the run from scratch" in text


def test_resuming_a_corrupt_checkpoint_is_one_line_on_the_command_line(tmp_path):
    folder = tmp_path / "run"
    fit(config(tmp_path, epochs=1))
    (folder / "checkpoint.pt").write_bytes(b"\x00" * 100)
    done = _cli("train", *_flags(folder, epochs=1), "--resume")
    assert done.returncode == 2
    assert "cannot resume from" in done.stderr and "is truncated or corrupt" in done.stderr
    assert "Traceback" not in done.stderr
    debug = _cli("--debug", "train", *_flags(folder, epochs=1), "--resume")
    assert debug.returncode != 0 and "Traceback" in debug.stderr  # --debug shows where


def test_a_full_disk_names_the_folder_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1})

    class FullDisk:
        def __init__(self, stream):
            self.stream = stream

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.stream, name)

    real = runfiles._RecordingStream.__init__

    def full(self, stream):
        real(self, FullDisk(stream))

    monkeypatch.setattr(runfiles._RecordingStream, "__init__", full)
    pattern = rf"cannot write checkpoint.pt in folder '{tmp_path}': the disk is full"
    with pytest.raises(DiskError, match=pattern) as error:
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(100)})
    assert error.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temp file


def test_a_read_only_disk_names_the_folder(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(runfiles.tempfile, "mkstemp", read_only)
    with pytest.raises(DiskError, match=r"config.json in folder .*: the disk is read-only"):
        runfiles.atomic_write_text(tmp_path / "config.json", "{}")


# --- 7. stale temporary files ---------------------------------------------------------------------


def test_stale_temp_files_are_removed_when_a_run_resumes(tmp_path):
    folder = tmp_path / "run"
    fit(config(tmp_path, epochs=1))
    stale = folder / ".checkpoint.pt.k3j9.tmp"
    stale.write_bytes(b"half a checkpoint")
    fit(config(tmp_path, epochs=2, resume=True))
    assert not stale.exists()
    assert not list(folder.glob(".*.tmp"))


# --- 8. --resume into a folder without a checkpoint -----------------------------------------------


def test_resume_without_a_checkpoint_says_so(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match=r"'.*typo' does not exist: nothing to resume"):
        fit(config(tmp_path, "typo", resume=True))
    assert not (tmp_path / "typo").exists()
    with caplog.at_level("WARNING", logger="guided_nc"):
        folder = fit(config(tmp_path, "fresh", resume_or_start=True, epochs=1))
    assert "--resume-or-start:" in caplog.text and "starting a new run" in caplog.text
    assert (folder / "done").exists()
    # Later, with a checkpoint there, --resume-or-start resumes (and extends) it.
    fit(config(tmp_path, "fresh", resume_or_start=True, epochs=2))
    rows = (folder / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in rows[1:]] == ["1", "2"]
