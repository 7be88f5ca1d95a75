"""The places a newcomer lands first, through the command line: each mistake is one line on
stderr with the fix (exit 2, no traceback unless ``--debug``), and ``train`` ends with the
accuracies.

Truth: the inputs are made wrong on purpose (a download from a refused local port, an optional
package hidden from import, a misspelt name), and each line is checked for what the user needs:
what went wrong, the valid names and the way out. Accuracies are checked against metrics.csv,
method variants against their definition in the paper's terms (section 5, appendix C).
"""

from __future__ import annotations

import sys

import pytest
import torchvision

from guided_nc.catalog import DownloadFailed
from guided_nc.cli import main
from guided_nc.runfiles import read_json, read_long_csv

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: A local port that refuses connections (discard): no real address is ever contacted.
REFUSED = "http://127.0.0.1:9/"

TINY = ["--dataset", "digits", "--model", "mlp", "--width", "16", "--depth", "1"]
TINY += ["--epochs", "1", "--batch-size", "100", "--no-progress"]


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``guided-nc argv``: (exit code, stdout, stderr); argparse's exits count too."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code: int, err: str, *needed: str) -> None:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for text in needed:
        assert text in err, (text, err)


# --- an offline download ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "torchvision_class", "attribute", "value"),
    [
        ("cifar10", "CIFAR10", "url", REFUSED + "cifar-10-python.tar.gz"),
        ("mnist", "MNIST", "mirrors", [REFUSED]),
    ],
)
def test_an_offline_download_is_one_line_and_leaves_no_folder(
    dataset, torchvision_class, attribute, value, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(getattr(torchvision.datasets, torchvision_class), attribute, value)
    root = tmp_path / "data" / "new"
    argv = [*TINY, "--dataset", dataset, "--download", "--data-root", str(root)]
    code, _, err = cli(["train", *argv, "--out", str(tmp_path / "run")], capsys)
    assert_one_line(
        code, err, f"dataset {dataset!r}", "127.0.0.1:9", str(root), "--dataset fashion-mnist"
    )
    assert not (tmp_path / "data").exists()  # the folders the attempt created are gone
    # A root that existed keeps what it had, and only that.
    root.mkdir(parents=True)
    (root / "notes.txt").write_text("mine")
    code, _, err = cli(["train", *argv, "--out", str(tmp_path / "run2")], capsys)
    assert_one_line(code, err, "127.0.0.1:9")
    assert [path.name for path in root.iterdir()] == ["notes.txt"]
    with pytest.raises(DownloadFailed):
        main(["--debug", "train", *argv, "--out", str(tmp_path / "run3")])


# --- a missing optional package -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "modules", "package"),
    [
        ("digits", ["sklearn", "sklearn.datasets", "sklearn.model_selection"], "scikit-learn"),
        ("mnist1d", ["mnist1d", "mnist1d.data"], "mnist1d"),
    ],
)
def test_a_missing_optional_package_names_the_extra(
    dataset, modules, package, tmp_path, monkeypatch, capsys
):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # import now fails as if not installed
    code, _, err = cli(
        ["train", *TINY, "--dataset", dataset, "--out", str(tmp_path / "run")], capsys
    )
    assert_one_line(
        code, err, f"dataset {dataset!r}", repr(package), 'pip install "guided-nc[data]"'
    )
    assert "pip install sklearn" not in err


# --- a misspelt name ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needed"),
    [
        (["train", "--dataset", "cifar-10"], ["dataset='cifar-10'", "did you mean 'cifar10'?"]),
        (["train", "--dataset", "Fashion_MNIST"], ["did you mean 'fashion-mnist'?"]),
        (["train", "--model", "resnet-18"], ["did you mean 'resnet18'?"]),
        (["train", "--loss", "label_smoothing"], ["did you mean 'label-smoothing'?"]),
        (["train", "--method", "etf"], ["method='etf'", "did you mean 'fixed' or 'implicit'?"]),
        (["train", "--method", "implicit_no_ddn"], ["did you mean 'implicit-no-ddn'?"]),
        (["compare", "--methods", "standard,etf"], ["'etf': did you mean 'fixed' or 'implicit'?"]),
        (["ufm", "--methods", "fixed_haar"], ["did you mean 'fixed-haar'?"]),
        (["train", "--dataset", "svhn"], ["dataset='svhn'", "'cifar10'", "pick one of those"]),
    ],
)
def test_a_misspelt_name_gets_the_closest_valid_one(argv, needed, tmp_path, capsys):
    code, _, err = cli([*argv, "--out", str(tmp_path / "out")], capsys)
    assert_one_line(code, err, f"guided-nc {argv[0]}: error:", *needed)
    assert "usage:" not in err


# --- train: every method, and the accuracies at the end -----------------------------------------

#: What each method means in the paper's terms: the head, its DDN gradient, the ETF's rotation.
VARIANTS = [
    ("standard", [], "standard", True, "canonical"),
    ("fixed", [], "fixed", True, "canonical"),
    ("fixed-haar", [], "fixed", True, "haar"),
    ("fixed", ["--rotation", "haar"], "fixed", True, "haar"),
    ("implicit", [], "implicit", True, "canonical"),
    ("implicit-no-ddn", [], "implicit", False, "canonical"),
    ("implicit", ["--no-ddn-grad"], "implicit", False, "canonical"),
]


@pytest.mark.parametrize(("method", "extra", "head", "ddn_grad", "rotation"), VARIANTS)
def test_train_runs_every_method_and_prints_the_accuracies(
    method, extra, head, ddn_grad, rotation, tmp_path, capsys
):
    folder = tmp_path / "run"
    code, out, err = cli(["train", *TINY, "--method", method, *extra, "--out", str(folder)], capsys)
    assert code == 0, err
    saved = read_json(folder / "config.json")["config"]
    assert (saved["method"], saved["ddn_grad"], saved["rotation"]) == (head, ddn_grad, rotation)
    final = read_long_csv(folder / "metrics.csv")[-1]
    assert out.splitlines() == [
        f"epoch 1: train top-1 {final['train_acc1']:.2f} %, test top-1 {final['test_acc1']:.2f} %",
        f"run folder: {folder}",
    ]
