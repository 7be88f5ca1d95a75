"""Backbones that return penultimate features of width ``num_features``.

:func:`build_backbone` is the one entry point; the classifier head (``guided_nc.heads``) is
separate. See ``docs/models.md`` for the architectures, stems, feature widths and the
``affine=False, bias=False`` variant that AGD needs.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from guided_nc.catalog import MODEL_NAMES
from guided_nc.models.classifier import Classifier, FreeFeatures, replace_classifier
from guided_nc.models.common import (
    one_dimensional_parameters,
    remove_biases,
    remove_norm_affine,
)
from guided_nc.models.resnet import (
    CIFAR_STEM_MAX_SIZE,
    RESNET_FEATURES,
    build_resnet,
    torchvision_resnet,
)
from guided_nc.models.small import MLP, SmallCNN
from guided_nc.models.vgg import VGGFeatures

__all__ = [
    "CIFAR_STEM_MAX_SIZE",
    "MLP",
    "MODEL_NAMES",
    "RESNET_FEATURES",
    "Classifier",
    "FreeFeatures",
    "SmallCNN",
    "VGGFeatures",
    "build_backbone",
    "check_no_one_dimensional_parameters",
    "one_dimensional_parameters",
    "remove_biases",
    "remove_norm_affine",
    "replace_classifier",
    "torchvision_resnet",
]


#: Default widths: MLP hidden units (= features), CNN first-block channels (features = 4x).
DEFAULT_MLP_WIDTH = 512
DEFAULT_MLP_DEPTH = 3
DEFAULT_CNN_WIDTH = 32


def build_backbone(
    name: str,
    in_channels: int = 3,
    image_size: int = 32,
    affine: bool = True,
    bias: bool = True,
    width: int | None = None,
    depth: int | None = None,
    input_shape: Sequence[int] | None = None,
    batch_norm: bool = True,
) -> nn.Module:
    """Build a backbone returning penultimate features; the module has ``num_features`` (d).

    Args:
        name: one of :data:`MODEL_NAMES`.
        in_channels: input channels (1 for MNIST-family and digits, 3 for CIFAR/STL/ImageNet).
        image_size: input side in pixels. ResNets use the CIFAR stem (3x3 conv, stride 1, no
            max-pool) when it is <= 64 and the ImageNet stem otherwise; VGG drops the trailing
            max-pools that would shrink the map below 1x1; the MLP uses it for its input size.
        affine: learnable scale and shift in the normalisation layers.
        bias: biases in the convolution / linear layers. ``affine=False, bias=False`` gives a
            model without 1-D parameters, the paper's choice with AGD.
        width: MLP hidden width (= d, default 512) or CNN first-block channels (d = 4 * width,
            default 32). Not supported by ResNet/VGG.
        depth: MLP hidden layers (default 3). Only for the MLP.
        input_shape: shape of one input without the batch dimension, e.g.
            ``DataSplits.input_shape``: (C, H, W) sets ``in_channels`` and ``image_size``
            (overriding them); (L,) vectors (MNIST-1D) are only accepted by the MLP.
        batch_norm: batch norm in the MLP and CNN blocks (ResNet/VGG always have it).

    Returns:
        ``nn.Module`` mapping (B, *input) float to (B, num_features) of the same dtype.

    Raises:
        ValueError: unknown name, non-positive sizes, options the model does not support, or a
            1-D ``input_shape`` for a convolutional model.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model name={name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if input_shape is not None:
        input_shape = tuple(int(size) for size in input_shape)
        if len(input_shape) == 3:
            in_channels, height, width_pixels = input_shape
            image_size = min(height, width_pixels)
        elif len(input_shape) == 1:
            if name != "mlp":
                raise ValueError(
                    f"input_shape={input_shape} is a vector, which model {name!r} cannot take; "
                    "use name='mlp' for vector inputs such as MNIST-1D"
                )
        else:
            raise ValueError(
                f"input_shape={input_shape} must be (channels, height, width) or (length,)"
            )
        if any(size < 1 for size in input_shape):
            raise ValueError(f"input_shape={input_shape} must have positive sizes")
    for argument, value in (("in_channels", in_channels), ("image_size", image_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{argument}={value!r} must be a positive integer")
    for argument, value in (("width", width), ("depth", depth)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{argument}={value!r} must be a positive integer or None")
    if width is not None and name not in ("mlp", "cnn"):
        raise ValueError(
            f"width={width} is only supported by 'mlp' and 'cnn', not {name!r}; leave width=None"
        )
    if not batch_norm and name not in ("mlp", "cnn"):
        raise ValueError(
            f"batch_norm=False is only supported by 'mlp' and 'cnn'; {name!r} always has batch "
            "norm (use affine=False to drop its learnable parameters)"
        )
    if depth is not None and name != "mlp":
        raise ValueError(
            f"depth={depth} is only supported by 'mlp', not {name!r}; leave depth=None"
        )
    if name in ("resnet18", "resnet50"):
        return build_resnet(name, in_channels, image_size, affine=affine, bias=bias)
    if name == "vgg13":
        return VGGFeatures(in_channels, image_size, affine=affine, bias=bias)
    if name == "cnn":
        if image_size < 4:
            raise ValueError(f"image_size={image_size} is too small for 'cnn'; it needs >= 4")
        return SmallCNN(
            in_channels,
            width=width or DEFAULT_CNN_WIDTH,
            batch_norm=batch_norm,
            affine=affine,
            bias=bias,
        )
    if input_shape is None:
        input_shape = (in_channels, image_size, image_size)
    return MLP(
        input_shape,
        width=width or DEFAULT_MLP_WIDTH,
        depth=depth or DEFAULT_MLP_DEPTH,
        batch_norm=batch_norm,
        affine=affine,
        bias=bias,
    )


def check_no_one_dimensional_parameters(model: nn.Module, optimizer: str = "AGD") -> None:
    """Raise ``ValueError`` naming the 1-D parameters of ``model`` if there are any.

    AGD (method.md section 4) has no update rule for biases or norm-layer affine parameters.
    The message names them and the fixes: build the model with ``affine=False, bias=False``
    (``--no-bias``) or choose another optimiser.
    """
    names = one_dimensional_parameters(model)
    if names:
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        raise ValueError(
            f"{optimizer} cannot train 1-D parameters (biases, norm-layer scales/shifts), "
            f"but the model has: {shown}. Fix: build the model without them (--no-bias, i.e. "
            f"build_backbone(..., affine=False, bias=False)); for your own model, call "
            f"guided_nc.models.remove_biases(model) and remove_norm_affine(model) (or "
            f"guided_nc.models.torchvision_resnet for a torchvision ResNet); or choose another "
            f"optimiser (sgd, adam, adamw)."
        )
