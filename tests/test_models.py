"""Backbones: output shapes and feature widths, stems, the no-1-D-parameter variant, errors.

Independent truths: feature widths from the architectures' definitions (ResNet-18 512,
ResNet-50 2048, VGG-13 512), torchvision's own modules and layer lists, spatial sizes seen by
forward hooks, and ``nn.BatchNorm2d(affine=False)`` for the stripped norm layers.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from guided_nc.models import (
    MODEL_NAMES,
    build_backbone,
    check_no_one_dimensional_parameters,
    one_dimensional_parameters,
    remove_biases,
    remove_norm_affine,
)

EXPECTED_FEATURES = {"resnet18": 512, "resnet50": 2048, "vgg13": 512, "mlp": 512, "cnn": 128}
IMAGE_SHAPES = [(3, 32, 32), (1, 28, 28), (1, 8, 8)]


def _cases():
    for name in MODEL_NAMES:
        # ResNet-50 at full resolution is slow on a CPU; its 32x32 configuration is checked
        # structurally in the stem tests.
        for shape in IMAGE_SHAPES if name != "resnet50" else [(1, 8, 8)]:
            yield name, shape
    yield "mlp", (40,)


@pytest.mark.parametrize("affine_and_bias", [True, False])
@pytest.mark.parametrize(("name", "shape"), list(_cases()))
def test_backbone_output_shape_and_parameters(name, shape, affine_and_bias):
    torch.manual_seed(0)
    model = build_backbone(
        name, input_shape=shape, affine=affine_and_bias, bias=affine_and_bias
    ).eval()
    assert model.num_features == EXPECTED_FEATURES[name]
    inputs = torch.randn(3, *shape)
    with torch.no_grad():
        features = model(inputs)
    assert features.shape == (3, EXPECTED_FEATURES[name])
    assert features.dtype == torch.float32
    assert torch.isfinite(features).all()
    one_dimensional = one_dimensional_parameters(model)
    # Brute force over the parameters, independent of the helper.
    brute = [n for n, p in model.named_parameters() if p.dim() == 1]
    assert one_dimensional == brute
    if affine_and_bias:
        assert one_dimensional  # every model has batch norm with affine parameters by default
    else:
        assert one_dimensional == []
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                assert module.weight is None and module.bias is None and not module.affine
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                assert module.bias is None
        check_no_one_dimensional_parameters(model)  # no error


def test_backbone_float64_and_training_mode():
    model = build_backbone("cnn", input_shape=(1, 8, 8), affine=False, bias=False).double()
    features = model(torch.randn(4, 1, 8, 8, dtype=torch.float64))
    assert features.dtype == torch.float64 and features.shape == (4, 128)
    features.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_cifar_stem_has_no_maxpool(name):
    model = build_backbone(name, in_channels=3, image_size=32)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model.conv1.padding == (1, 1) and model.conv1.bias is None
    assert isinstance(model.fc, nn.Identity)
    if name == "resnet18":
        sizes = _layer4_size(model, torch.randn(1, 3, 32, 32))
        # Stride 1 stem, then layer2-4 halve: 32 -> 32 -> 16 -> 8 -> 4.
        assert sizes == (4, 4)


def _layer4_size(model, inputs):
    sizes = []

    def hook(module, args, output):
        sizes.append(tuple(output.shape[-2:]))  # returns None: the output is not replaced

    handle = model.layer4.register_forward_hook(hook)
    with torch.no_grad():
        model.eval()(inputs)
    handle.remove()
    return sizes[0]


def test_resnet_imagenet_stem_for_large_images():
    model = build_backbone("resnet18", in_channels=1, image_size=96)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert model.conv1.in_channels == 1
    assert _layer4_size(model, torch.randn(2, 1, 96, 96)) == (3, 3)  # 96 / 32


def test_resnet_matches_torchvision_structure():
    ours = build_backbone("resnet50", in_channels=3, image_size=224)
    reference = torchvision.models.resnet50(weights=None)
    reference.fc = nn.Identity()
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    reference_shapes = {k: v.shape for k, v in reference.state_dict().items()}
    assert ours_shapes == reference_shapes


def test_vgg13_layers_and_pools():
    model = build_backbone("vgg13", image_size=32)
    reference = torchvision.models.vgg13_bn(weights=None).features
    assert [type(m) for m in model.features] == [type(m) for m in reference]
    ours_shapes = [p.shape for p in model.features.parameters()]
    assert ours_shapes == [p.shape for p in reference.parameters()]
    for size, kept in ((32, 5), (28, 4), (8, 3), (96, 5)):
        vgg = build_backbone("vgg13", in_channels=1, image_size=size)
        pools = sum(isinstance(m, nn.MaxPool2d) for m in vgg.features)
        assert pools == kept, size


def test_mlp_width_depth_and_cnn_width():
    mlp = build_backbone("mlp", input_shape=(40,), width=64, depth=2)
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(40, 64), (64, 64)]
    assert mlp.num_features == 64 and mlp(torch.randn(5, 40)).shape == (5, 64)
    mlp_image = build_backbone("mlp", in_channels=1, image_size=28)
    assert next(m for m in mlp_image.modules() if isinstance(m, nn.Linear)).in_features == 784
    no_norm = build_backbone("mlp", input_shape=(40,), batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in no_norm.modules())
    cnn = build_backbone("cnn", input_shape=(3, 32, 32), width=8)
    assert cnn.num_features == 32 and cnn.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 32)


def test_remove_norm_affine_matches_non_affine_batchnorm():
    layer = nn.BatchNorm2d(6)
    remove_norm_affine(layer)
    reference = nn.BatchNorm2d(6, affine=False)
    assert layer.state_dict().keys() == reference.state_dict().keys()
    inputs = torch.randn(4, 6, 3, 3)
    torch.testing.assert_close(layer(inputs), reference(inputs))
    torch.testing.assert_close(layer.running_mean, reference.running_mean)
    linear = remove_biases(nn.Linear(3, 2))
    assert linear.bias is None and list(linear.state_dict()) == ["weight"]
    inputs = torch.randn(5, 3)
    torch.testing.assert_close(linear(inputs), inputs @ linear.weight.T)


def test_check_no_one_dimensional_parameters_names_them():
    model = build_backbone("mlp", input_shape=(40,), width=16, depth=1)
    with pytest.raises(
        ValueError, match=r"AGD cannot train 1-D parameters.*layers\.1\.bias.*--no-bias"
    ):
        check_no_one_dimensional_parameters(model, "AGD")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "resnet34"}, r"unknown model name='resnet34'.*resnet18, resnet50, vgg13"),
        ({"name": "resnet18", "width": 64}, r"width=64 is only supported by 'mlp' and 'cnn'"),
        ({"name": "cnn", "depth": 2}, r"depth=2 is only supported by 'mlp'"),
        ({"name": "cnn", "input_shape": (40,)}, r"input_shape=\(40,\) is a vector.*'mlp'"),
        ({"name": "mlp", "input_shape": (2, 3)}, r"input_shape=\(2, 3\) must be"),
        ({"name": "mlp", "width": 0}, r"width=0 must be a positive integer"),
        ({"name": "vgg13", "in_channels": 0}, r"in_channels=0 must be a positive integer"),
        ({"name": "cnn", "image_size": 2}, r"image_size=2 is too small for 'cnn'"),
        ({"name": "vgg13", "batch_norm": False}, r"batch_norm=False is only supported by 'mlp'"),
    ],
)
def test_build_backbone_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_backbone(**kwargs)
