"""VGG-13 with batch norm (torchvision's ``vgg13_bn`` convolutional part) as a feature backbone.

The CIFAR variant used in neural-collapse work: torchvision's ``vgg13_bn().features`` (ten 3x3
convolutions with batch norm and ReLU, five 2x2 max-pools), then global average pooling to a
512-d feature vector. The 4096-wide ImageNet classifier is not built.

Small inputs: each max-pool halves the side, so images smaller than 32 pixels would reach size 0.
The trailing max-pools that would shrink the map below 1x1 are replaced by ``nn.Identity``
(28x28 keeps 4 pools, 8x8 keeps 3).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import vgg as vgg_module

from guided_nc.models.common import remove_biases, remove_norm_affine

__all__ = ["VGGFeatures"]


class VGGFeatures(nn.Module):
    """VGG-13-BN convolutional features followed by global average pooling.

    Args:
        in_channels: channels of the input images.
        image_size: side of the input images (decides how many max-pools are kept).
        affine: learnable scale and shift in the batch-norm layers.
        bias: biases in the convolutions (torchvision's VGG has them).

    Attributes:
        num_features: 512.

    Shape: input (B, in_channels, H, W) float -> (B, 512), same dtype.
    """

    def __init__(
        self, in_channels: int = 3, image_size: int = 32, affine: bool = True, bias: bool = True
    ) -> None:
        super().__init__()
        # torchvision's own layer list for vgg13_bn (configuration "B"); building only the
        # features avoids allocating the 120M-parameter classifier that would be thrown away.
        features = vgg_module.make_layers(vgg_module.cfgs["B"], batch_norm=True)
        if in_channels != 3:
            features[0] = nn.Conv2d(in_channels, features[0].out_channels, 3, padding=1)
        _init_like_torchvision(features)
        pools = [i for i, layer in enumerate(features) if isinstance(layer, nn.MaxPool2d)]
        # floor(log2(image_size)) halvings keep the map at least 1x1.
        keep = min(len(pools), image_size.bit_length() - 1)
        for index in pools[keep:]:
            features[index] = nn.Identity()
        if not bias:
            remove_biases(features)
        if not affine:
            remove_norm_affine(features)
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_pools = keep
        self.num_features = 512

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(images)), 1)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, image_size={self.image_size}, "
            f"num_pools={self.num_pools}, num_features={self.num_features}"
        )


def _init_like_torchvision(features: nn.Module) -> None:
    # The initialisation torchvision's VGG constructor applies to its features.
    with torch.no_grad():
        for layer in features.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
            elif isinstance(layer, nn.BatchNorm2d):
                nn.init.ones_(layer.weight)
                nn.init.zeros_(layer.bias)
