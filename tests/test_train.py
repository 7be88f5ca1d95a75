"""Training: configuration, one step of every model/head pair, resume, evaluation, errors."""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch

from guided_nc import train as train_module
from guided_nc.checkpoint import load_checkpoint
from guided_nc.config import TrainConfig, add_config_arguments
from guided_nc.heads import normalize_features
from guided_nc.models import MODEL_NAMES, Classifier, build_backbone
from guided_nc.optim import build_optimizer, build_scheduler
from guided_nc.runfiles import read_long_csv
from guided_nc.timing import training_step
from guided_nc.train import build_head_for, fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


#: A run small enough for unit tests: scikit-learn's digits (1437 train / 360 test, 8x8, K=10).
TINY = {
    "dataset": "digits",
    "model": "mlp",
    "width": 32,
    "depth": 2,
    "epochs": 3,
    "batch_size": 100,
    "eval_epochs": (1, 2),
    "progress": False,
}


def tiny_config(tmp_path, name="run", **overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, "out": str(tmp_path / name), **overrides})


# --------------------------------------------------------------------------- configuration
def test_cli_flags_come_from_the_fields():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(
        "--dataset digits --method implicit --no-ddn-grad --optimizer sgd --bias --lr 0.1 "
        "--eval-epochs 50,1,200 --epochs 200 --schedule cosine --no-progress --width 64".split()
    )
    config = TrainConfig.from_namespace(args)
    assert config.method == "implicit" and config.ddn_grad is False
    assert config.optimizer == "sgd" and config.bias is True and config.lr == 0.1
    assert config.eval_epochs == (1, 50, 200) and config.progress is False and config.width == 64
    # Every field has a flag.
    flags = {action.dest for action in parser._actions}
    assert {field.name for field in dataclasses.fields(TrainConfig)} <= flags


