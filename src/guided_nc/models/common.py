"""Helpers shared by the backbones: removing 1-D parameters and listing them.

AGD (method.md section 4) only has an update rule for 2-D weights and 4-D convolution kernels;
biases and the affine parameters of normalisation layers are 1-D. The paper trains with
``--no-bias``: no biases and no norm-layer affine parameters. These helpers build that variant
from any module and let training name the offending parameters when they are present.
"""

from __future__ import annotations

from torch import nn

__all__ = ["one_dimensional_parameters", "remove_biases", "remove_norm_affine"]


def remove_biases(module: nn.Module) -> nn.Module:
    """Drop the bias of every convolution and linear layer in ``module`` (in place).

    The result is the module that ``bias=False`` would have built: ``layer.bias`` is ``None`` and
    is absent from ``state_dict``. Returns ``module``.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)) and layer.bias is not None:
            layer.register_parameter("bias", None)
    return module


def remove_norm_affine(module: nn.Module) -> nn.Module:
    """Make every normalisation layer in ``module`` non-affine (in place).

    Same state as building the layer with ``affine=False`` (batch norm) or
    ``elementwise_affine=False`` (layer norm): no ``weight`` and ``bias`` parameters; running
    statistics are kept. Returns ``module``.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
            layer.affine = False
        elif isinstance(layer, nn.LayerNorm):
            layer.elementwise_affine = False
        else:
            continue
        layer.register_parameter("weight", None)
        layer.register_parameter("bias", None)
    return module


def one_dimensional_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters of ``model`` with fewer than two dimensions.

    These are the tensors AGD has no update rule for (biases, norm-layer scales and shifts,
    scalar parameters). An empty list means the model can be trained with AGD; build it with
    ``build_backbone(name, affine=False, bias=False)`` otherwise.

    Example::

        >>> from guided_nc.models import build_backbone
        >>> one_dimensional_parameters(build_backbone("mlp", input_shape=(40,), affine=False,
        ...                                           bias=False))
        []
    """
    return [name for name, parameter in model.named_parameters() if parameter.ndim < 2]
