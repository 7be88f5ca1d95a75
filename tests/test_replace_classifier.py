"""replace_classifier: a guided-nc head on torchvision, timm and plain classifiers.

Independent truths: the features the new head takes must equal the original model's pre-logit
features computed through the library's own route (timm ``forward_head(pre_logits=True)``,
torchvision ResNet's ``avgpool`` + ``flatten``, the Sequential's layers before its Linear) on a
copy made before the swap; the logits must equal the head applied to those features.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

import guided_nc
from guided_nc.heads import FixedETFHead, ImplicitETFHead, LearnableHead


def _torchvision_prelogits(model: torchvision.models.ResNet, x: torch.Tensor) -> torch.Tensor:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return torch.flatten(model.avgpool(x), 1)


def _timm_prelogits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.mark.parametrize(
    ("make", "prelogits"),
    [
        (lambda: torchvision.models.resnet18(num_classes=5), _torchvision_prelogits),
        (lambda: timm.create_model("resnet18", pretrained=False, num_classes=5), _timm_prelogits),
    ],
    ids=["torchvision", "timm"],
)
@pytest.mark.parametrize("method", ["standard", "fixed", "implicit"])
def test_head_takes_the_backbones_prelogit_features(make, prelogits, method):
    torch.manual_seed(0)
    original = make().eval()
    reference = copy.deepcopy(original)
    model = guided_nc.replace_classifier(original, method, temperature=3.0).eval()
    assert isinstance(model, guided_nc.Classifier)
    head_class = {"standard": LearnableHead, "fixed": FixedETFHead, "implicit": ImplicitETFHead}
    assert isinstance(model.head, head_class[method])
    assert (model.head.num_features, model.head.num_classes) == (512, 5)
    assert model.head.temperature == 3.0
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = prelogits(reference, x)
        features = model.backbone(x)
        logits = model(x)
    torch.testing.assert_close(features, expected)
    torch.testing.assert_close(logits, model.head(expected))
    assert logits.shape == (3, 5)


def test_training_takes_labels_and_trains_the_backbone():
    torch.manual_seed(0)
    model = guided_nc.replace_classifier(
        timm.create_model("resnet18", pretrained=False, num_classes=4), "implicit"
    ).train()
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    logits = model(x, y)
    assert logits.shape == (8, 4)
    nn.functional.cross_entropy(logits, y).backward()
    assert model.backbone.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["standard", "implicit"])
def test_training_without_labels_is_a_one_line_error(method):
    model = guided_nc.replace_classifier(torchvision.models.resnet18(num_classes=4), method)
    with pytest.raises(ValueError, match=r"labels=None in training mode") as caught:
        model.train()(torch.randn(2, 3, 32, 32))
    assert "\n" not in str(caught.value)
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_sequential_classifier_attribute_and_last_linear():
    torch.manual_seed(0)

    class Net(nn.Module):  # VGG / EfficientNet style: classifier = Sequential(..., Linear)
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
            self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 3))

        def forward(self, x):
            return self.classifier(self.features(x))

    net = Net()
    reference = copy.deepcopy(net).eval()
    model = guided_nc.replace_classifier(net, "fixed").eval()
    x = torch.randn(5, 6)
    torch.testing.assert_close(model.backbone(x), reference.features(x))
    assert (model.head.num_features, model.head.num_classes) == (8, 3)

    plain = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    reference = copy.deepcopy(plain)
    model = guided_nc.replace_classifier(plain, "standard", num_classes=2).eval()
    torch.testing.assert_close(model.backbone(x[:, :4]), reference[:2](x[:, :4]))
    assert (model.head.num_features, model.head.num_classes) == (6, 2)


def test_a_model_without_a_linear_is_refused():
    with pytest.raises(ValueError, match=r"model=Conv2d has no final nn.Linear"):
        guided_nc.replace_classifier(nn.Conv2d(3, 4, 3), "standard")


def test_import_guided_nc_loads_neither_lightning_nor_timm():
    import subprocess
    import sys

    script = (
        "import sys, guided_nc; "
        "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'timm', 'torchmetrics') "
        "if m in sys.modules))"
    )
    printed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert printed.strip() == "[]"


def test_head_settings_and_options_reach_the_new_head():
    from guided_nc.settings import HeadSettings

    settings = HeadSettings(temperature=2.0, solver="svd", validation="deferred", delta=0.01)
    model = guided_nc.replace_classifier(
        nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3)), "implicit", settings=settings
    )
    head = model.head
    assert (head.temperature, head.solver, head.validation, head.delta) == (
        2.0,
        "svd",
        "deferred",
        0.01,
    )
    with pytest.raises(ValueError, match=r"ddn_grad=True conflicts with method='implicit-no-ddn'"):
        guided_nc.replace_classifier(
            nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3)), "implicit-no-ddn", ddn_grad=True
        )