def test_bad_cli_values_are_rejected_by_argparse():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    for argv in (["--method", "learned"], ["--epochs", "ten"], ["--optimizer", "lbfgs"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def test_config_round_trips_through_json(tmp_path):
    config = tiny_config(tmp_path, method="implicit", eval_epochs=(1, 2))
    config.save(tmp_path / "config.json")
    payload = json.loads((tmp_path / "config.json").read_text())
    assert payload["environment"]["torch"] == torch.__version__
    assert TrainConfig.load(tmp_path / "config.json") == config


def test_unknown_keys_and_wrong_types_are_errors():
    with pytest.raises(ValueError, match=r"unknown TrainConfig keys \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(TypeError, match=r"epochs='3' has type str; expected int"):
        TrainConfig.from_dict({"epochs": "3"})
    with pytest.raises(TypeError, match=r"batch_size=True has type bool"):
        TrainConfig(batch_size=True)
    with pytest.raises(ValueError, match=r"method='learned' is not one of"):
        TrainConfig(method="learned")
    with pytest.raises(ValueError, match=r"eval_epochs=.* epoch < 1"):
        TrainConfig(eval_epochs=(0, 5))


def test_agd_with_biases_is_a_clear_error():
    with pytest.raises(ValueError, match=r"AGD with biases is not defined.*drop --bias"):
        TrainConfig(optimizer="agd", bias=True)
    with pytest.raises(ValueError, match=r"weight_decay=0.0005 with optimizer='agd'"):
        TrainConfig(optimizer="agd", weight_decay=5e-4)
    # Automatic choice: no biases with AGD, biases with the others.
    assert TrainConfig(optimizer="agd").bias is False
    assert TrainConfig(optimizer="sgd").bias is True


def test_no_ddn_grad_only_for_the_implicit_head():
    with pytest.raises(ValueError, match=r"ddn_grad=False only applies to method='implicit'"):
        TrainConfig(method="fixed", ddn_grad=False)


def test_eval_epochs_always_include_the_last():
    assert TrainConfig(epochs=5, eval_epochs=(1, 3, 9)).eval_epoch_set() == (1, 3, 5)


# --------------------------------------------------------------------------- one step
@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("method", ["standard", "fixed", "implicit"])
def test_every_model_and_head_trains_one_step(model_name, method):
    torch.manual_seed(0)
    num_classes, batch = 4, 8
    backbone = build_backbone(model_name, input_shape=(3, 8, 8), affine=False, bias=False)
    config = TrainConfig(method=method)
    model = Classifier(backbone, build_head_for(config, backbone.num_features, num_classes))
    optimizer = build_optimizer("agd", list(model.parameters()))
    scheduler = build_scheduler(optimizer, "none")
    inputs = torch.randn(batch, 3, 8, 8)
    labels = torch.arange(batch) % num_classes
    before = [p.detach().clone() for p in model.backbone.parameters()]
    model.train()
    loss, correct = training_step(model, optimizer, inputs, labels, scheduler=scheduler)
    assert torch.isfinite(loss) and 0 <= int(correct) <= batch
    after = list(model.backbone.parameters())
    changed = [not torch.equal(a, b) for a, b in zip(before, after, strict=True)]
    assert all(changed), f"{sum(changed)}/{len(changed)} backbone tensors were updated"
    if method == "standard":
        norms = model.head.weight.norm(dim=1)
        torch.testing.assert_close(norms, torch.ones(num_classes))  # rows renormalised
    if method == "implicit":
        assert int(model.head.num_steps) == 1


def test_a_step_with_sgd_and_biases_is_one_sgd_step_on_the_cross_entropy():
    torch.manual_seed(0)
    backbone = build_backbone("mlp", input_shape=(1, 8, 8), bias=True, affine=True, width=16)
    model = Classifier(
        backbone, build_head_for(TrainConfig(optimizer="sgd", method="standard"), 16, 3)
    )
    lr, inputs, labels = 0.1, torch.randn(6, 1, 8, 8), torch.arange(6) % 3
    optimizer = build_optimizer("sgd", list(model.parameters()), lr=lr)
    biases = {name: p for name, p in model.named_parameters() if p.ndim == 1}

    # Independent loss and gradient: the head's maths by hand in float64 (h = tau f/||f||,
    # logits = h W^T, cross-entropy by log-sum-exp) on the parameters before the step.
    def loss_by_hand() -> torch.Tensor:
        features = model.backbone(inputs).double()
        h = 5.0 * features / features.norm(dim=1, keepdim=True)
        logits = h @ model.head.weight.double().T
        picked = logits.gather(1, labels[:, None]).squeeze(1)
        return (torch.logsumexp(logits, dim=1) - picked).mean()

    expected_loss = loss_by_hand()
    gradients = torch.autograd.grad(expected_loss, list(biases.values()))
    before = {name: p.detach().clone() for name, p in biases.items()}
    loss, _ = training_step(
        model, optimizer, inputs, labels, scheduler=build_scheduler(optimizer, "none")
    )
    torch.testing.assert_close(loss.double(), expected_loss.detach(), rtol=1e-5, atol=1e-6)
    # SGD's first step with momentum: the buffer is the gradient, p <- p - lr * grad.
    for (name, value), grad in zip(before.items(), gradients, strict=True):
        expected = value - lr * grad.float()
        torch.testing.assert_close(biases[name].detach(), expected, rtol=1e-5, atol=1e-7)
    assert biases and all(grad.abs().max() > 0 for grad in gradients)


# --------------------------------------------------------------------------- whole runs
def _final_state(folder) -> dict:
    return load_checkpoint(folder / "checkpoint.pt")["model"]


def _assert_same_run(a, b):
    state_a, state_b = _final_state(a), _final_state(b)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert (a / "metrics.csv").read_text() == (b / "metrics.csv").read_text()


class _Crash(KeyboardInterrupt):
    pass


@pytest.mark.parametrize(
    ("overrides", "crash_epoch", "mid_write"),
    [
        ({"method": "implicit"}, 2, True),  # killed while writing epoch 2: resume from 1
        ({"method": "standard", "optimizer": "sgd", "schedule": "cosine"}, 1, False),
    ],
)
def test_resume_gives_the_same_numbers_as_an_uninterrupted_run(
    tmp_path, monkeypatch, overrides, crash_epoch, mid_write
):
    reference = fit(tiny_config(tmp_path, "reference", **overrides))
    real_save = train_module.save_checkpoint

    def crashing_save(path, state):
        if state["epoch"] == crash_epoch:
            if mid_write:  # die inside torch.save: the temp file is half written
                real_torch_save = torch.save

                def half_save(obj, file, *args, **kwargs):
                    real_torch_save({"partial": torch.zeros(10)}, file)
                    raise _Crash

                monkeypatch.setattr(torch, "save", half_save)
                try:
                    real_save(path, state)
                finally:
                    monkeypatch.setattr(torch, "save", real_torch_save)
            real_save(path, state)
            raise _Crash  # killed right after the checkpoint
        real_save(path, state)

    monkeypatch.setattr(train_module, "save_checkpoint", crashing_save)
    config = tiny_config(tmp_path, "interrupted", **overrides)
    with pytest.raises(_Crash):
        fit(config)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    folder = tmp_path / "interrupted"
    assert not (folder / "done").exists()
    survived = load_checkpoint(folder / "checkpoint.pt")["epoch"]
    assert survived == (crash_epoch - 1 if mid_write else crash_epoch)
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []
    with pytest.raises(ValueError, match=r"already holds a run.*--resume"):
        fit(config)
    fit(dataclasses.replace(config, resume=True))
    assert (folder / "done").exists()
    _assert_same_run(reference, folder)


def test_run_folder_outputs_and_evaluation_semantics(tmp_path):
    """Metrics come from the un-augmented train split in eval mode, with the training tau."""
    config = tiny_config(tmp_path, method="implicit", temperature=3.0)
    folder = fit(config)
    for name in ("config.json", "metrics.csv", "summary.json", "checkpoint.pt", "done"):
        assert (folder / name).is_file(), name
    assert any((folder / "tensorboard").iterdir())
    rows = read_long_csv(folder / "metrics.csv")
    assert [row["epoch"] for row in rows] == [1, 2, 3]  # eval epochs + the last
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["time_per_step_s"] > 0 and summary["peak_memory_mb"] > 0
    assert summary["steps_per_epoch"] == 1437 // 100

    # Independent evaluation of the final model: rebuild it and classify the digits ourselves.
    from guided_nc.data import build_datasets

    data = build_datasets("digits", augment=False)
    backbone = build_backbone(
        "mlp", input_shape=data.input_shape, affine=False, bias=False, width=32, depth=2
    )
    model = Classifier(backbone, build_head_for(config, 32, 10))
    model.load_state_dict(_final_state(folder))
    model.eval()
    for split, dataset in (("train", data.train_eval), ("test", data.test)):
        inputs, labels = dataset[torch.arange(len(dataset))]
        with torch.no_grad():
            features = model.backbone(inputs)
            h = normalize_features(features, 3.0)
            # Logits by hand: W h + b with b = -W mu (running training mean), method.md 5.
            logits = h @ model.head.weight.T - model.head.weight @ model.head.running_mean
        accuracy = 100.0 * (logits.argmax(1) == labels).double().mean().item()
        assert rows[-1][f"{split}_acc1"] == pytest.approx(accuracy, abs=1e-9)
        top5 = logits.topk(5, dim=1).indices.eq(labels[:, None]).any(1).double().mean().item()
        assert rows[-1][f"{split}_acc5"] == pytest.approx(100.0 * top5, abs=1e-9)
        assert rows[-1][f"{split}_n"] == len(dataset)


def test_methods_see_the_same_batches_at_a_seed(tmp_path, monkeypatch):
    seen: dict[str, list] = {}
    real_step = train_module.training_step

    def recording_step(model, optimizer, inputs, labels, **kwargs):
        seen.setdefault(model.head.__class__.__name__, []).append(labels.clone())
        return real_step(model, optimizer, inputs, labels, **kwargs)

    monkeypatch.setattr(train_module, "training_step", recording_step)
    for method in ("standard", "fixed", "implicit"):
        fit(tiny_config(tmp_path, method, method=method, epochs=1, augment=False))
    batches = list(seen.values())
    assert len(batches) == 3 and len(batches[0]) == 14
    for other in batches[1:]:
        assert all(torch.equal(a, b) for a, b in zip(batches[0], other, strict=True))
    # Stratified: every class in every batch of 100.
    assert all(len(torch.unique(labels)) == 10 for labels in batches[0])


# --------------------------------------------------------------------------- errors
def test_implicit_head_with_fewer_features_than_classes_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"d=8 < K=10; use a wider backbone \(e.g. --width\)"):
        fit(tiny_config(tmp_path, method="implicit", width=8))
    assert not (tmp_path / "run").exists()  # nothing written


def test_unknown_dataset_and_model_are_clear_errors(tmp_path):
    # The configuration refuses them before anything runs (and the builders too).
    with pytest.raises(ValueError, match=r"dataset='imagenet21k' is not one of \['cifar10'"):
        tiny_config(tmp_path, dataset="imagenet21k")
    with pytest.raises(ValueError, match=r"model='resnet9' is not one of \['resnet18'"):
        tiny_config(tmp_path, model="resnet9")
    from guided_nc.data import build_datasets

    with pytest.raises(ValueError, match=r"unknown dataset name='imagenet21k'; choose one of"):
        build_datasets("imagenet21k")
    with pytest.raises(ValueError, match=r"unknown model name='resnet9'; choose one of"):
        build_backbone("resnet9")


def test_a_model_with_one_dimensional_parameters_is_rejected_by_agd(tmp_path, monkeypatch):
    # A backbone that keeps a bias although the config asks for none (e.g. a custom model).
    real_build = build_backbone

    def with_bias(*args, **kwargs):
        return real_build(*args, **{**kwargs, "bias": True})

    monkeypatch.setattr("guided_nc.models.build_backbone", with_bias)
    with pytest.raises(ValueError, match=r"AGD cannot train 1-D parameters.*--no-bias"):
        fit(tiny_config(tmp_path))


def test_resume_with_a_changed_configuration_is_an_error(tmp_path):
    fit(tiny_config(tmp_path, epochs=1))
    with pytest.raises(ValueError, match=r"\['method'\] differ"):
        fit(tiny_config(tmp_path, epochs=1, method="fixed", resume=True))
    # A schedule that depends on the total number of steps cannot be extended exactly.
    fit(tiny_config(tmp_path, "cosine", epochs=1, optimizer="sgd", schedule="cosine", bias=True))
    with pytest.raises(ValueError, match=r"\['epochs'\] differ.*only with --schedule none"):
        fit(
            tiny_config(
                tmp_path,
                "cosine",
                epochs=2,
                optimizer="sgd",
                schedule="cosine",
                bias=True,
                resume=True,
            )
        )


def _write_image_folder(root, rng, per_class=4, classes=3) -> None:
    """ImageNet layout (train/<class>/*.png, val/<class>/*.png) of random 12x10 RGB images."""
    from PIL import Image

    for split, count in (("train", per_class), ("val", 1)):
        for index_class in range(classes):
            folder = root / split / f"n{index_class:02d}"
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")


def test_evaluation_does_not_perturb_training_and_runs_extend_exactly(tmp_path):
    """File-backed data augments from the global RNG in loader workers; evaluating must not
    shift that stream, and a finished run trained further equals a run that was always longer."""
    _write_image_folder(tmp_path / "data", np.random.default_rng(0))
    images = {
        "dataset": "imagenet",
        "data_root": str(tmp_path / "data"),
        "batch_size": 6,
        "method": "implicit",
        "width": 8,
        "depth": 1,
    }
    every_epoch = fit(tiny_config(tmp_path, "every", eval_epochs=(1, 2, 3), **images))
    last_only = fit(tiny_config(tmp_path, "last", eval_epochs=(3,), **images))
    state_a, state_b = _final_state(every_epoch), _final_state(last_only)
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert (
        read_long_csv(every_epoch / "metrics.csv")[-1]
        == read_long_csv(last_only / "metrics.csv")[0]
    )

    short = fit(tiny_config(tmp_path, "extended", epochs=2, eval_epochs=(1, 2), **images))
    assert (short / "done").exists()
    fit(tiny_config(tmp_path, "extended", eval_epochs=(1, 2, 3), resume=True, **images))
    assert (short / "done").exists()
    _assert_same_run(every_epoch, short)


def test_long_tail_and_label_noise_flags_reach_the_training_split(tmp_path):
    """--long-tail exp --imbalance-factor 0.5 keeps int(n_max * 0.5^(c/(K-1))) of class c."""
    from guided_nc.data import build_datasets

    clean_counts = torch.bincount(build_datasets("digits", augment=False).train_labels)
    n_max = int(clean_counts.min())  # the release's rule: the smallest class sets the head
    expected = sum(int(n_max * 0.5 ** (c / 9)) for c in range(10))
    config = tiny_config(
        tmp_path, epochs=1, eval_epochs=(1,), long_tail="exp", imbalance_factor=0.5,
        label_noise=0.1,
    )  # fmt: skip
    rows = read_long_csv(fit(config) / "metrics.csv")
    assert rows[-1]["train_n"] == expected < int(clean_counts.sum())
    assert rows[-1]["test_n"] == 360  # the test split stays balanced and clean
