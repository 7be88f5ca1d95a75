"""The README's Python snippets run as printed (each ```python block, in order, verbatim).

The snippets use names a reader has in their own code (``centred_means``, ``backbone``,
``train_set``, ...); the test defines those, small, and then executes every block unchanged in
one namespace, so a snippet that stops working fails here. Truth: the snippets' own results
checked against the maths they claim (orthonormal frames, unit-norm classifier rows, the CE
bound's value, the own-model run folder).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from guided_nc.models import build_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def _reader_names() -> dict:
    """What a reader's own code would hold: float32 class means, a previous frame, a backbone
    with 512 features, a labelled training set, a test loader."""
    generator = torch.Generator().manual_seed(0)
    d, K = 32, 10
    centred_means = torch.randn(d, K, generator=generator)
    P_prev, _ = torch.linalg.qr(torch.randn(d, K, generator=generator))
    torch.manual_seed(0)
    shape = (1, 8, 8)
    backbone = build_backbone(
        "mlp", input_shape=shape, affine=False, bias=False, width=512, depth=1
    )
    images = torch.randn(512, 1, 8, 8, generator=generator)
    train_labels = torch.arange(512) % 10
    train_set = TensorDataset(images, train_labels)
    return {
        "centred_means": centred_means,
        "P_prev": P_prev,  # float32, as a previous nearest_etf output of float32 means is
        "d": d,
        "K": K,
        "backbone": backbone,
        "train_labels": train_labels,
        "train_set": train_set,
        "epochs": 1,
        "x_test": images[:64],
        "test_loader": DataLoader(TensorDataset(images[:128], train_labels[:128]), batch_size=64),
    }


def test_every_python_snippet_of_the_readme_runs_as_printed(tmp_path, monkeypatch, capsys):
    blocks = python_blocks()
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)  # the own-model example writes runs/own-model
    namespace = _reader_names()
    for index, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {index + 1}", "exec"), namespace)
        except Exception as error:  # pragma: no cover - the message is the point
            raise AssertionError(f"README python block {index + 1} fails:\n{block}") from error

    # The API block: frames on St(d, K), a unit-norm ETF classifier, trust regions in float32.
    for name in ("P", "P_tr"):
        frame = namespace[name].double()
        assert namespace[name].dtype == torch.float32
        identity = torch.eye(10, dtype=torch.float64)
        torch.testing.assert_close(frame.T @ frame, identity, atol=1e-5, rtol=0)
    torch.testing.assert_close(namespace["W"].norm(dim=1), torch.ones(10), atol=1e-6, rtol=0)
    # The training loop trained the head; the metrics block measured 128 samples.
    assert int(namespace["head"].num_steps) == len(namespace["loader"])
    assert namespace["results"]["n"] == 128
    assert namespace["logits"].shape == (64, 10)
    # The own-model example wrote its run folder and printed the final metrics.
    result = namespace["result"]
    assert result.folder == Path("runs/own-model") and (result.folder / "done").exists()
    assert [row["epoch"] for row in result.rows] == [1, 2, 3]
    assert 0 <= result.final["test_acc1"] <= 100
    assert str(result.folder) in capsys.readouterr().out
