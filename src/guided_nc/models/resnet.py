"""ResNet-18/50 backbones from torchvision, with a CIFAR stem for small images.

torchvision's ResNet v1.5 with ``fc = nn.Identity()``, so the forward returns the globally
average-pooled penultimate features, of width 512 (ResNet-18) or 2048 (ResNet-50).

Stem: images of at most :data:`CIFAR_STEM_MAX_SIZE` pixels get the CIFAR stem (3x3 convolution,
stride 1, padding 1, no max-pool; method.md section 7 and reference-release.md defect 22: the
release used the ImageNet stem, which brings a 32x32 input to 1x1 at layer4). Larger images keep
the ImageNet stem (7x7 stride-2 convolution and 3x3 stride-2 max-pool); ``conv1`` is still
rebuilt when ``in_channels != 3``.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from guided_nc.models.common import remove_biases, remove_norm_affine

__all__ = ["CIFAR_STEM_MAX_SIZE", "RESNET_FEATURES", "build_resnet", "torchvision_resnet"]

#: Largest image side (pixels) that gets the CIFAR stem.
CIFAR_STEM_MAX_SIZE = 64

#: Feature width of each supported ResNet.
RESNET_FEATURES = {"resnet18": 512, "resnet50": 2048}


def torchvision_resnet(
    name: str = "resnet18",
    *,
    in_channels: int = 3,
    image_size: int = 224,
    for_agd: bool = True,
    **options,
) -> torchvision.models.ResNet:
    """Any torchvision ResNet as a backbone for a guided-nc head, without the AGD crash.

    Building ``torchvision.models.resnet18(norm_layer=partial(nn.BatchNorm2d, affine=False))``
    fails inside torchvision's own initialisation (it sets every batch-norm weight to 1). This
    builds the network as torchvision does, then removes the 1-D parameters that AGD cannot
    train (``for_agd=True``: :func:`remove_norm_affine` and :func:`remove_biases`), replaces
    ``fc`` by the identity and records ``num_features`` (512 for ResNet-18/34, 2048 for 50+).

    Args:
        name: a ResNet constructor of ``torchvision.models`` (``resnet18``, ``resnet34``,
            ``resnet50``, ``resnet101``, ``wide_resnet50_2``, ``resnext50_32x4d``, ...).
        in_channels: input channels (a new stem convolution when not 3).
        image_size: input side; <= 64 gives the CIFAR stem (3x3 stride-1 conv, no max-pool).
        for_agd: remove the biases and the batch-norm scales and shifts.
        **options: passed to the torchvision constructor (e.g. ``weights=`` for weights you
            have locally; guided-nc never downloads by itself, so the default is None).

    Shape: input (B, in_channels, H, W) float -> features (B, num_features), same dtype.

    >>> backbone = torchvision_resnet("resnet18", image_size=32)
    >>> backbone.num_features, backbone(torch.zeros(2, 3, 32, 32)).shape
    (512, torch.Size([2, 512]))
    """
    constructor = getattr(torchvision.models, name, None)
    if not callable(constructor) or not name.startswith(("resnet", "wide_resnet", "resnext")):
        raise ValueError(
            f"name={name!r} is not a torchvision ResNet; use e.g. resnet18, resnet50, "
            "wide_resnet50_2 or resnext50_32x4d"
        )
    options.setdefault("weights", None)  # never download weights implicitly
    model = constructor(**options)
    width = model.fc.in_features
    if image_size <= CIFAR_STEM_MAX_SIZE:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        _init_conv(model.conv1)
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        _init_conv(model.conv1)
    model.fc = nn.Identity()
    if for_agd:
        remove_biases(model)
        remove_norm_affine(model)
    model.num_features = width
    return model


def build_resnet(
    name: str,
    in_channels: int = 3,
    image_size: int = 32,
    affine: bool = True,
    bias: bool = True,
) -> torchvision.models.ResNet:
    """A torchvision ResNet returning penultimate features, with ``num_features`` set.

    Args:
        name: ``"resnet18"`` or ``"resnet50"``.
        in_channels: channels of the input images.
        image_size: side of the (square) input images; <= 64 selects the CIFAR stem.
        affine: learnable scale and shift in the batch-norm layers.
        bias: torchvision's ResNets have no bias anywhere once ``fc`` is removed, so this only
            matters for a replaced stem (built without bias, as torchvision's).

    Shape: input (B, in_channels, H, W) float -> features (B, num_features), same dtype.
    Initialisation: torchvision's (Kaiming-normal fan-out for convolutions, BN weight 1, bias 0);
    the rebuilt ``conv1`` gets the same Kaiming-normal initialisation.
    """
    # torchvision's constructor initialises every batch-norm weight, so non-affine layers are
    # made afterwards (remove_norm_affine), in torchvision_resnet.
    model = torchvision_resnet(name, in_channels=in_channels, image_size=image_size, for_agd=False)
    if not bias:
        remove_biases(model)  # a no-op for torchvision's ResNets; kept for safety
    if not affine:
        remove_norm_affine(model)
    return model


def _init_conv(conv: nn.Conv2d) -> None:
    # Same initialisation torchvision's ResNet constructor applies to every convolution.
    with torch.no_grad():
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
