"""Small backbones for CPU experiments: a multi-layer perceptron and a three-block CNN."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["MLP", "SmallCNN"]


class MLP(nn.Module):
    """Flatten, then ``depth`` blocks of Linear -> BatchNorm1d (optional) -> ReLU.

    The features are the output of the last ReLU, as for the ResNets (post-activation).

    Args:
        input_shape: shape of one input without the batch dimension, e.g. (1, 28, 28) or (40,).
        width: units of every hidden layer; also ``num_features``. Default 512.
        depth: number of hidden blocks (>= 1). Default 3.
        batch_norm: insert ``BatchNorm1d`` after each linear layer.
        affine: learnable scale and shift in the batch-norm layers.
        bias: biases in the linear layers.

    Shape: input (B, *input_shape) float -> (B, width), same dtype.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        width: int = 512,
        depth: int = 3,
        batch_norm: bool = True,
        affine: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(
                f"depth must be >= 1 for the MLP, got depth={depth}; use depth=1 or more"
            )
        self.input_shape = tuple(int(size) for size in input_shape)
        self.in_features = math.prod(self.input_shape)
        self.width = width
        self.depth = depth
        self.batch_norm = batch_norm
        layers: list[nn.Module] = [nn.Flatten()]
        in_features = self.in_features
        for _ in range(depth):
            layers.append(nn.Linear(in_features, width, bias=bias))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width, affine=affine))
            layers.append(nn.ReLU(inplace=True))
            in_features = width
        self.layers = nn.Sequential(*layers)
        self.num_features = width

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.layers(inputs)

    def extra_repr(self) -> str:
        return (
            f"input_shape={self.input_shape}, width={self.width}, depth={self.depth}, "
            f"batch_norm={self.batch_norm}"
        )


class SmallCNN(nn.Module):
    """Three 3x3 conv blocks (width w, 2w, 4w) with max-pools after the first two, then global
    average pooling. ``num_features = 4 * width`` (128 with the default ``width=32``).

    Each block is Conv2d -> BatchNorm2d (optional) -> ReLU. Works for any image side >= 4
    (8x8 digits reach 2x2 before pooling).

    Args:
        in_channels: channels of the input images.
        width: channels of the first block. Default 32.
        batch_norm: insert ``BatchNorm2d`` after each convolution.
        affine: learnable scale and shift in the batch-norm layers.
        bias: biases in the convolutions.

    Shape: input (B, in_channels, H, W) float -> (B, 4 * width), same dtype.
    """

    def __init__(
        self,
        in_channels: int = 3,
        width: int = 32,
        batch_norm: bool = True,
        affine: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.width = width
        self.batch_norm = batch_norm
        channels = [in_channels, width, 2 * width, 4 * width]
        layers: list[nn.Module] = []
        for block in range(3):
            layers.append(nn.Conv2d(channels[block], channels[block + 1], 3, padding=1, bias=bias))
            if batch_norm:
                layers.append(nn.BatchNorm2d(channels[block + 1], affine=affine))
            layers.append(nn.ReLU(inplace=True))
            if block < 2:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.layers = nn.Sequential(*layers)
        self.num_features = 4 * width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, width={self.width}, batch_norm={self.batch_norm}"
