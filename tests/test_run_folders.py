"""Run folders you can trust (issue 20): locks that follow links, folders that know their kind,
checksummed checkpoints, and one line naming the file for every broken file or disk.

Truth: the files on disk (their bytes before and after), the exit code and stderr of the real
command (``guided_nc.cli.main`` in this process, or ``python -m guided_nc.cli``), processes
killed with SIGKILL inside a write, and an uninterrupted run of the same configuration.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from guided_nc import runfiles
from guided_nc.checkpoint import CHECKSUM_KEY, CheckpointError, load_checkpoint, save_checkpoint
from guided_nc.cli import main
from guided_nc.optim import AGD
from guided_nc.runfiles import RunFileError, RunFolderLocked, RunLock, folder_kind
from guided_nc.train import fit
from test_reliability import DATA, _cli, _environment, _flags, config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPOSITORY = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes), to show a refusal changed nothing."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def one_line_error(capsys, argv: list[str], *names: str, after_log: bool = False) -> str:
    """Run the command in-process; it must exit 2 with one stderr line naming ``names``
    (``after_log``: a run that failed mid-way may have logged its start before, in lines that
    begin with the time)."""
    capsys.readouterr()  # what ran before
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    if after_log:
        lines = [line for line in lines if not re.match(r"\d\d:\d\d:\d\d (starting|derived)", line)]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"guided-nc {argv[0]}: error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], (name, err)
    return lines[0]


def ufm_flags(folder: Path) -> list[str]:
    return [
        "--preset", "3:6:3", "--seeds", "1", "--iterations", "3", "--eval-interval", "1",
        "--out", str(folder), "--no-progress", "--threads", "1",
    ]  # fmt: skip


# --- 1. a symbolic link and its target are one run --------------------------------------------


def test_a_link_and_its_target_are_one_run_folder(tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.symlink_to(real)
    with RunLock(real):
        with pytest.raises(RunFolderLocked, match=rf"'{link}' \(= '{real}'\) is in use by PID"):
            RunLock(link).acquire()
        done = _cli("train", *_flags(link, method="standard"))  # the documented attack
        assert done.returncode == 2, done.stderr
        assert f"'{link}' (= '{real}') is in use by PID {os.getpid()}" in done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert list(real.iterdir()) == []  # the second writer wrote nothing
    with RunLock(link):  # the other way round: the target is refused while the link is held
        with pytest.raises(RunFolderLocked):
            RunLock(real).acquire()
    assert not (tmp_path / ".link.lock").exists()  # one lock file, beside the target


# --- 2. every folder knows its kind ---------------------------------------------------------------


def test_train_refuses_a_ufm_folder_and_leaves_it_untouched(tmp_path, capsys):
    folder = tmp_path / "U"
    assert main(["ufm", *ufm_flags(folder)]) == 0
    capsys.readouterr()
    assert (folder / "kind").read_text() == "ufm\n"
    assert (folder / "runs" / "fixed" / "seed0" / "kind").read_text() == "ufm\n"
    before = snapshot(folder)
    line = one_line_error(capsys, ["train", *_flags(folder)], f"'{folder}' is a ufm folder")
    assert "choose another --out" in line
    # The run folders inside are ufm folders too, even with --resume-or-start.
    run = folder / "runs" / "fixed" / "seed0"
    one_line_error(capsys, ["train", *_flags(run), "--resume-or-start"], f"'{run}' is a ufm")
    assert snapshot(folder) == before
    # ufm --report-only still reads it.
    assert main(["ufm", *ufm_flags(folder), "--report-only"]) == 0
    assert (folder / "report.md").exists()


def test_each_command_refuses_a_folder_of_another_kind(tmp_path, capsys):
    train = fit(config(tmp_path, "T", epochs=1))
    assert (train / "kind").read_text() == "train\n"
    before = snapshot(train)
    one_line_error(capsys, ["compare", "--out", str(train), "--report-only"], "is a train folder")
    one_line_error(capsys, ["ufm", *ufm_flags(train)], f"'{train}' is a train folder")
    one_line_error(capsys, ["ufm", *ufm_flags(train), "--report-only"], "is a train folder")
    assert snapshot(train) == before
    compare = tmp_path / "C"
    shutil.copytree(DATA / "compare-v0.1", compare)  # written before kinds: inferred
    one_line_error(capsys, ["train", *_flags(compare)], "is a compare folder (from runs/")
    one_line_error(capsys, ["ufm", *ufm_flags(compare), "--report-only"], "is a compare folder")
    (compare / "kind").write_text("gibberish\n")
    one_line_error(capsys, ["train", *_flags(compare)], str(compare / "kind"), "not a folder kind")


@pytest.mark.parametrize(
    ("folder", "kind"),
    [
        ("tests/data/compare-v0.1", "compare"),
        ("tests/data/ufm-v0.1", "ufm"),
        ("tests/data/ufm-v0.1/runs/fixed-seed0", "ufm"),
        ("docs/results/fashion-mnist-mlp-60ep", "compare"),
        ("docs/results/fashion-mnist-mlp-60ep/runs/implicit/seed0", "train"),
        ("docs/results/ufm-10", "ufm"),
        ("docs/results/ufm-scaling", "ufm"),
    ],
)
def test_folders_written_before_kinds_get_the_kind_their_files_show(folder, kind):
    assert folder_kind(REPOSITORY / folder)[0] == kind


def test_old_folders_without_a_kind_still_report(tmp_path, capsys):
    for name, command in (("compare-v0.1", ["compare"]), ("ufm-v0.1", ["ufm"])):
        folder = tmp_path / name
        shutil.copytree(DATA / name, folder)
        extra = ["--preset", "4:40:8", "--seeds", "2"] if command == ["ufm"] else []
        assert main([*command, "--out", str(folder), "--report-only", *extra]) == 0
        assert (folder / "report.md").exists() and not (folder / "kind").exists()
    capsys.readouterr()


# --- 3. checksummed checkpoints -------------------------------------------------------------------


def _tensors(value) -> list[torch.Tensor]:
    """Every tensor in a nested state, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (dict, list, tuple)):
        items = value.values() if isinstance(value, dict) else value
        return [tensor for item in items for tensor in _tensors(item)]
    return []


