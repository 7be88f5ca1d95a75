"""What a researcher expects on day one: progress they can see, useful defaults, their own
model and loss, clear command-line errors, and the packaging files.

Truth: the output of the real command in a non-terminal, the formulas of the losses written out
here, torchvision's own failure, and the files of the repository.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from guided_nc import train_model
from guided_nc.cli import build_parser, main
from guided_nc.compare import method_config
from guided_nc.config import TrainConfig
from guided_nc.models import one_dimensional_parameters, torchvision_resnet
from guided_nc.progress import Progress
from guided_nc.timing import build_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]


def _environment() -> dict[str, str]:
    import os

    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{path}", "OMP_NUM_THREADS": "1"}


# --- progress and defaults ------------------------------------------------------------------------


def test_a_log_file_gets_one_line_per_epoch_with_loss_accuracy_and_time(tmp_path):
    command = [
        sys.executable,
        "-m",
        "guided_nc.cli",
        "train",
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--width",
        "16",
        "--depth",
        "1",
        "--epochs",
        "3",
        "--batch-size",
        "100",
        "--out",
        str(tmp_path / "run"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_environment())
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "seed 0: epoch" in line]
    assert len(lines) == 3, done.stderr
    for epoch, line in enumerate(lines, start=1):
        assert re.search(
            rf"implicit seed 0: epoch {epoch}/3 step {14 * epoch}/42 loss \S+ acc ", line
        ), line
        assert re.search(r"\d+\.\d s \(\d+\.\d+ steps/s\)$", line), line
    assert "starting run" in done.stderr and "derived: K=10, d=16" in done.stderr


def test_a_log_file_gets_a_ufm_line_every_100_iterations(tmp_path):
    command = [
        sys.executable,
        "-m",
        "guided_nc.cli",
        "ufm",
        "--preset",
        "3:24:6",
        "--iterations",
        "200",
        "--seeds",
        "1",
        "--methods",
        "implicit",
        "--threads",
        "1",
        "--out",
        str(tmp_path / "ufm"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_environment())
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "implicit seed 0 step" in line]
    assert [re.search(r"step (\d+)/200", line).group(1) for line in lines] == ["100", "200"]
    assert all(re.search(r"loss \S+ acc \S+ %", line) for line in lines)


def test_a_terminal_bar_shows_loss_and_accuracy(capsys):
    progress = Progress(10, "implicit seed 0", terminal=True)
    progress.update(5)
    progress.log("epoch 1/2", loss=0.25, acc=91.5)
    assert progress._bar.postfix == "loss 0.25 acc 91.50 %"
    progress.close()


def test_defaults_give_curves_and_the_implicit_head():
    config = TrainConfig(epochs=45)
    assert config.method == "implicit"
    assert config.eval_epoch_set() == (1, 2, 5, 10, 20, 30, 40, 45)
    assert TrainConfig(epochs=3).eval_epoch_set() == (1, 2, 3)
    assert TrainConfig(epochs=45, eval_epochs=(7,)).eval_epoch_set() == (7, 45)


# --- your own model, data and loss ----------------------------------------------------------------


def _data(n=400, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=generator), torch.arange(n) % 4)


def test_train_model_trains_your_backbone_on_your_data(tmp_path):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 32, bias=False), nn.ReLU())
    result = train_model(
        backbone,
        _data(),
        DataLoader(_data(200, 1), batch_size=50),
        epochs=2,
        batch_size=100,
        out=str(tmp_path / "own"),
    )
    assert (result.folder / "done").exists() and backbone.num_features == 32
    assert [row["epoch"] for row in result.rows] == [1, 2]
    assert result.final["train_n"] == 400 and result.final["test_n"] == 200
    saved = json.loads((result.folder / "config.json").read_text())["config"]
    assert saved["dataset"] == saved["model"] == "custom" and saved["method"] == "implicit"
    # Resume works with the same backbone: nothing left to train, same rows.
    again = train_model(
        backbone, _data(), None, epochs=2, batch_size=100, resume=True, out=str(tmp_path / "own")
    )
    assert again.rows == result.rows
    with pytest.raises(ValueError, match=r"model='custom' but no backbone was passed"):
        TrainConfig(model="custom", dataset="digits")  # valid as a config ...
        from guided_nc.train import fit

        fit(TrainConfig(model="custom", dataset="digits", out=str(tmp_path / "x")))


def test_a_user_loss_and_the_built_in_losses(tmp_path):
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    one_hot = torch.eye(4)[labels]
    # MSE to one-hot targets, averaged over the 6 x 4 entries.
    torch.testing.assert_close(build_loss("mse")(logits, labels), ((logits - one_hot) ** 2).mean())
    # Label smoothing eps: (1 - eps) CE + eps * mean_k(-log p_k).
    log_p = torch.log_softmax(logits, dim=1)
    expected = (0.9 * -log_p[range(6), labels] + 0.1 * -log_p.mean(dim=1)).mean()
    torch.testing.assert_close(
        build_loss("label-smoothing", 0.1)(logits, labels), expected, rtol=1e-6, atol=0
    )
    with pytest.raises(ValueError, match=r"loss='hinge' is not one of"):
        build_loss("hinge")
    calls = []

    def my_loss(logits, labels):
        calls.append(logits.shape)
        return F.cross_entropy(logits, labels)

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 16, bias=False))
    train_model(
        backbone, _data(), epochs=1, batch_size=100, loss_fn=my_loss, out=str(tmp_path / "mine")
    )
    assert calls == [(100, 4)] * 4
    mse = train_model(
        nn.Sequential(nn.Flatten(), nn.Linear(64, 16, bias=False)),
        _data(),
        epochs=1,
        batch_size=100,
        loss="mse",
        out=str(tmp_path / "mse"),
    )
    assert json.loads((mse.folder / "config.json").read_text())["config"]["loss"] == "mse"


def test_torchvision_resnets_for_agd_without_torchvisions_crash():
    no_affine = functools.partial(nn.BatchNorm2d, affine=False)
    with pytest.raises(AttributeError):  # torchvision's own init sets BN weights to 1
        torchvision.models.resnet18(weights=None, norm_layer=no_affine)
    backbone = torchvision_resnet("resnet18", image_size=32)
    assert one_dimensional_parameters(backbone) == [] and backbone.num_features == 512
    assert backbone(torch.zeros(2, 3, 32, 32)).shape == (2, 512)
    with pytest.raises(ValueError, match=r"name='vgg11' is not a torchvision ResNet"):
        torchvision_resnet("vgg11")


def test_the_agd_error_names_the_fix(tmp_path):
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 16))  # a bias
    with pytest.raises(ValueError, match=r"remove_biases\(model\) and remove_norm_affine"):
        train_model(backbone, _data(), epochs=1, batch_size=100, out=str(tmp_path / "x"))


# --- the command line -----------------------------------------------------------------------------


def test_choices_are_listed_and_a_bad_name_is_one_line(capsys):
    with pytest.raises(SystemExit) as error:
        build_parser().parse_args(["train", "--dataset", "imagenet21k"])
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("guided-nc train: error: argument --dataset: dataset='imagenet21k'")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    assert "fashion-mnist" in text and "resnet18" in text and "label-smoothing" in text


def test_compare_has_no_ddn_grad_and_the_variants(tmp_path, monkeypatch):
    from guided_nc import train as train_module

    configs = []
    monkeypatch.setattr(train_module, "fit", lambda config: configs.append(config))
    monkeypatch.setattr("guided_nc.compare.measure_heads", lambda *a, **k: {})
    monkeypatch.setattr("guided_nc.reports.compare.write_report", lambda *a, **k: "skipped")
    main(
        f"compare --dataset digits --model mlp --methods implicit,fixed,fixed-haar "
        f"--no-ddn-grad --seeds 1 --out {tmp_path} --timing-repeats 0".split()
    )
    assert [(c.method, c.ddn_grad, c.rotation) for c in configs] == [
        ("implicit", False, "canonical"),
        ("fixed", True, "canonical"),
        ("fixed", True, "haar"),
    ]
    assert configs[2].out == str(tmp_path / "runs" / "fixed-haar" / "seed0")
    base = TrainConfig()
    assert method_config(base, "implicit-no-ddn").ddn_grad is False


def test_a_missing_optional_dependency_says_which_extra(monkeypatch):
    import importlib

    real = importlib.import_module

    def without_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", without_sklearn)
    from guided_nc.data import build_datasets

    with pytest.raises(ModuleNotFoundError, match=r'pip install "guided-nc\[data\]"'):
        build_datasets("digits")


# --- packaging ------------------------------------------------------------------------------------


def test_the_packaging_files_agree():
    import tomllib

    import guided_nc

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    citation = (ROOT / "CITATION.cff").read_text()
    assert "preferred-citation:" in citation
    assert "Optimising Towards the Nearest Simplex Equiangular Tight Frame" in citation
    assert f"version: {guided_nc.__version__}" in citation
    assert f"## {guided_nc.__version__}" in (ROOT / "CHANGELOG.md").read_text()
    assert (Path(guided_nc.__file__).parent / "py.typed").is_file()
    assert project["urls"]


def test_pytest_approx_refuses_a_tensor():
    # conftest's guard: approx of a tensor depends on pytest's version (9.2 iterates it and a
    # 0-d tensor cannot be iterated), so every test compares tensors with assert_close instead.
    with pytest.raises(TypeError, match=r"use torch\.testing\.assert_close"):
        pytest.approx(torch.tensor(1.0))
    assert 1.0 == pytest.approx(1.0 + 1e-9)
