"""One home for head and optimiser settings: HeadSettings and OptimizerSettings.

Truths: the heads' own attributes (what a setting must end up as), the dataclass fields of the
two run configurations (the same declarations, so the same checks and the same messages), the
command-line parser (every head option is a flag), and the saved config.json files of earlier
versions (they must still load).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from guided_nc.cli import build_parser
from guided_nc.config import PRESETS, TrainConfig, UFMConfig
from guided_nc.heads import FixedETFHead, ImplicitETFHead, LearnableHead, build_head
from guided_nc.settings import HeadSettings, OptimizerSettings
from guided_nc.train import build_head_for

ROOT = Path(__file__).resolve().parents[1]
HEAD_FIELDS = [item.name for item in dataclasses.fields(HeadSettings)]
OPTIMIZER_FIELDS = [item.name for item in dataclasses.fields(OptimizerSettings)]
NON_DEFAULT = {
    "temperature": 3.0,
    "delta": 0.01,
    "ddn_grad": False,
    "running_mean_momentum": 0.5,
    "alpha_floor": 0.001,
    "solver": "svd",
    "compute_dtype": "float32",
    "validation": "deferred",
}


def test_both_run_configurations_take_the_fields_from_the_one_home():
    for config_class in (TrainConfig, UFMConfig):
        names = {item.name for item in dataclasses.fields(config_class)}
        assert set(HEAD_FIELDS) | set(OPTIMIZER_FIELDS) <= names
        assert issubclass(config_class, HeadSettings)
        assert issubclass(config_class, OptimizerSettings)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"temperature": 0.0}, r"temperature=0.0 must be a finite number > 0"),
        ({"delta": -1.0}, r"delta=-1.0 must be a finite number >= 0"),
        ({"solver": "qr"}, r"solver='qr' is not supported"),
        ({"validation": "lazy"}, r"validation='lazy' is not supported"),
        ({"compute_dtype": "float16"}, r"compute_dtype='float16' is not one of"),
        (
            {"running_mean_momentum": 2.0},
            r"running_mean_momentum=2.0 must be a finite number in \(0, 1\]",
        ),
        ({"weight_decay": 0.1}, r"weight_decay=0.1 with optimizer='agd'"),
        ({"optimizer": "lion"}, r"optimizer='lion' is not one of"),
        ({"lr": float("nan")}, r"lr=nan must be a finite number"),
    ],
)
def test_the_configurations_validate_alike(values, message):
    settings_class = OptimizerSettings if set(values) <= set(OPTIMIZER_FIELDS) else HeadSettings
    for make in (
        lambda: settings_class(**values),
        lambda: TrainConfig(**values),
        lambda: UFMConfig(preset=PRESETS["ufm-10"], **values),
    ):
        with pytest.raises(ValueError, match=message) as caught:
            make()
        assert "\n" not in str(caught.value)


def test_every_setting_reaches_the_head():
    settings = HeadSettings(**NON_DEFAULT)
    implicit = build_head("implicit", 8, 3, settings)
    assert isinstance(implicit, ImplicitETFHead)
    for name in ("temperature", "delta", "ddn_grad", "running_mean_momentum", "alpha_floor"):
        assert getattr(implicit, name) == NON_DEFAULT[name], name
    assert implicit.solver == "svd" and implicit.validation == "deferred"
    assert implicit.compute_dtype == torch.float32
    fixed = build_head("fixed", 8, 3, settings, bias_gradient=False)
    assert isinstance(fixed, FixedETFHead) and not fixed.bias_gradient
    assert fixed.compute_dtype == torch.float32 and fixed.running_mean_momentum == 0.5
    standard = build_head("standard", 8, 3, settings)
    assert isinstance(standard, LearnableHead) and standard.temperature == 3.0


def test_a_haar_rotation_is_drawn_from_the_generator():
    heads = [
        build_head("fixed-haar", 8, 3, generator=torch.Generator().manual_seed(seed))
        for seed in (0, 0, 1)
    ]
    assert heads[0].rotation == "haar"
    torch.testing.assert_close(heads[0].weight, heads[1].weight)
    assert not torch.allclose(heads[0].weight, heads[2].weight)
    canonical = build_head("fixed", 8, 3)
    assert not torch.allclose(heads[0].weight, canonical.weight)


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("implicit-no-ddn", {"ddn_grad": True}, r"ddn_grad=True conflicts with method="),
        ("fixed-haar", {"rotation": "canonical"}, r"rotation='canonical' conflicts with method="),
    ],
)
def test_extra_keywords_never_override_a_variant(method, options, message):
    with pytest.raises(ValueError, match=message) as caught:
        build_head(method, 8, 3, **options)
    assert "\n" not in str(caught.value)
    assert f"use method='{method.split('-')[0]}'" in str(caught.value)


def test_every_head_option_is_a_flag_of_train_ufm_and_compare():
    parser = build_parser()
    flags = [
        "--solver=svd",
        "--compute-dtype=float32",
        "--validation=deferred",
        "--delta=0.01",
        "--temperature=3",
        "--alpha-floor=0.001",
        "--running-mean-momentum=0.5",
        "--no-bias-gradient",
    ]
    args = parser.parse_args(["train", "--method", "implicit", *flags])
    config = TrainConfig.from_namespace(args)
    head = build_head_for(config, 8, 3)
    assert (head.solver, head.compute_dtype, head.validation) == ("svd", torch.float32, "deferred")
    assert (head.delta, head.temperature, head.alpha_floor) == (0.01, 3.0, 0.001)
    assert head.running_mean_momentum == 0.5
    assert not config.bias_gradient
    for command in (["ufm"], ["compare"]):
        parsed = vars(parser.parse_args([*command, *flags]))
        assert parsed["solver"] == "svd" and parsed["validation"] == "deferred"
        assert parsed["compute_dtype"] == "float32" and parsed["bias_gradient"] is False


def test_saved_configurations_still_load():
    paths = sorted(
        [*ROOT.glob("docs/results/**/config.json"), *ROOT.glob("tests/data/**/config.json")]
    )
    assert len(paths) > 20
    loaded = 0
    for path in paths:
        data = json.loads(path.read_text())
        data = data.get("config", data)
        if "preset" in data:  # a UFM run or experiment: its head settings are flat keys too
            preset = data["preset"]
            assert {"temperature", "delta", "ddn_grad"} <= set(data), path
            known = {item.name for item in dataclasses.fields(UFMConfig)}
            values = {k: v for k, v in data.items() if k in known and k not in ("preset", "seeds")}
            values.pop("methods", None)
            UFMConfig(preset=PRESETS.get(preset["name"], PRESETS["ufm-10"]), **values)
        else:
            config = TrainConfig.load(path)
            assert config.head_settings().temperature == data["temperature"]
        loaded += 1
    assert loaded == len(paths)