def _flip_a_tensor_byte(path: Path) -> None:
    """Flip one byte in the middle of the largest tensor's data (a stored zip entry)."""
    with zipfile.ZipFile(path) as archive:
        entry = max(
            (info for info in archive.infolist() if "/data/" in info.filename),
            key=lambda info: info.file_size,
        )
    data = bytearray(path.read_bytes())
    header = entry.header_offset  # local header: 30 bytes, the name, then the extra field
    name_length = int.from_bytes(data[header + 26 : header + 28], "little")
    extra_length = int.from_bytes(data[header + 28 : header + 30], "little")
    position = header + 30 + name_length + extra_length + entry.file_size // 2
    data[position] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_the_tensor_data_is_refused(tmp_path, capsys):
    folder = fit(config(tmp_path, epochs=1))
    path = folder / "checkpoint.pt"
    raw = torch.load(path, weights_only=True)
    _flip_a_tensor_byte(path)
    corrupt = torch.load(path, weights_only=True)  # torch reads the flipped byte silently
    pairs = zip(_tensors(raw), _tensors(corrupt), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)
    before = snapshot(folder)
    line = one_line_error(
        capsys, ["train", *_flags(folder, epochs=2), "--resume"], str(path), "checksum"
    )
    assert "Delete it to restart the run from scratch, or restore the file" in line
    assert snapshot(folder) == before


def test_checkpoints_carry_a_checksum_of_their_contents(tmp_path, caplog):
    path = tmp_path / "c.pt"
    state = {"epoch": 1, "w": torch.arange(6.0).reshape(2, 3), "rows": [{"a": 0.5}]}
    save_checkpoint(path, state)
    stored = torch.load(path, weights_only=True)
    assert isinstance(stored[CHECKSUM_KEY], str) and len(stored[CHECKSUM_KEY]) == 64
    assert CHECKSUM_KEY not in load_checkpoint(path)
    # A value changed after the checksum was taken (the bytes of a number in the pickle).
    stored["rows"][0]["a"] = 0.25
    torch.save(stored, path)
    with pytest.raises(CheckpointError, match=r"does not match the checksum stored in it"):
        load_checkpoint(path)
    # A checkpoint of an earlier version has no checksum: it loads, with a warning.
    torch.save(state, path)
    with caplog.at_level("WARNING", logger="guided_nc"):
        assert load_checkpoint(path)["epoch"] == 1
    assert "has no checksum" in caplog.text
    with pytest.raises(ValueError, match=f"key '{CHECKSUM_KEY}'"):
        save_checkpoint(path, {CHECKSUM_KEY: 1})


_DIE_INSIDE_THE_WRITE = textwrap.dedent(
    """
    import io, os, signal, sys
    from guided_nc import checkpoint, runfiles
    from guided_nc.cli import main

    calls = []

    def dying(path, write):
        calls.append(path)
        if len(calls) < int(os.environ["DIE_AT_WRITE"]):
            return runfiles.atomic_write(path, write)

        def half(stream):
            buffer = io.BytesIO()
            write(buffer)
            data = buffer.getvalue()
            stream.write(data[: len(data) // 2])
            stream.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        return runfiles.atomic_write(path, half)

    checkpoint.atomic_write = dying
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize("die_at", [1, 2])
def test_a_kill_inside_a_checkpoint_write_resumes_exactly(tmp_path, die_at):
    """SIGKILL with half of epoch ``die_at``'s checkpoint written; then ``--resume-or-start``
    (epoch 1: there is no checkpoint yet) gives the files of an uninterrupted run."""
    clean = fit(config(tmp_path, "clean", epochs=3, method="implicit"))
    folder = tmp_path / "killed"
    flags = _flags(folder, epochs=3, method="implicit")
    killed = subprocess.run(
        [sys.executable, "-c", _DIE_INSIDE_THE_WRITE, "train", *flags],
        capture_output=True,
        text=True,
        env={**_environment(), "DIE_AT_WRITE": str(die_at)},
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [p.name for p in folder.glob(".checkpoint.pt.*.tmp")]  # the half-written file
    if die_at > 1:
        assert load_checkpoint(folder / "checkpoint.pt")["epoch"] == die_at - 1  # verified
    resumed = _cli("train", *flags, "--resume-or-start")
    assert resumed.returncode == 0, resumed.stderr
    assert not list(folder.glob(".*.tmp"))
    assert (folder / "metrics.csv").read_bytes() == (clean / "metrics.csv").read_bytes()
    final, expected = (load_checkpoint(f / "checkpoint.pt")["model"] for f in (folder, clean))
    assert all(torch.equal(final[key], expected[key]) for key in expected)


# --- 4. one line naming the file for every broken run file ---------------------------------------

_COMPARE_RUN = "runs/standard/seed0"
_UFM_RUN = "runs/fixed-seed0"


def _break(path: Path, how: str) -> None:
    text = path.read_text() if path.exists() and how in ("cut", "text-cell", "garbage-row") else ""
    if how == "json-list":
        path.write_text("[1, 2, 3]\n")
    elif how == "cut":
        path.write_text(text[: len(text) // 2])
    elif how == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif how == "garbage-row":
        path.write_text(text + "\x07garbage\n")
    elif how == "text-cell":
        header, first, *rest = text.splitlines()
        cells = first.split(",")
        cells[-2] = "abc"
        path.write_text("\n".join([header, ",".join(cells), *rest]) + "\n")
    elif how == "npy-garbage":
        path.write_bytes(b"\x93NUMPY garbage " * 10)


@pytest.mark.parametrize(
    ("data", "file", "how", "problem"),
    [
        ("compare-v0.1", f"{_COMPARE_RUN}/config.json", "json-list", "holds a list, not a JSON"),
        ("compare-v0.1", f"{_COMPARE_RUN}/config.json", "cut", "not valid JSON"),
        ("compare-v0.1", f"{_COMPARE_RUN}/config.json", "binary", "binary data, not text"),
        ("compare-v0.1", f"{_COMPARE_RUN}/metrics.csv", "garbage-row", "garbage or cut row"),
        ("compare-v0.1", f"{_COMPARE_RUN}/metrics.csv", "text-cell", "where a number belongs"),
        ("compare-v0.1", f"{_COMPARE_RUN}/metrics.csv", "binary", "binary data, not text"),
        ("compare-v0.1", f"{_COMPARE_RUN}/summary.json", "cut", "not valid JSON"),
        ("compare-v0.1", f"{_COMPARE_RUN}/summary.json", "json-list", "holds a list"),
        ("compare-v0.1", f"{_COMPARE_RUN}/done", "binary", "binary data, not text"),
        ("compare-v0.1", f"{_COMPARE_RUN}/final_margins.npy", "npy-garbage", "not a .npy array"),
        ("compare-v0.1", "timing.json", "cut", "not valid JSON"),
        ("ufm-v0.1", "config.json", "json-list", "holds a list"),
        ("ufm-v0.1", f"{_UFM_RUN}/final_margins.npy", "npy-garbage", "not a .npy array"),
        ("ufm-v0.1", f"{_UFM_RUN}/metrics.csv", "text-cell", "where a number belongs"),
        ("ufm-v0.1", f"{_UFM_RUN}/timings.csv", "garbage-row", "garbage or cut row"),
        ("ufm-v0.1", f"{_UFM_RUN}/done.json", "binary", "binary data, not text"),
    ],
)
def test_a_broken_run_file_is_one_line_naming_it(tmp_path, capsys, data, file, how, problem):
    folder = tmp_path / data
    shutil.copytree(DATA / data, folder)
    _break(folder / file, how)
    before = snapshot(folder)
    if data == "compare-v0.1":
        argv = ["compare", "--out", str(folder), "--report-only"]
    else:
        argv = ["ufm", "--out", str(folder), "--report-only", "--preset", "4:40:8", "--seeds", "2"]
    line = one_line_error(capsys, argv, str(folder / file), problem)
    assert "restore it from a copy" in line or "delete it" in line
    assert snapshot(folder) == before  # nothing was written


@pytest.mark.parametrize("how", ["json-list", "cut", "directory-checkpoint"])
def test_a_broken_train_folder_is_one_line_naming_the_file(tmp_path, capsys, how):
    folder = fit(config(tmp_path, epochs=1))
    if how == "directory-checkpoint":
        (folder / "checkpoint.pt").unlink()
        (folder / "checkpoint.pt").mkdir()
        name, problem = "checkpoint.pt", "is a directory, not a file"
    else:
        _break(folder / "config.json", how)
        name, problem = "config.json", "holds a list" if how == "json-list" else "not valid JSON"
    before = snapshot(folder)
    one_line_error(
        capsys, ["train", *_flags(folder, epochs=2), "--resume"], str(folder / name), problem
    )
    assert snapshot(folder) == before
    # The same through a real process: no traceback, and --debug shows one.
    done = _cli("train", *_flags(folder, epochs=2), "--resume")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# --- 4b. read-only and forbidden disks ------------------------------------------------------------


@pytest.fixture
def unwritable(monkeypatch):
    """``unwritable(folder, code)``: every attempt to create a file or folder under ``folder``
    fails with ``OSError(code)``, as on a read-only mount (EROFS) or a folder of another user
    (EACCES; tests run as root, where chmod cannot show it)."""

    def install(folder: Path, code: int) -> None:
        inside = str(folder.resolve())

        def under(path) -> bool:
            return os.path.abspath(os.fspath(path)).startswith(inside)

        def refuse(path):
            raise OSError(code, os.strerror(code), os.fspath(path))

        real_open, real_mkdir, real_mkstemp = os.open, os.mkdir, tempfile.mkstemp
        creating = os.O_CREAT | os.O_WRONLY | os.O_RDWR

        def fake_open(path, flags, *args, **kwargs):
            if under(path) and flags & creating:
                refuse(path)
            return real_open(path, flags, *args, **kwargs)

        def fake_mkdir(path, *args, **kwargs):
            if under(path) and not os.path.isdir(path):
                refuse(path)
            return real_mkdir(path, *args, **kwargs)

        def fake_mkstemp(*args, dir=None, **kwargs):
            if dir is not None and under(dir):
                refuse(dir)
            return real_mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(os, "open", fake_open)
        monkeypatch.setattr(os, "mkdir", fake_mkdir)
        monkeypatch.setattr(tempfile, "mkstemp", fake_mkstemp)

    return install


@pytest.mark.parametrize(
    ("code", "says"),
    [(errno.EROFS, "the disk is read-only"), (errno.EACCES, "permission denied")],
    ids=["EROFS", "EACCES"],
)
@pytest.mark.parametrize("command", ["train", "ufm", "compare", "ufm-report", "compare-report"])
def test_a_read_only_or_forbidden_disk_is_one_line(
    tmp_path, capsys, unwritable, code, says, command
):
    disk = tmp_path / "disk"
    disk.mkdir()
    if command == "ufm-report":
        shutil.copytree(DATA / "ufm-v0.1", disk / "out")
        argv = ["ufm", "--out", str(disk / "out"), "--report-only", "--preset", "4:40:8"]
        argv += ["--seeds", "2"]
    elif command == "compare-report":
        shutil.copytree(DATA / "compare-v0.1", disk / "out")
        argv = ["compare", "--out", str(disk / "out"), "--report-only"]
    elif command == "ufm":
        argv = ["ufm", *ufm_flags(disk / "out")]
    elif command == "compare":
        argv = ["compare", "--out", str(disk / "out"), "--seeds", "1", "--methods", "standard"]
        argv += _flags(disk / "out")[:-2]  # the training options, without --out
    else:
        argv = ["train", *_flags(disk / "out")]
    before = snapshot(disk)
    unwritable(disk, code)
    line = one_line_error(capsys, argv, str(disk), says)
    assert "free some space" not in line and "--out" in line
    assert snapshot(disk) == before


# --- 4c. the smaller items ---------------------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_malicious_pickle_keeps_torchs_whole_refusal_on_one_line(tmp_path, capsys):
    folder = fit(config(tmp_path, epochs=1))
    torch.save({"x": _Evil()}, folder / "checkpoint.pt")
    line = one_line_error(
        capsys, ["train", *_flags(folder, epochs=2), "--resume"], str(folder / "checkpoint.pt")
    )
    assert "arbitrary code execution" in line and "weights_only" in line
    assert len(line) > 300  # not cut at 200 characters
    assert not (Path.cwd() / "pwned").exists()


def test_nan_weights_in_a_checkpoint_are_blamed_on_the_file(tmp_path, capsys):
    folder = fit(config(tmp_path, epochs=1))
    state = load_checkpoint(folder / "checkpoint.pt")
    key = next(iter(state["model"]))
    state["model"][key][0] = float("nan")
    save_checkpoint(folder / "checkpoint.pt", state)  # a valid checksum of the NaN
    line = one_line_error(
        capsys, ["train", *_flags(folder, epochs=2), "--resume"], str(folder / "checkpoint.pt")
    )
    assert f"NaN or Inf values in ['{key}']" in line and "learning rate" not in line


def test_a_full_disk_in_epoch_1_advises_what_works(tmp_path, capsys, monkeypatch):
    from guided_nc import checkpoint

    folder = tmp_path / "run"
    real_atomic_write = checkpoint.atomic_write

    def full_for_checkpoints(path, write):  # the big write of epoch 1 finds the disk full
        def no_space(stream):
            raise OSError(errno.ENOSPC, "No space left on device")

        return real_atomic_write(path, no_space)

    monkeypatch.setattr(checkpoint, "atomic_write", full_for_checkpoints)
    argv = ["train", *_flags(folder)]
    line = one_line_error(capsys, argv, str(folder), "is full", after_log=True)
    monkeypatch.undo()
    assert "--resume-or-start" in line and not (folder / "checkpoint.pt").exists()
    # Plain --resume would be refused here (no checkpoint yet); the advice works.
    one_line_error(capsys, ["train", *_flags(folder), "--resume"], "nothing to resume")
    assert main(["train", *_flags(folder), "--resume-or-start"]) == 0
    assert (folder / "done").exists()


@pytest.mark.parametrize("name", ["lr", "gain"])
def test_agd_built_directly_refuses_what_build_optimizer_refuses(name):
    weight = torch.nn.Parameter(torch.ones(3, 3))
    for value in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=rf"{name}={value} must be a finite number > 0"):
            AGD([weight], **{name: value})
    assert AGD([weight], **{name: 0.5}).param_groups[0][name] == 0.5


def test_broken_files_raise_run_file_errors_naming_them(tmp_path):
    """The readers themselves (the commands above go through them)."""
    path = tmp_path / "x.json"
    path.write_text('{"a": 1')
    with pytest.raises(RunFileError, match=rf"cannot read '{path}': it is not valid JSON"):
        runfiles.read_json(path)
    path.write_text("[]")
    assert runfiles.read_json(path) == []  # no expectation: any JSON
    with pytest.raises(RunFileError, match="holds a list, not a JSON object"):
        runfiles.read_config(path)
    (tmp_path / "d.npy").mkdir()
    with pytest.raises(RunFileError, match="is a directory, not a file"):
        runfiles.load_npy(tmp_path / "d.npy")
    buffer = io.BytesIO()
    np.savez(buffer, a=np.zeros(2))
    (tmp_path / "z.npy").write_bytes(buffer.getvalue())
    with pytest.raises(RunFileError, match=r"an \.npz archive, not a \.npy array"):
        runfiles.load_npy(tmp_path / "z.npy")
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("")
    with pytest.raises(RunFileError, match="no header row"):
        runfiles.read_long_csv(csv_path)
    csv_path.write_text("method,loss\nfixed,0.5\n")
    assert runfiles.read_long_csv(csv_path, runfiles.RUN_TEXT_COLUMNS) == [
        {"method": "fixed", "loss": 0.5}
    ]
    csv_path.write_text("method,loss\nfixed,low\n")
    assert runfiles.read_long_csv(csv_path)[0]["loss"] == "low"  # no column types: any text
    with pytest.raises(RunFileError, match=r"line 2, column 'loss' holds 'low'"):
        runfiles.read_long_csv(csv_path, runfiles.RUN_TEXT_COLUMNS)


def test_a_broken_file_in_another_folder_does_not_decide_a_kind(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("[")
    assert folder_kind(tmp_path) is None  # free: nothing of a run in it
    (tmp_path / "config.json").write_text("[")  # but a broken config.json of its own is named
    with pytest.raises(RunFileError, match=rf"'{tmp_path / 'config.json'}': it is not valid"):
        folder_kind(tmp_path)


def test_debug_shows_the_traceback_of_a_broken_run_file(tmp_path):
    folder = tmp_path / "compare"
    shutil.copytree(DATA / "compare-v0.1", folder)
    (folder / "runs" / "fixed" / "seed0" / "config.json").write_text("[]")
    plain = _cli("compare", "--out", str(folder), "--report-only")
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    debug = _cli("--debug", "compare", "--out", str(folder), "--report-only")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "RunFileError" in debug.stderr


def test_ufm_time_steps_refuses_another_kind_and_a_config_without_a_preset(tmp_path, capsys):
    train = fit(config(tmp_path, "T", epochs=1))
    before = snapshot(train)
    argv = ["ufm", "--preset", "3:6:3", "--time-steps", "1", "--out", str(train)]
    one_line_error(capsys, argv, f"'{train}' is a train folder")
    assert snapshot(train) == before
    folder = tmp_path / "ufm"
    shutil.copytree(DATA / "ufm-v0.1", folder)
    saved = json.loads((folder / "config.json").read_text())
    del saved["config"]["preset"]
    (folder / "config.json").write_text(json.dumps(saved))
    (folder / "kind").write_text("ufm\n")  # a ufm folder whose config.json lost its preset
    argv = ["ufm", "--out", str(folder), "--report-only", "--preset", "4:40:8", "--seeds", "2"]
    one_line_error(capsys, argv, str(folder / "config.json"), "has no ['preset']")
